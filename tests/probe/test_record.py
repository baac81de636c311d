"""Recording: real tiny training runs with `--probe`, their parquet files, and the statistics themselves."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import safetensors.torch
import torch

from crosschip.errors import CrosschipError
from crosschip.probe import store
from crosschip.probe.record import ProbeConfig, parse_steps
from crosschip.probe.stats import STAT_NAMES, Scratch, _full_raw, finalize, raw_stats, tensor_stats
from crosschip.train.loop import Trainer
from crosschip.train.report import NullReporter
from crosschip.train.state import complete_steps

# ---------------------------------------------------------------- the statistics


def reference_stats(x: torch.Tensor) -> list[float]:
    """STAT_NAMES in float64 numpy, over the finite elements (the documented definition)."""
    a = x.detach().double().numpy().ravel()
    finite = a[np.isfinite(a)]
    nan = float("nan")
    return [
        finite.mean() if finite.size else nan, finite.std() if finite.size else nan,
        np.abs(finite).max() if finite.size else nan, float(np.sqrt((finite * finite).sum())),
        np.isnan(a).sum(), np.isinf(a).sum(), (finite == 0).sum(), (np.abs(finite) > 65504).sum(),
    ]


def assert_stats_close(got: list[float], x: torch.Tensor, rtol: float = 2e-6) -> None:
    want = reference_stats(x)
    rms = float(np.sqrt(want[0] ** 2 + want[1] ** 2))  # sqrt(E[x^2]); NaN without finite elements
    for name, g, w in zip(STAT_NAMES, got, want, strict=True):
        # mean and std come from float32 sums (std: E[x^2] - E[x]^2): absolute errors scale with sqrt(E[x^2])
        tol = 1e-6 * rms if name in ("mean", "std") and np.isfinite(rms) else 1e-12
        assert g == pytest.approx(w, rel=rtol, abs=tol, nan_ok=True), name


def special_tensor() -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(4, 64, 96) * 3 + 0.5  # x: [B, T, D]
    x[0, 0, :5] = float("nan")
    x[1, 2, 3], x[1, 2, 4] = float("inf"), float("-inf")
    x[2, 0, :3] = torch.tensor([7e4, -1e5, 65504.0])  # two beyond fp16's range, one exactly at its max
    x[3, 1, :11] = 0.0
    return x


@pytest.mark.parametrize("case", ["plain", "specials", "all_nan", "bf16", "empty", "int"])
def test_tensor_stats_match_numpy(case: str) -> None:
    torch.manual_seed(1)
    x = {
        "plain": torch.randn(8, 32, 128) + 0.25, "specials": special_tensor(),
        "all_nan": torch.full((3, 5), float("nan")), "bf16": (torch.randn(16, 256) * 40).bfloat16(),
        "empty": torch.empty(0, 4), "int": torch.arange(-5, 20).reshape(5, 5),
    }[case]
    got = tensor_stats(x)
    assert got.shape == (len(STAT_NAMES),) and got.dtype == torch.float64
    assert_stats_close(got.tolist(), x)
    scratch = Scratch()  # the recorder's reusable upcast buffer gives the same bits, twice over
    for _ in range(2):
        torch.testing.assert_close(finalize(raw_stats(x, scratch)[None])[0], got, rtol=0, atol=0, equal_nan=True)
    if x.numel():  # the device path (always used off the CPU) agrees with the CPU fast path
        full = finalize(_full_raw(x.float(), torch.float64)[None])[0]
        assert_stats_close(full.tolist(), x)


def test_parse_steps() -> None:
    sel = parse_steps("1-3, 7,10-")
    assert [s for s in range(1, 13) if sel(s)] == [1, 2, 3, 7, 10, 11, 12]
    assert parse_steps(None)(10**6)
    for bad in ("", "3-1", "0", "a-b", "1,,2", "-4", "1-2-3"):
        with pytest.raises(CrosschipError, match="--probe-steps"):
            parse_steps(bad)
    with pytest.raises(CrosschipError, match="--probe must be"):
        ProbeConfig("everything")


# ---------------------------------------------------------------- recorded runs


def same_rows(a: pa.Table, b: pa.Table) -> bool:
    """Tables equal row by row, bit for bit, NaN equal to NaN (Table.equals says NaN != NaN)."""

    def key(t: pa.Table) -> list[tuple[Any, ...]]:
        return [tuple("nan" if isinstance(v, float) and np.isnan(v) else v for v in r.values()) for r in t.to_pylist()]

    return a.schema == b.schema and key(a) == key(b)


def metrics_rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_recording_files_schema_and_steps_table(make_probe_run: Any, tmp_path: Path) -> None:
    run = make_probe_run(tmp_path / "run", steps=4, save_every=2)
    manifest = store.read_manifest(run)
    assert manifest["schema_version"] == 1 and manifest["mode"] == "stats" and manifest["modules_glob"] == "*"
    assert manifest["stats"] == list(STAT_NAMES) and manifest["steps"] is None
    assert manifest["device"] == "cpu" and manifest["precision"] == "fp32"
    assert manifest["modules"][:3] == ["model", "model.embed_tokens", "model.layers"]
    assert manifest["modules"][-1] == "lm_head"
    names = sorted(p.name for p in (run / "probe").iterdir())
    assert names == ["manifest.json", "stats-00000.parquet", "stats-00001.parquet",
                     "steps-00000.parquet", "steps-00001.parquet"]  # one part per save (steps 2 and 4)

    stats = store.read_stats(run)
    assert stats.schema == store.STATS_SCHEMA
    rows = stats.to_pylist()
    assert sorted({r["step"] for r in rows}) == [1, 2, 3, 4]
    step1 = [r for r in rows if r["step"] == 1]
    outputs = [r for r in step1 if r["kind"] == "output"]
    grads = [r for r in step1 if r["kind"] == "grad"]
    # every module that ran has one output row, in execution order; the ModuleList never runs
    assert [r["order"] for r in outputs] == list(range(len(outputs)))
    assert {r["module"] for r in outputs} == set(manifest["modules"]) - {"model.layers"}
    assert outputs[0]["module"] == "model.embed_tokens" and outputs[-1]["module"] == "lm_head"
    # grad rows: exactly the modules with direct parameters, ordered by registration index
    with_params = {"model.embed_tokens", "lm_head", "model.norm"} | {
        m for m in manifest["modules"] if m.endswith(("_proj", "layernorm"))}
    assert {r["module"] for r in grads} == with_params
    assert all(manifest["modules"][r["order"]] == r["module"] and r["in_nonfinite"] == -1 for r in grads)
    assert all(r["in_nonfinite"] == 0 and r["nan"] == 0 and r["inf"] == 0 for r in outputs)
    lm_head = next(r for r in outputs if r["module"] == "lm_head")
    assert lm_head["numel"] == 2 * 16 * 400  # [B, T, V]

    steps = store.read_steps(run)
    assert steps.schema == store.STEPS_SCHEMA
    metrics = metrics_rows(run)
    assert steps["step"].to_pylist() == [m["step"] for m in metrics] == [1, 2, 3, 4]
    for s, m in zip(steps.to_pylist(), metrics, strict=True):
        assert round(s["loss"], 6) == m["loss"] and round(s["grad_norm"], 6) == m["grad_norm"]
        assert s["lr"] == m["lr"] and np.isnan(s["loss_scale"])  # no scaler in fp32


def test_recorded_stats_equal_a_direct_computation(make_probe_run: Any, tmp_path: Path) -> None:
    """Capture one module's output and one weight's gradient while training; recompute their stats."""
    outputs: list[torch.Tensor] = []
    grads: list[torch.Tensor] = []

    def plant(model: torch.nn.Module) -> None:
        mlp = model.model.layers[1].mlp

        def keep(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            if module.training:  # not the final evaluation
                outputs.append(output.detach().clone())

        mlp.register_forward_hook(keep)
        model.lm_head.weight.register_hook(lambda g: grads.append(g.detach().clone()))

    run = make_probe_run(tmp_path / "run", steps=3, plant=plant)
    rows = store.read_stats(run).to_pylist()
    assert len(outputs) == len(grads) == 3
    for step in (1, 2, 3):
        out_row = next(r for r in rows if (r["step"], r["module"], r["kind"]) == (step, "model.layers.1.mlp", "output"))
        grad_row = next(r for r in rows if (r["step"], r["module"], r["kind"]) == (step, "lm_head", "grad"))
        for row, tensor in ((out_row, outputs[step - 1]), (grad_row, grads[step - 1])):
            assert row["numel"] == tensor.numel()
            assert_stats_close([row[k] for k in STAT_NAMES], tensor)
            assert [row[k] for k in STAT_NAMES] == tensor_stats(tensor).tolist()  # bit-identical: same code


def test_grad_accumulation_merges_calls_into_one_row(make_probe_run: Any, tmp_path: Path) -> None:
    outputs: list[torch.Tensor] = []

    def plant(model: torch.nn.Module) -> None:
        model.model.norm.register_forward_hook(
            lambda m, a, o: outputs.append(o.detach().clone()) if m.training else None)

    run = make_probe_run(tmp_path / "run", steps=2, grad_accum=2, probe_modules="model.norm", plant=plant)
    rows = [r for r in store.read_stats(run).to_pylist() if r["kind"] == "output"]
    assert [r["step"] for r in rows] == [1, 2]
    both = torch.cat([outputs[0], outputs[1]])  # the two micro-batches of step 1
    assert rows[0]["numel"] == both.numel()
    assert_stats_close([rows[0][k] for k in STAT_NAMES], both)


def test_step_and_module_filters(make_probe_run: Any, tmp_path: Path) -> None:
    run = make_probe_run(tmp_path / "run", steps=5, probe_steps="2-3,5", probe_modules="model.layers.*.mlp, lm_head")
    manifest = store.read_manifest(run)
    assert manifest["modules"] == ["model.layers.0.mlp", "model.layers.1.mlp", "lm_head"]
    assert manifest["steps"] == "2-3,5" and manifest["modules_glob"] == "model.layers.*.mlp, lm_head"
    rows = store.read_stats(run).to_pylist()
    assert sorted({r["step"] for r in rows}) == [2, 3, 5]
    assert {(r["module"], r["kind"]) for r in rows} == {
        ("model.layers.0.mlp", "output"), ("model.layers.1.mlp", "output"), ("lm_head", "output"), ("lm_head", "grad")}
    assert store.read_steps(run)["step"].to_pylist() == [1, 2, 3, 4, 5]  # the loss curve covers every step


def test_tensors_mode_saves_only_selected_steps_and_modules(make_probe_run: Any, tmp_path: Path) -> None:
    run = make_probe_run(tmp_path / "run", steps=3, probe="tensors", probe_steps="2",
                         probe_modules="model.layers.1.mlp*")
    files = sorted(p.name for p in (run / "probe" / "tensors").iterdir())
    assert files == ["step-000002.safetensors"]
    tensors = safetensors.torch.load_file(run / "probe" / "tensors" / files[0])
    mlp = ["model.layers.1.mlp", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
           "model.layers.1.mlp.down_proj", "model.layers.1.mlp.act_fn"]
    assert set(tensors) == {f"{m}:output" for m in mlp} | {f"{m}:grad:weight" for m in mlp if m.endswith("proj")}
    assert tensors["model.layers.1.mlp.down_proj:output"].shape == (2, 16, 64)
    assert tensors["model.layers.1.mlp.up_proj:grad:weight"].shape == (128, 64)
    rows = store.read_stats(run).to_pylist()
    assert {r["step"] for r in rows} == {2}
    for r in rows:  # the saved tensors are exactly what the statistics were computed on
        key = f"{r['module']}:output" if r["kind"] == "output" else f"{r['module']}:grad:weight"
        assert [r[k] for k in STAT_NAMES] == tensor_stats(tensors[key]).tolist()


class HookCounter(NullReporter):
    """A reporter that counts the forward hooks on the model at every logged step."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.counts: list[int] = []

    def update(self, step: int, row: dict[str, Any]) -> None:
        assert self.model is not None
        self.counts.append(sum(len(m._forward_hooks) for m in self.model.modules()))


@pytest.mark.parametrize("probe", [None, "stats"])
def test_hooks_only_while_probing_and_removed_after(probe_train_config: Any, tmp_path: Path, probe: str | None) -> None:
    reporter = HookCounter()
    trainer = Trainer(probe_train_config(tmp_path / "run", steps=2, probe=probe, probe_modules="*"), reporter)
    reporter.model = trainer.model
    trainer.run()
    selected = sum(1 for name, _ in trainer.model.named_modules() if name)
    assert reporter.counts == ([0, 0] if probe is None else [selected, selected])
    assert sum(len(m._forward_hooks) for m in trainer.model.modules()) == 0
    assert trainer.recorder is None and (tmp_path / "run" / "probe").exists() == (probe is not None)


def test_resume_truncates_and_continues_the_recording(make_probe_run: Any, tmp_path: Path) -> None:
    full = make_probe_run(tmp_path / "full", steps=6)
    part = make_probe_run(tmp_path / "part", steps=6)
    # as if killed after step 6 was recorded but before its checkpoint (and step 4's) landed
    for step in (4, 6):
        shutil.rmtree(part / f"step-{step:08d}")
    assert complete_steps(part) == [2]
    make_probe_run(part, steps=6, resume=True)
    for read in (store.read_stats, store.read_steps):
        assert same_rows(read(part), read(full)), read.__name__  # no duplicates, nothing missing, bit-identical
    keys = [(r["step"], r["module"], r["kind"]) for r in store.read_stats(part).to_pylist()]
    assert len(keys) == len(set(keys))


def test_overwrite_clears_an_old_recording(make_probe_run: Any, probe_train_config: Any, tmp_path: Path) -> None:
    run = make_probe_run(tmp_path / "run", steps=2)
    Trainer(probe_train_config(run, steps=2, probe=None, overwrite=True), NullReporter()).run()
    assert not (run / "probe").exists()
    with pytest.raises(CrosschipError, match="has no probe recording"):
        store.read_stats(run)


def test_bad_probe_options_are_refused_before_writing(probe_train_config: Any, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cases = [({"probe": "everything"}, "--probe must be"), ({"probe_steps": "9-2"}, "--probe-steps"),
             ({"probe": None, "probe_steps": "1"}, "need --probe"), ({"compile": True}, "--compile"),
             ({"probe_modules": "no.such.*"}, "matches no module"), ({"stop_at": 9}, "stop_at")]
    for overrides, message in cases:
        with pytest.raises(CrosschipError, match=message):
            Trainer(probe_train_config(out, steps=3, **overrides), NullReporter())
    assert not out.exists()


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crosschip.cli", "train", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_cli_probe_options(tiny_corpus: Path, probe_tokenizer_dir: Path, tmp_path: Path) -> None:
    base = ["--data", str(tiny_corpus), "--model", "tiny", "--device", "cpu", "--precision", "fp32", "--steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--warmup-steps", "1", "--tokenizer", str(probe_tokenizer_dir),
            "--threads", "1"]
    for extra, message in ((["--probe", "bogus"], "--probe must be one of stats, tensors"),
                           (["--probe", "stats", "--probe-steps", "x"], "--probe-steps 'x'")):
        bad = cli(*base, "--out", str(tmp_path / "bad"), *extra, cwd=tmp_path)
        assert bad.returncode == 2, bad.stderr
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()
    ok = cli(*base, "--out", str(tmp_path / "run"), "--probe", "stats", "--probe-modules", "lm_head",
             "--probe-steps", "2", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    table = store.read_stats(tmp_path / "run")
    assert set(table["module"].to_pylist()) == {"lm_head"} and set(table["step"].to_pylist()) == {2}
    assert isinstance(table, pa.Table) and table.num_rows == 2  # output + grad
