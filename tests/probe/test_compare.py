"""`crosschip probe compare` on synthetic recordings written exactly as the on-disk format says.

Each recording is a real run directory (probe/manifest.json + parquet parts) read back through
crosschip.probe.store, so the alignment, tolerances, origins, report and exit codes are tested on
controlled numbers: a statistic perturbed at one (step, module), a NaN planted at one module with the
downstream modules inheriting it, an fp16 overflow, a noise run that widens the tolerance.
The end-to-end tests then record real tiny training runs (make_probe_run): the same seed twice matches,
a planted NaN is traced to the module that produced it, an fp16 overflow is named with its step, and the
CLI (compare, replay) runs in-process and as a subprocess.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crosschip.errors import CrosschipError
from crosschip.probe.compare import compare_runs
from crosschip.probe.report import write_probe_report
from probekit import run_main

# Execution order of the forward outputs (post-order: a submodule finishes before its parent).
OUTPUTS = ["model.embed_tokens", "model.layers.0.self_attn", "model.layers.0.mlp.up_proj",
           "model.layers.0.mlp.down_proj", "model.layers.0.mlp", "model.layers.0", "model.norm", "lm_head"]
GRADS = ["model.embed_tokens", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.norm", "lm_head"]
STATS_SCHEMA = pa.schema([
    ("step", pa.int64()), ("module", pa.string()), ("kind", pa.string()), ("order", pa.int32()),
    ("in_nonfinite", pa.int64()), ("numel", pa.int64()), ("mean", pa.float64()), ("std", pa.float64()),
    ("absmax", pa.float64()), ("l2", pa.float64()), ("nan", pa.int64()), ("inf", pa.int64()),
    ("zeros", pa.int64()), ("over_fp16", pa.int64()),
])
STEPS_SCHEMA = pa.schema([("step", pa.int64()), ("loss", pa.float64()), ("grad_norm", pa.float64()),
                          ("lr", pa.float64()), ("loss_scale", pa.float64())])
Row = dict[str, Any]


def base_rows(steps: int, scale: float = 1.0, outputs: list[str] = OUTPUTS) -> list[Row]:
    """Plausible, distinct statistics per (step, module, kind); `scale` perturbs every float statistic."""
    rows = []
    for step in range(1, steps + 1):
        for kind, names in (("output", outputs), ("grad", GRADS)):
            for order, module in enumerate(names):
                base = 1.0 + 0.1 * order + 0.01 * step + (0.5 if kind == "grad" else 0.0)
                rows.append({
                    "step": step, "module": module, "kind": kind, "order": order,
                    "in_nonfinite": 0 if kind == "output" else -1, "numel": 4096,
                    "mean": 0.01 * base * scale, "std": base * scale, "absmax": 4 * base * scale,
                    "l2": 64 * base * scale, "nan": 0, "inf": 0, "zeros": 3, "over_fp16": 0,
                })
    return rows


def find(rows: list[Row], step: int, module: str, kind: str = "output") -> Row:
    return next(r for r in rows if (r["step"], r["module"], r["kind"]) == (step, module, kind))


def write_run(root: Path, rows: list[Row], *, precision: str = "fp32", parts: int = 2,
              loss: Callable[[int], float] = lambda s: 5.0 - 0.1 * s) -> Path:
    """A run directory holding a probe recording (stats split into `parts` parquet parts)."""
    probe = root / "probe"
    probe.mkdir(parents=True)
    modules = sorted({r["module"] for r in rows})
    manifest = {"schema_version": 1, "mode": "stats", "modules_glob": "*", "steps": None,
                "stats": ["mean", "std", "absmax", "l2", "nan", "inf", "zeros", "over_fp16"], "device": "cpu",
                "precision": precision, "modules": modules}
    (probe / "manifest.json").write_text(json.dumps(manifest))
    steps = sorted({r["step"] for r in rows})
    cut = steps[len(steps) // 2] if parts > 1 and len(steps) > 1 else math.inf
    chunks = [[r for r in rows if r["step"] < cut], [r for r in rows if r["step"] >= cut]]
    for k, chunk in enumerate(c for c in chunks if c):
        pq.write_table(pa.Table.from_pylist(chunk, schema=STATS_SCHEMA), probe / f"stats-{k:05d}.parquet")
    step_rows = [{"step": s, "loss": loss(s), "grad_norm": 1.0 / s, "lr": 1e-3, "loss_scale": math.nan}
                 for s in steps]
    pq.write_table(pa.Table.from_pylist(step_rows, schema=STEPS_SCHEMA), probe / "steps-00000.parquet")
    return root


def plant_nan(rows: list[Row], step: int, producer: str) -> None:
    """NaN out of `producer` at `step` (finite input); every later output inherits it, every grad is NaN."""
    at = OUTPUTS.index(producer)
    for r in rows:
        if r["step"] < step:
            continue
        hit = r["kind"] == "grad" or OUTPUTS.index(r["module"]) >= at or r["step"] > step
        if hit:
            r.update(nan=r["numel"], mean=math.nan, std=math.nan, absmax=math.nan, l2=math.nan)
            if r["kind"] == "output" and (OUTPUTS.index(r["module"]) > at or r["step"] > step):
                r["in_nonfinite"] = r["numel"]
    # The embedding reads token ids: its input stays finite even after the NaN; so does the producer's.
    for r in rows:
        if r["module"] in ("model.embed_tokens", producer) and r["kind"] == "output" and r["step"] >= step:
            r["in_nonfinite"] = 0


def test_identical_runs_match_with_zero_drift(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", base_rows(6))
    b = write_run(tmp_path / "b", base_rows(6), parts=1)  # different part split, same content
    cmp = compare_runs(a, b)
    assert cmp.verdict == "match" and cmp.reasons == []
    assert cmp.first_divergence is None and cmp.divergent_rows == 0
    assert cmp.aligned_rows == 6 * (len(OUTPUTS) + len(GRADS)) and cmp.aligned_steps == 6
    assert all(v == 0 for line in cmp.drift["values"] for v in line)
    assert cmp.run_a.nonfinite_origin is None and cmp.run_b.overflow_origin is None
    assert cmp.loss["a"] == cmp.loss["b"] and len(cmp.loss["steps"]) == 6
    # rows: outputs in execution order, then grads
    assert cmp.drift["rows"][: len(OUTPUTS)] == OUTPUTS and cmp.drift["kinds"][len(OUTPUTS)] == "grad"
    assert compare_runs(a, a).verdict == "match"


def test_perturbed_statistic_names_step_and_module(tmp_path: Path) -> None:
    rows = base_rows(6)
    find(rows, 3, "model.layers.0.mlp.up_proj")["std"] *= 1.5
    find(rows, 3, "lm_head")["absmax"] *= 2.0  # later in execution order, same step
    find(rows, 3, "model.embed_tokens", "grad")["l2"] *= 3.0  # a grad: after every output
    find(rows, 5, "model.embed_tokens")["mean"] *= 9.0  # later step, earlier module
    cmp = compare_runs(write_run(tmp_path / "a", base_rows(6)), write_run(tmp_path / "b", rows))
    d = cmp.first_divergence
    assert d is not None and cmp.verdict == "diverged"
    assert (d.step, d.module, d.kind, d.statistic) == (3, "model.layers.0.mlp.up_proj", "output", "std")
    assert d.b == pytest.approx(1.5 * d.a) and d.rel_diff == pytest.approx(0.5)
    assert d.tolerance_source == "floor" and d.tolerance == pytest.approx(10 * 2.0**-24 * math.sqrt(3))
    assert cmp.divergent_rows == 4
    assert cmp.worst[0]["max_ratio"] > 1


def test_mean_judged_on_tensor_scale(tmp_path: Path) -> None:
    """A mean that cancels to ~0 moves by rounding relative to the tensor's rms, not relative to itself."""
    ra, rb = base_rows(2), base_rows(2)
    find(ra, 1, "model.norm")["mean"] = 1e-9
    find(rb, 1, "model.norm")["mean"] = -1e-9  # |delta| 2e-9 << bf16's 2^-8 of rms (~1)
    cmp = compare_runs(write_run(tmp_path / "a", ra), write_run(tmp_path / "b", rb, precision="bf16"))
    assert cmp.verdict == "match" and cmp.coarser_precision == "bf16"


def test_planted_nan_traced_to_producer_not_downstream(tmp_path: Path) -> None:
    rows = base_rows(5)
    plant_nan(rows, 2, "model.layers.0.mlp.down_proj")
    cmp = compare_runs(write_run(tmp_path / "a", base_rows(5)), write_run(tmp_path / "b", rows))
    o = cmp.run_b.nonfinite_origin
    assert o is not None and (o.step, o.module, o.kind) == (2, "model.layers.0.mlp.down_proj", "output")
    assert o.in_nonfinite == 0 and o.nan > 0
    assert cmp.run_a.nonfinite_origin is None
    assert cmp.verdict == "diverged" and any("NaN/Inf" in r for r in cmp.reasons)
    d = cmp.first_divergence
    assert d is not None and (d.step, d.module, d.statistic) == (2, "model.layers.0.mlp.down_proj", "nan")
    assert d.tolerance_source == "exact"


def test_nan_origin_prefers_submodule_when_parent_runs_first(tmp_path: Path) -> None:
    """Pre-order numbering (parent before its children): the parent mlp also has a finite input and a
    NaN output, but the NaN came from inside it, so the child that produced it is named."""
    pre_order = ["model.embed_tokens", "model.layers.0", "model.layers.0.self_attn", "model.layers.0.mlp",
                 "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.norm", "lm_head"]
    rows = base_rows(3, outputs=pre_order)
    for r in rows:
        if r["step"] == 3 and r["kind"] == "output" and r["module"] in pre_order[1:]:
            inside = r["module"] in ("model.layers.0", "model.layers.0.mlp", "model.layers.0.mlp.down_proj")
            later = r["module"] in ("model.norm", "lm_head")
            if inside or later:
                r.update(nan=7, mean=math.nan, std=math.nan, absmax=math.nan, l2=math.nan)
                r["in_nonfinite"] = 7 if later else 0
    cmp = compare_runs(write_run(tmp_path / "a", base_rows(3, outputs=pre_order)),
                       write_run(tmp_path / "b", rows))
    o = cmp.run_b.nonfinite_origin
    assert o is not None and (o.step, o.module) == (3, "model.layers.0.mlp.down_proj")
    d = cmp.first_divergence
    assert d is not None and (d.step, d.module) == (3, "model.layers.0.mlp.down_proj")


def test_grad_only_nan_origin(tmp_path: Path) -> None:
    rows = base_rows(3)
    find(rows, 2, "model.norm", "grad").update(inf=2, absmax=math.inf)
    cmp = compare_runs(write_run(tmp_path / "a", base_rows(3)), write_run(tmp_path / "b", rows))
    o = cmp.run_b.nonfinite_origin
    assert o is not None and (o.step, o.module, o.kind) == (2, "model.norm", "grad")


def test_fp16_overflow_origin_in_both_runs(tmp_path: Path) -> None:
    """fp32 reference: values beyond 65504 from layer 0's mlp down_proj at step 3; fp16 run: Inf there."""
    at = OUTPUTS.index("model.layers.0.mlp.down_proj")
    ref, fp16 = base_rows(4), base_rows(4)
    for r in ref:
        if r["step"] == 3 and r["kind"] == "output" and OUTPUTS.index(r["module"]) >= at:
            r.update(over_fp16=12, absmax=2.5e5)
    for r in fp16:
        if r["step"] == 3 and r["kind"] == "output" and OUTPUTS.index(r["module"]) >= at:
            downstream = OUTPUTS.index(r["module"]) > at
            r.update(inf=12, absmax=math.inf, l2=math.inf, mean=math.nan, std=math.nan)
            if downstream:
                r.update(nan=12, in_nonfinite=12)
    cmp = compare_runs(write_run(tmp_path / "a", ref), write_run(tmp_path / "b", fp16, precision="fp16"))
    for origin in (cmp.run_a.overflow_origin, cmp.run_b.overflow_origin, cmp.run_b.nonfinite_origin):
        assert origin is not None and (origin.step, origin.module) == (3, "model.layers.0.mlp.down_proj")
    assert cmp.run_a.overflow_origin.over_fp16 == 12 and cmp.run_b.overflow_origin.inf == 12
    assert cmp.run_a.nonfinite_origin is None and cmp.verdict == "diverged"
    assert cmp.unit_roundoff == 2.0**-11


def test_noise_run_widens_tolerance(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", base_rows(5))
    noise = write_run(tmp_path / "noise", base_rows(5, scale=1 + 1e-3))  # the reference differs from itself by 1e-3
    b = write_run(tmp_path / "b", base_rows(5, scale=1 + 5e-4))
    without = compare_runs(a, b)
    assert without.verdict == "diverged" and without.first_divergence.step == 1
    with_noise = compare_runs(a, b, noise=noise)
    assert with_noise.verdict == "match" and with_noise.first_divergence is None
    assert all(r["std"] == pytest.approx(1e-3) for r in with_noise.noise_rel)
    # a change well beyond margin x noise still diverges
    big = write_run(tmp_path / "big", base_rows(5, scale=1.05))
    d = compare_runs(a, big, noise=noise).first_divergence
    assert d is not None and d.tolerance_source == "noise"
    std = next(f for f in d.failing if f["statistic"] == "std")
    assert std["tolerance"] == pytest.approx(10 * 1e-3) and std["rel_diff"] == pytest.approx(0.05)


def test_only_in_one_run_is_reported_not_compared(tmp_path: Path) -> None:
    rows_b = [r for r in base_rows(4) if r["module"] != "model.norm" and r["step"] != 4]
    cmp = compare_runs(write_run(tmp_path / "a", base_rows(4)), write_run(tmp_path / "b", rows_b))
    assert cmp.verdict == "match"
    assert cmp.only_in_a == {"modules": ["model.norm"], "steps": [4]} and cmp.only_in_b == {"modules": [], "steps": []}


def test_bad_inputs_are_crosschip_errors(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", base_rows(2))
    with pytest.raises(CrosschipError, match="no probe recording"):
        compare_runs(a, tmp_path / "missing")
    with pytest.raises(CrosschipError, match="margin"):
        compare_runs(a, a, margin=0)
    other = write_run(tmp_path / "other", [r | {"step": r["step"] + 10} for r in base_rows(2)])
    with pytest.raises(CrosschipError, match="share no"):
        compare_runs(a, other)
    odd = write_run(tmp_path / "odd", base_rows(2), precision="int3")
    with pytest.raises(CrosschipError, match="precision"):
        compare_runs(a, odd)


EVIL = '<script>alert("x")</script>'


def test_report_is_self_contained_escaped_and_strict_json(tmp_path: Path) -> None:
    rows = base_rows(4)
    plant_nan(rows, 3, "model.layers.0.mlp.down_proj")
    for r in rows:
        if r["module"] == "model.norm":
            r["module"] = "model.norm" + EVIL
    a = write_run(tmp_path / "a" / EVIL.replace("/", "_"), rows)
    b = write_run(tmp_path / "b", [dict(r) for r in rows])
    find(rows, 2, "model.layers.0.self_attn")["std"] *= 2
    c = write_run(tmp_path / "c", rows)
    paths = write_probe_report(compare_runs(a, c), tmp_path / "report")
    page = paths["html"].read_text()
    assert "<script" not in page.lower() and "&lt;script&gt;" in page
    assert not any(tag in page.lower() for tag in ("src=", "href=", "<link", "@import", "url("))
    assert page.count("<svg") == 3  # loss, grad norm, heat map
    doc = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert doc["schema_version"] == 1 and doc["verdict"] == "diverged"
    assert doc["first_divergence"]["module"] == "model.layers.0.self_attn"
    assert doc["run_a"]["nonfinite_origin"]["module"] == "model.layers.0.mlp.down_proj"
    with pytest.raises(CrosschipError, match="exists"):
        write_probe_report(compare_runs(a, b), tmp_path / "report")
    write_probe_report(compare_runs(a, b), tmp_path / "report", overwrite=True)
    assert json.loads(paths["json"].read_text())["verdict"] == "match"




def test_cli_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_run(tmp_path / "a", base_rows(3))
    rows = base_rows(3)
    plant_nan(rows, 2, "model.layers.0.mlp.up_proj")
    b = write_run(tmp_path / "b", rows)
    code, out, _ = run_main(monkeypatch, capsys, "compare", str(a), str(a), "--json")
    assert code == 0 and json.loads(out)["verdict"] == "match"
    code, out, _ = run_main(monkeypatch, capsys, "compare", str(a), str(b), "--report", str(tmp_path / "r"))
    assert code == 1 and "model.layers.0.mlp.up_proj" in out and "DIVERGED" in out
    assert (tmp_path / "r" / "report.html").is_file()
    for bad, fragment in (([str(a), str(tmp_path / "nope")], "no probe recording"),
                          ([str(a), str(b), "--report", str(tmp_path / "r")], "already exists"),
                          ([str(a), str(b), "--margin", "-1"], "margin"),
                          ([str(a)], "Missing")):
        code, out, err = run_main(monkeypatch, capsys, "compare", *bad)
        assert code == 2 and fragment in err and out == ""
        assert "Traceback" not in err
        if fragment != "Missing":  # click's own usage errors are multi-line by design
            assert err.strip().startswith("error:") and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- end to end: real tiny training runs


def nth_forward_on(k: int, edit: Callable[[Any], Any]) -> Callable[..., Any]:
    """A forward hook that returns edit(output) from the module's k-th call (= training step k) on.

    make_probe_run trains with one micro-batch per step and no eval, so call k is step k."""
    calls = [0]

    def hook(module: Any, args: Any, output: Any) -> Any:
        calls[0] += 1
        return edit(output) if calls[0] >= k else None

    return hook


def round_to_fp16(output: Any) -> Any:
    """fp16 storage of a module output (Inf beyond 65504): the fp16 emulation of a CPU without fp16."""
    import torch

    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return output.half().to(output.dtype)
    if isinstance(output, tuple):
        return tuple(round_to_fp16(o) for o in output)
    return None


OVERFLOW_MODULE, OVERFLOW_STEP = "model.layers.0.mlp.down_proj", 4
NAN_MODULE, NAN_STEP = "model.layers.1.self_attn.o_proj", 3


def plant_overflow(model: Any) -> None:
    """Layer 0's MLP output grows 1e7x from step 4 on: beyond fp16's 65504, still finite in fp32."""
    model.get_submodule(OVERFLOW_MODULE).register_forward_hook(nth_forward_on(OVERFLOW_STEP, lambda o: o * 1e7))


def plant_overflow_fp16_emulated(model: Any) -> None:
    plant_overflow(model)  # first, so the fp16 rounding below sees the grown output
    for module in model.modules():
        if not list(module.children()):  # leaves: every computed tensor passes through one
            module.register_forward_hook(lambda m, a, o: round_to_fp16(o))


def plant_nan_hook(model: Any) -> None:
    model.get_submodule(NAN_MODULE).register_forward_hook(nth_forward_on(NAN_STEP, lambda o: o * float("nan")))


@pytest.fixture(scope="module")
def e2e(make_probe_run: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real recorded tiny runs (CPU): base twice with seed 0, seed 1, a planted NaN, a planted overflow."""
    root = tmp_path_factory.mktemp("probe-e2e")
    return {
        "base": make_probe_run(root / "base"),
        "again": make_probe_run(root / "again"),
        "seed1": make_probe_run(root / "seed1", seed=1),
        "nan": make_probe_run(root / "nan", plant=plant_nan_hook),
        "ovf_fp32": make_probe_run(root / "ovf_fp32", plant=plant_overflow),
        "ovf_fp16": make_probe_run(root / "ovf_fp16", plant=plant_overflow_fp16_emulated),
    }


def test_e2e_same_seed_twice_matches(e2e: dict[str, Path]) -> None:
    cmp = compare_runs(e2e["base"], e2e["again"])
    assert cmp.verdict == "match" and cmp.first_divergence is None and cmp.divergent_rows == 0
    assert cmp.aligned_steps == 6 and cmp.aligned_rows > 6 * 20
    assert all(v == 0 for line in cmp.drift["values"] for v in line if v is not None)
    assert cmp.run_a.nonfinite_origin is None and cmp.run_a.overflow_origin is None


def test_e2e_other_seed_diverges_but_serves_as_noise(e2e: dict[str, Path]) -> None:
    """Another data-order seed is a different run (diverges at once), and as the noise run it turns
    the tolerance into 'more than the reference differs from itself'."""
    other = compare_runs(e2e["base"], e2e["seed1"])
    assert other.verdict == "diverged" and other.first_divergence is not None
    assert other.first_divergence.step == 1
    with_noise = compare_runs(e2e["base"], e2e["again"], noise=e2e["seed1"])
    assert with_noise.verdict == "match" and with_noise.noise_rel


def test_e2e_planted_nan_traced_to_producer(e2e: dict[str, Path]) -> None:
    cmp = compare_runs(e2e["base"], e2e["nan"])
    o = cmp.run_b.nonfinite_origin
    assert o is not None and (o.step, o.module, o.kind) == (NAN_STEP, NAN_MODULE, "output")
    assert o.in_nonfinite == 0 and o.nan > 0
    # steps before the plant are bit-identical; the first divergence is the NaN itself
    d = cmp.first_divergence
    assert d is not None and (d.step, d.module, d.statistic) == (NAN_STEP, NAN_MODULE, "nan")
    assert cmp.verdict == "diverged" and cmp.run_a.nonfinite_origin is None


def test_e2e_fp16_overflow_names_module_and_step(e2e: dict[str, Path]) -> None:
    """fp32 vs fp16 activations (emulated: this CPU has no fp16 training; no loss scaling)."""
    cmp = compare_runs(e2e["ovf_fp32"], e2e["ovf_fp16"])
    ref, fp16 = cmp.run_a.overflow_origin, cmp.run_b.overflow_origin
    assert ref is not None and (ref.step, ref.module) == (OVERFLOW_STEP, OVERFLOW_MODULE)
    assert ref.over_fp16 > 0 and ref.inf == 0 and cmp.run_a.nonfinite_origin is None
    assert fp16 is not None and (fp16.step, fp16.module) == (OVERFLOW_STEP, OVERFLOW_MODULE) and fp16.inf > 0
    nonfinite = cmp.run_b.nonfinite_origin
    assert nonfinite is not None and (nonfinite.step, nonfinite.module) == (OVERFLOW_STEP, OVERFLOW_MODULE)
    assert cmp.verdict == "diverged"


def test_e2e_cli_subprocess(e2e: dict[str, Path], tmp_path: Path) -> None:
    """The real entry point in a fresh interpreter: exit 1 on the NaN run, JSON names the producer."""
    import subprocess

    argv = [sys.executable, "-m", "crosschip.probe.cli", "compare", str(e2e["base"]), str(e2e["nan"]), "--json",
            "--report", str(tmp_path / "report")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    assert doc["run_b"]["nonfinite_origin"]["module"] == NAN_MODULE
    assert (tmp_path / "report" / "report.html").is_file()


def test_e2e_cli_replay_then_compare(e2e: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`probe replay` says where the tensors went and which steps; the replay then compares equal to the run."""
    out = tmp_path / "replay"
    code, stdout, _ = run_main(monkeypatch, capsys, "replay", str(e2e["base"]), "--step", "3", "--out", str(out),
                               "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["steps"] == [3] and summary["replay_dir"] == str(out)  # checkpoint at 2 -> replays step 3
    assert summary["tensor_files"] == ["step-000003.safetensors"]
    assert (Path(summary["tensors_dir"]) / "step-000003.safetensors").is_file()
    code, stdout, _ = run_main(monkeypatch, capsys, "compare", str(e2e["base"]), str(out), "--json")
    doc = json.loads(stdout)
    assert code == 0 and doc["divergent_rows"] == 0 and doc["only_in_a"]["steps"] == [1, 2, 4, 5, 6]
    code, _, err = run_main(monkeypatch, capsys, "replay", str(e2e["base"]), "--step", "3", "--out", str(out))
    assert code == 2 and err.startswith("error:")
