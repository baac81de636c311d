"""`crosschip convert` killed with SIGKILL at several points leaves a hidden temporary beside DST; the next
convert into that directory removes every one of them and says so (issue 14, item 3)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig

POLL_S = 0.002
SHARD = "1MB"  # many small output shards: a long window in which the output is half-written


@pytest.fixture(scope="module")
def big_src(tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~17 MB fp32 Llama: big enough that convert takes a while, small enough to build in a second."""
    from crosschip import checkpoint, models

    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = models.build_model(config, seed=0)
    root = tmp_path_factory.mktemp("kill")
    return checkpoint.write_checkpoint(root / "src", model, tiny_tokenizer, provenance={"source": "test"})


def _temps(parent: Path, name: str) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-"))


def _convert(src: Path, dst: Path) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "crosschip.cli", "convert", str(src), str(dst), "--to", "fp16", "--shard-size",
            SHARD]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})


def _kill_when(proc: subprocess.Popen[str], ready: Callable[[], bool], temps: Callable[[], list[Path]],
               what: str) -> tuple[list[Path], str]:
    """SIGKILL `proc` once `ready()`; the temporaries it had at that moment, and what it printed on stderr."""
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None, f"convert ended before {what}: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL_S)
    proc.send_signal(signal.SIGKILL)
    left = temps()
    _, err = proc.communicate()
    return left, err


def _shard_bytes(parent: Path, name: str) -> list[int]:
    temps = _temps(parent, name)
    return [f.stat().st_size for f in temps[-1].glob("*.safetensors")] if temps else []


def _removed(stderr: str) -> list[str]:
    return [line.split()[3] for line in stderr.splitlines() if line.startswith("removed stale temporary")]


def test_sigkill_at_several_points_then_the_next_convert_reclaims(big_src: Path, tmp_path: Path) -> None:
    """Three converts into one directory, each killed at its own point (run together, to save time). Every
    temporary a killed one left is removed, and named, by a later convert in that directory: by one still
    running, or by the final one. Nothing hidden stays beside the outputs."""
    points: dict[str, Callable[[str], bool]] = {
        "out-a": lambda name: bool(_temps(tmp_path, name)),  # the temporary directory appears
        "out-b": lambda name: any(_shard_bytes(tmp_path, name)),  # the first output shard is being written
        "out-c": lambda name: len(_shard_bytes(tmp_path, name)) >= 4,  # half the output shards exist
    }
    with ThreadPoolExecutor(len(points)) as pool:
        futures = [pool.submit(_kill_when, _convert(big_src, tmp_path / n), partial(ready, n),
                               partial(_temps, tmp_path, n), n) for n, ready in points.items()]
        killed = [f.result() for f in futures]
    leaked = [str(p) for left, _ in killed for p in left]
    assert len(leaked) == len(points) and not any((tmp_path / n).exists() for n in points)

    done = _convert(big_src, tmp_path / "out-a")
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    removed = _removed(err) + [r for _, killed_err in killed for r in _removed(killed_err)]
    assert sorted(removed) == sorted(leaked), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-a"]  # nothing hidden left beside DST
