"""End to end under a real torchrun: two CPU ranks (gloo) of the real Trainer with `--parallel ddp --probe
stats` (tests/probe/torchrun_driver.py), a NaN planted in rank 1's forward at one step and module, and
`crosschip probe ranks` / `probe compare --rank-b` name that rank, step and module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).with_name("torchrun_driver.py")
NAN_RANK, NAN_STEP, NAN_MODULE = 1, 3, "model.layers.1.mlp.down_proj"


def probe_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crosschip.probe.cli", *args], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL, check=False)


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL,
                          check=False)


def assert_traced(run: Path) -> None:
    """`probe ranks` and `probe compare RUN RUN --rank-b 1` name NAN_RANK, NAN_STEP, NAN_MODULE."""
    ranks = probe_cli("ranks", str(run), "--json")
    assert ranks.returncode == 1, ranks.stderr
    doc = json.loads(ranks.stdout)
    first = doc["first"]
    assert (first["finding"], first["rank"], first["step"], first["module"], first["kind"]) == (
        "first NaN/Inf", NAN_RANK, NAN_STEP, NAN_MODULE, "output")
    assert [r["rank"] for r in doc["ranks"]] == [0, 1] and doc["world_size"] == 2
    pair = probe_cli("compare", str(run), str(run), "--rank-b", str(NAN_RANK), "--json")
    assert pair.returncode == 1, pair.stderr
    origin = json.loads(pair.stdout)["run_b"]["nonfinite_origin"]
    assert (origin["step"], origin["module"], origin["kind"]) == (NAN_STEP, NAN_MODULE, "output")


@pytest.mark.slow
def test_torchrun_ddp_nan_traced_to_rank_step_module(tiny_corpus: Path, probe_tokenizer_dir: Path,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = {
        "data": str(tiny_corpus), "model": "tiny", "out": str(out), "device": "cpu", "precision": "fp32",
        "steps": 6, "batch_size": 2, "seq_len": 16, "lr": 3e-3, "warmup_steps": 2, "eval_every": 10**6,
        "eval_batches": 2, "save_every": 3, "log_every": 1, "seed": 0, "tokenizer": str(probe_tokenizer_dir),
        "threads": 1, "probe": "stats", "parallel": "ddp",
        "plant": {"rank": NAN_RANK, "step": NAN_STEP, "module": NAN_MODULE},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    done = torchrun(str(DRIVER), str(tmp_path / "config.json"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert_traced(out)
