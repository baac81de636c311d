"""benchmarks/distributed_scaling.py and gpu_check.py's `distributed` check, on the CPU (gloo); no timing asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from crosschip.models import build_model, get_preset

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TIMEOUT = 300  # a hang is a failure


@pytest.fixture(scope="module")
def scaling() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCH))  # the scripts import their siblings (_common, train_throughput) by name
    try:
        import distributed_scaling

        yield distributed_scaling
    finally:
        sys.path.remove(str(BENCH))


def run_script(args: list[str], tmp_path: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CROSSCHIP_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_fsdp_replay_follows_fsdp2_units_and_order(scaling: ModuleType) -> None:
    model = build_model(get_preset("tiny").build_config(512, 1, 2, 0), seed=0)
    units = scaling.fsdp_units(model, world=2)
    blocks = len(model.model.layers)
    assert len(units) == blocks + 1
    assert sum(units) >= sum(p.numel() for p in model.parameters())  # padded to the world size, never less
    for accum, expected in ((1, 3 * blocks + 2), (2, 2 * (2 * blocks + 1) + blocks + 1)):
        ops = scaling._fsdp_ops(units, 2, accum, model.dtype)
        assert len(ops) == expected  # all_gathers per micro-batch, one reduce_scatter per unit per step


def test_gpu_check_distributed_on_cpu_restores_exactly(tmp_path: Path) -> None:
    out = run_script([str(BENCH / "gpu_check.py"), "--device", "cpu", "--check", "distributed", "--json",
                      "--workdir", str(tmp_path / "work")], tmp_path)
    (check,) = out["checks"]
    assert check["status"] == "PASS", check["summary"]
    f = check["figures"]
    assert f["backend"] == "gloo" and f["world_size"] == 1 and f["unequal_after_load"] == []
    assert f["optimizer_tensors"] > 0 and f["next_loss_continued"] == f["next_loss_resumed"]
    assert "RANK" not in os.environ  # the check's env is its own


def test_distributed_scaling_runs_every_mode(tmp_path: Path) -> None:
    out = run_script([str(BENCH / "distributed_scaling.py"), "--preset", "tiny", "--steps", "1", "--warmup", "1",
                      "--seq-len", "32", "--batch-size", "2", "--global-batch", "4", "--single-threads", "1",
                      "--single-batch-sizes", "2", "--json", "--workdir", str(tmp_path / "work")], tmp_path)
    runs = {r["mode"]: r for r in out["runs"]}
    assert set(runs) == {"none", "ddp", "fsdp"}
    assert {r["tokens_per_step"] for r in runs.values()} == {4 * 32}  # the same global batch everywhere
    assert runs["none"]["grad_accum"] == 2 and runs["ddp"]["processes"] == runs["fsdp"]["processes"] == 2
    assert sum(runs["ddp"]["comm"]["unit_or_bucket_elements"]) == runs["ddp"]["params"]
    assert runs["fsdp"]["comm"]["collectives"] == 3 * 2 + 2  # tiny: 2 blocks + the root
    for r in (runs["ddp"], runs["fsdp"]):
        assert r["comm"]["fraction"] > 0


def test_gpu_check_distributed_fails_when_the_reload_restores_nothing(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import crosschip.train.state

    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCH))
    monkeypatch.setattr(crosschip.train.state, "load_sharded", lambda *args: None)
    result = gpu_check.check_distributed(gpu_check.Context(gpu_check.torch.device("cpu"), tmp_path))
    assert result.status == "FAIL" and "not restored exactly" in result.summary
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ
