"""Training state kept beside the HF checkpoint: everything an exact resume needs.

Layout of one saved step (written atomically as a whole):
  <out>/step-00000100/model/        the HF hand-off checkpoint (crosschip.json inside)
  <out>/step-00000100/train_state/  optimizer, grad scaler, RNG, data position, counters
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from crosschip.checkpoint import LATEST_POINTER
from crosschip.errors import CrosschipError
from crosschip.fsio import atomic_write_bytes

STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def save_train_state(dir_: Path, state: dict[str, Any]) -> None:
    dir_.mkdir(parents=True, exist_ok=True)
    state = {**state, "python_rng": random.getstate()}
    torch.save(state, dir_ / STATE_FILE)


def load_train_state(dir_: Path) -> dict[str, Any]:
    path = dir_ / STATE_FILE
    if not path.is_file():
        raise CrosschipError(f"{path} is missing: the run cannot resume from it", "start without --resume")
    # weights_only: a state file is data, never code.
    state = torch.load(path, map_location="cpu", weights_only=True)
    random.setstate(state.pop("python_rng"))
    return state


def complete_steps(out: Path) -> list[int]:
    """Steps with a complete saved checkpoint, ascending. Renames are atomic, so any
    `step-N` directory is whole; half-written saves live under hidden temp names."""
    if not out.is_dir():
        return []
    return sorted(int(m.group(1)) for p in out.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())


def mark_latest(out: Path, step: int) -> None:
    atomic_write_bytes(out / LATEST_POINTER, (step_dir_name(step) + "\n").encode())


def prune(out: Path, keep: int) -> None:
    """Drop old step checkpoints and temp leftovers of interrupted saves."""
    for step in complete_steps(out)[:-keep]:
        shutil.rmtree(out / step_dir_name(step), ignore_errors=True)
    for p in out.iterdir():
        if p.name.startswith(".step-") and ".tmp-" in p.name or ".old-" in p.name:
            shutil.rmtree(p, ignore_errors=True)


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
