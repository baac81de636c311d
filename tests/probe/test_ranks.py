"""Per-rank recordings: every rank records its own statistics, and `probe compare` / `probe ranks` name the rank.

The multi-rank runs here are in one process: one tiny model per rank (same seed: DDP's identical
replicas), each with its own Recorder(rank=r, world_size=2) writing into one run directory, each rank
training on its own batches, and the gradients averaged over the ranks before anyone records them, as
DDP's all-reduce does. A NaN is planted by a forward hook registered on rank 1's model before its
Recorder (so the probe records the planted output as the module's own), at one step and one module.
The FSDP2 test shards a model for real, in a one-process gloo group: its gradients are DTensors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from crosschip.errors import CrosschipError
from crosschip.probe import store
from crosschip.probe.compare import compare_runs
from crosschip.probe.ranks import compare_ranks
from crosschip.probe.record import ProbeConfig, Recorder
from crosschip.probe.stats import STAT_NAMES, tensor_stats
from probekit import run_main

NAN_RANK, NAN_STEP, NAN_MODULE = 1, 3, "model.layers.1.mlp.down_proj"
STEPS = 8
Hook = Callable[..., Any]


SCALED_RANK, SCALED_STEP, SCALED_MODULE = 1, 6, "model.layers.0.mlp"


def at_call(k: int, factor: float) -> Hook:
    """A forward hook that multiplies the module's k-th output (one call per step here: step k) by `factor`."""
    calls = [0]

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        calls[0] += 1
        return output * factor if calls[0] == k else None

    return hook


def train_ranks(make_model: Callable[..., Any], run: Path, *, world_size: int = 2, steps: int = STEPS,
                plant: dict[int, tuple[str, Hook]] | None = None, data_seed: int = 0) -> Path:
    """Emulated DDP: `world_size` replicas, one Recorder each; plant = {rank: (module, hook)} before the Recorder."""
    models = [make_model("tiny", seed=0).train() for _ in range(world_size)]
    for rank, (module, hook) in (plant or {}).items():
        models[rank].get_submodule(module).register_forward_hook(hook)
    recorders = [Recorder(m, ProbeConfig("stats"), run, "cpu", "fp32", rank=r, world_size=world_size)
                 for r, m in enumerate(models)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    data = torch.Generator().manual_seed(data_seed)
    vocab = models[0].config.vocab_size
    try:
        for step in range(1, steps + 1):
            losses = []
            for model, rec in zip(models, recorders, strict=True):
                rec.begin_step(step)
                x = torch.randint(vocab, (2, 16), generator=data)  # x: [B, T], each rank its own batch
                loss = model(input_ids=x, labels=x).loss
                loss.backward()
                losses.append(loss.detach())
            for replicas in zip(*(m.parameters() for m in models), strict=True):  # DDP's all-reduce (mean)
                mean = torch.stack([p.grad for p in replicas]).mean(0)
                for p in replicas:
                    p.grad = mean.clone()
            for model, rec, opt, loss in zip(models, recorders, optimizers, losses, strict=True):
                rec.record_grads()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
                rec.end_step(step, loss, norm, 0.05)
    finally:
        for rec in recorders:
            rec.close()
    return run


@pytest.fixture(scope="module")
def runs(make_model: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("probe-ranks")
    nan = {NAN_RANK: (NAN_MODULE, at_call(NAN_STEP, float("nan")))}
    scaled = {SCALED_RANK: (SCALED_MODULE, at_call(SCALED_STEP, 3.0))}
    return {"clean": train_ranks(make_model, root / "clean"), "nan": train_ranks(make_model, root / "nan", plant=nan),
            "scaled": train_ranks(make_model, root / "scaled", plant=scaled)}


def rows(run: Path, rank: int, kind: str) -> list[dict[str, Any]]:
    return [r for r in store.read_stats(run, rank).to_pylist() if r["kind"] == kind]


def test_each_rank_writes_its_own_recording(runs: dict[str, Path]) -> None:
    run = runs["clean"]
    assert store.ranks(run) == [0, 1]
    top = sorted(p.name for p in (run / "probe").iterdir())
    assert top == ["manifest.json", "rank-00001", "stats-00000.parquet", "steps-00000.parquet"]
    assert sorted(p.name for p in (run / "probe" / "rank-00001").iterdir()) == [
        "manifest.json", "stats-00000.parquet", "steps-00000.parquet"]
    for rank in (0, 1):
        manifest = store.read_manifest(run, rank)
        assert (manifest["rank"], manifest["world_size"], manifest["grad_scope"]) == (rank, 2, "full")
        assert sorted({r["step"] for r in store.read_stats(run, rank).to_pylist()}) == list(range(1, STEPS + 1))
    # all-reduced gradients are the same on both ranks; the outputs are of each rank's own batch
    assert rows(run, 0, "grad") == rows(run, 1, "grad")
    out0, out1 = rows(run, 0, "output"), rows(run, 1, "output")
    assert [(r["step"], r["module"]) for r in out0] == [(r["step"], r["module"]) for r in out1]
    assert all(a["l2"] != b["l2"] for a, b in zip(out0, out1, strict=True) if a["module"] == "lm_head")
    with pytest.raises(CrosschipError, match="no probe recording of rank 2.*0, 1"):
        store.read_stats(run, 2)


def test_single_process_layout_unchanged(make_model: Callable[..., Any], tmp_path: Path) -> None:
    run = train_ranks(make_model, tmp_path / "one", world_size=1, steps=2)
    assert sorted(p.name for p in (run / "probe").iterdir()) == [
        "manifest.json", "stats-00000.parquet", "steps-00000.parquet"]
    manifest = json.loads((run / "probe" / "manifest.json").read_text())
    assert (manifest["rank"], manifest["world_size"], manifest["grad_scope"]) == (0, 1, "full")
    assert store.ranks(run) == [0]
    # a recording from before ranks (no rank keys in its manifest) reads as rank 0 of one process
    for key in ("rank", "world_size", "grad_scope"):
        del manifest[key]
    (run / "probe" / "manifest.json").write_text(json.dumps(manifest))
    assert (store.read_manifest(run)["rank"], store.read_manifest(run)["world_size"]) == (0, 1)
    assert compare_runs(run, run).run_a.world_size == 1
    with pytest.raises(CrosschipError, match="one rank only"):
        compare_ranks(run)


def test_probe_ranks_names_the_rank_step_and_module_of_a_planted_nan(runs: dict[str, Path]) -> None:
    cmp = compare_ranks(runs["nan"])
    first = cmp.first
    assert first is not None and first.finding == "first NaN/Inf"
    assert (first.rank, first.step, first.module, first.kind) == (NAN_RANK, NAN_STEP, NAN_MODULE, "output")
    # the all-reduce carried the NaN into rank 0's gradients at the same step: later in the order
    rank0 = cmp.ranks[0].nonfinite_origin
    assert rank0 is not None and (rank0.step, rank0.kind) == (NAN_STEP, "grad")
    assert [s.loss_nonfinite_step for s in cmp.ranks] == [NAN_STEP + 1, NAN_STEP]
    div = cmp.first_divergence
    assert div is not None and (div.rank, div.step, div.module) == (NAN_RANK, NAN_STEP, NAN_MODULE)
    assert cmp.verdict == "diverged" and "first non-finite loss: rank 1, step 3" in cmp.reasons


def test_probe_ranks_clean_run_matches(runs: dict[str, Path]) -> None:
    """Different batches per rank are no divergence: outputs stay within their usual spread, grads agree."""
    cmp = compare_ranks(runs["clean"])
    assert cmp.verdict == "match" and cmp.first is None and cmp.reasons == []
    (pair,) = cmp.pairs
    assert pair.rank == 1 and pair.compared == ["output", "grad"] and pair.divergent_rows == 0


def test_probe_ranks_names_a_rank_whose_outputs_leave_their_spread(runs: dict[str, Path]) -> None:
    """No NaN: rank 1's MLP output tripled at one step is far beyond the ranks' usual distance (data alone)."""
    cmp = compare_ranks(runs["scaled"])
    assert cmp.first_nonfinite is None and cmp.verdict == "diverged"
    first = cmp.first
    assert first is not None and first.finding == "first divergence"
    assert (first.rank, first.step, first.module, first.kind) == (SCALED_RANK, SCALED_STEP, SCALED_MODULE, "output")
    assert "(noise)" in first.detail


def test_compare_two_ranks_of_one_run_and_one_rank_of_two_runs(runs: dict[str, Path]) -> None:
    ranks = compare_runs(runs["nan"], runs["nan"], rank_a=0, rank_b=NAN_RANK)
    o = ranks.run_b.nonfinite_origin
    assert o is not None and (o.step, o.module, o.kind) == (NAN_STEP, NAN_MODULE, "output")
    assert ranks.run_b.rank == NAN_RANK and ranks.run_b.world_size == 2
    assert any("ranks 0 and 1 of one run" in n for n in ranks.notes)
    # the same rank before and after (here: clean vs planted): identical until the NaN
    moved = compare_runs(runs["clean"], runs["nan"], rank_a=NAN_RANK, rank_b=NAN_RANK)
    d = moved.first_divergence
    assert d is not None and (d.step, d.module, d.statistic) == (NAN_STEP, NAN_MODULE, "nan")
    assert moved.run_a.nonfinite_origin is None and moved.verdict == "diverged"
    assert compare_runs(runs["clean"], runs["nan"], rank_a=0, rank_b=0).first_divergence.kind == "grad"


def test_truncate_clears_every_rank(make_model: Callable[..., Any], tmp_path: Path) -> None:
    run = train_ranks(make_model, tmp_path / "run", steps=4)
    store.truncate(run, 2)
    for rank in (0, 1):
        assert sorted(set(store.read_stats(run, rank)["step"].to_pylist())) == [1, 2]
        assert store.read_steps(run, rank)["step"].to_pylist() == [1, 2]




def test_cli_ranks_and_rank_options(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    nan, clean = str(runs["nan"]), str(runs["clean"])
    code, out, _ = run_main(monkeypatch, capsys, "ranks", nan, "--json")
    doc = json.loads(out)
    assert code == 1 and (doc["first"]["rank"], doc["first"]["step"], doc["first"]["module"]) == (
        NAN_RANK, NAN_STEP, NAN_MODULE)
    code, out, _ = run_main(monkeypatch, capsys, "ranks", nan)
    assert code == 1 and NAN_MODULE in out and "DIVERGED" in out
    assert run_main(monkeypatch, capsys, "ranks", clean)[0] == 0
    code, out, _ = run_main(monkeypatch, capsys, "compare", nan, nan, "--rank-b", "1", "--json")
    assert code == 1 and json.loads(out)["run_b"]["nonfinite_origin"]["module"] == NAN_MODULE
    assert run_main(monkeypatch, capsys, "compare", clean, nan, "--rank-a", "1", "--rank-b", "1")[0] == 1
    for args, fragment in ((["compare", nan, nan, "--rank-b", "5"], "no probe recording of rank 5"),
                           (["ranks", nan, "--reference", "3"], "no probe recording of rank 3")):
        code, out, err = run_main(monkeypatch, capsys, *args)
        assert code == 2 and out == "" and fragment in err and len(err.strip().splitlines()) == 1


def test_fsdp2_records_local_gradient_shards(make_model: Callable[..., Any], tmp_path: Path) -> None:
    """fully_shard for real (one-process gloo group): DTensor grads are recorded as this rank's shard."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = make_model("tiny", seed=0).train()
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        rec = Recorder(model, ProbeConfig("stats", "lm_head,model.layers.0.mlp.*"), tmp_path / "run", "cpu",
                       "fp32")
        x = torch.randint(model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        rec.begin_step(1)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        rec.record_grads()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # a replicated DTensor; no clip
        rec.end_step(1, loss, norm, 0.1)
        rec.close()
        local = model.lm_head.weight.grad.to_local()
    finally:
        dist.destroy_process_group()
    assert store.read_manifest(tmp_path / "run")["grad_scope"] == "local shard"
    row = next(r for r in rows(tmp_path / "run", 0, "grad") if r["module"] == "lm_head")
    assert row["numel"] == local.numel()
    np.testing.assert_allclose([row[k] for k in STAT_NAMES], tensor_stats(local).tolist(), rtol=1e-6)
    assert store.read_steps(tmp_path / "run")["grad_norm"].to_pylist() == pytest.approx([float(norm.to_local())])
