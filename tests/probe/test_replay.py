"""Replay: re-running a window of steps from the checkpoint before it reproduces the recording exactly (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import safetensors.torch
import torch

from crosschip.errors import CrosschipError
from crosschip.probe import store
from crosschip.probe.replay import replay
from crosschip.probe.stats import STAT_NAMES, tensor_stats


def window(table: pa.Table, first: int, last: int) -> list[dict[str, Any]]:
    rows = table.filter(pc.and_(pc.greater_equal(table["step"], first), pc.less_equal(table["step"], last)))
    return [{k: "nan" if isinstance(v, float) and np.isnan(v) else v for k, v in r.items()} for r in rows.to_pylist()]


def test_replay_reproduces_the_recorded_steps_exactly(make_probe_run: Any, tmp_path: Path) -> None:
    run = make_probe_run(tmp_path / "run", steps=6, save_every=2)  # checkpoints at 2, 4, 6
    out = replay(run, 6)  # from step 4: replays 5 and 6
    assert out == run / "replay-step-6-cpu-fp32"
    manifest = store.read_manifest(out)
    assert manifest["mode"] == "tensors" and manifest["steps"] == "5-6" and manifest["modules_glob"] == "*"

    replayed, original = store.read_stats(out), store.read_stats(run)
    assert sorted(set(replayed["step"].to_pylist())) == [5, 6]
    assert window(replayed, 5, 6) == window(original, 5, 6)  # every statistic, bit for bit
    assert window(store.read_steps(out), 5, 6) == window(store.read_steps(run), 5, 6)  # loss, grad norm, lr

    # the dumped tensors are the ones the statistics describe: a case a kernel team can rerun
    tensors_dir = out / "probe" / "tensors"
    assert sorted(p.name for p in tensors_dir.iterdir()) == ["step-000005.safetensors", "step-000006.safetensors"]
    tensors = safetensors.torch.load_file(tensors_dir / "step-000006.safetensors")
    row = next(r for r in window(original, 6, 6) if (r["module"], r["kind"]) == ("model.layers.0.mlp", "output"))
    saved = tensors["model.layers.0.mlp:output"]
    assert saved.dtype == torch.float32 and saved.shape == (2, 16, 64)
    assert [row[k] for k in STAT_NAMES] == tensor_stats(saved).tolist()
    assert "lm_head:grad:weight" in tensors and "model.embed_tokens:grad:weight" in tensors


def test_replay_of_a_filtered_recording_on_another_precision(make_probe_run: Any, tmp_path: Path) -> None:
    run = make_probe_run(tmp_path / "run", steps=4, save_every=2, probe_modules="model.layers.1.*")
    out = replay(run, 3, precision="bf16", out=tmp_path / "bf16")
    manifest = store.read_manifest(out)
    assert manifest["precision"] == "bf16" and manifest["modules_glob"] == "model.layers.1.*"
    replayed, original = store.read_stats(out), store.read_stats(run)
    assert set(replayed["step"].to_pylist()) == {3}
    assert set(replayed["module"].to_pylist()) <= set(manifest["modules"])
    a = {(r["module"], r["kind"]): r for r in window(replayed, 3, 3)}
    b = {(r["module"], r["kind"]): r for r in window(original, 3, 3)}
    assert a.keys() == b.keys()
    # bf16 autocast computes the same step differently (not bit-identical), yet close to it
    assert any(a[k]["l2"] != b[k]["l2"] for k in a)
    for k in a:
        assert a[k]["l2"] == pytest.approx(b[k]["l2"], rel=0.1), k


def test_replay_refuses_bad_requests(make_probe_run: Any, tmp_path: Path) -> None:
    run = make_probe_run(tmp_path / "run", steps=4, save_every=2)
    with pytest.raises(CrosschipError, match="no complete checkpoint before step 2.*--save-every"):
        replay(run, 2)  # the first checkpoint is step 2's
    with pytest.raises(CrosschipError, match="past the run's last step"):
        replay(run, 5)
    with pytest.raises(CrosschipError, match="--step must be >= 1"):
        replay(run, 0)
    out = replay(run, 4)
    with pytest.raises(CrosschipError, match="already exists"):
        replay(run, 4)
    assert replay(run, 4, overwrite=True) == out
    assert sorted(set(store.read_stats(out)["step"].to_pylist())) == [3, 4]
    with pytest.raises(CrosschipError, match="has no probe recording"):
        store.read_stats(tmp_path)
