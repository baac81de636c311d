"""Training state kept beside the HF checkpoint: everything an exact resume needs.

Layout of one saved step (written atomically as a whole, by every rank into rank 0's temp directory):
  <out>/step-00000100/model/                 the HF hand-off checkpoint (crosschip.json inside)
  <out>/step-00000100/train_state/dcp/       model + optimizer, sharded (torch.distributed.checkpoint)
  <out>/step-00000100/train_state/meta.pt    counters, data position, grad scaler, run segments
  <out>/step-00000100/train_state/rng-R.pt   each rank's generators

DCP stores tensors by fully qualified name with their global shapes, so a state saved by N ranks
(DDP or FSDP2) loads into M ranks in either mode, and into one process without a process group.
"""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from crosschip.checkpoint import LATEST_POINTER
from crosschip.errors import CrosschipError
from crosschip.fsio import atomic_write_bytes
from crosschip.train import parallel

STATE_FILE = "state.pt"  # the single-file state of runs saved before sharded checkpoints
DCP_DIR = "dcp"
META_FILE = "meta.pt"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _rng_file(rank: int) -> str:
    return f"rng-{rank:05d}.pt"


def _model_and_optim(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def save_train_state(dir_: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int,
                     rng: dict[str, torch.Tensor], meta: dict[str, Any] | None) -> None:
    """Called on every rank (DCP is collective); `meta` only from rank 0."""
    import torch.distributed.checkpoint as dcp

    dir_.mkdir(parents=True, exist_ok=True)
    with _single_process_quiet():
        dcp.save(_model_and_optim(model, optimizer), checkpoint_id=dir_ / DCP_DIR, no_dist=not parallel.active())
    torch.save({**rng, "python": random.getstate()}, dir_ / _rng_file(rank))
    if meta is not None:
        torch.save(meta, dir_ / META_FILE)


def load_meta(dir_: Path) -> dict[str, Any] | None:
    """The rank-independent part of a saved state; None for a state saved before sharded checkpoints."""
    path = dir_ / META_FILE
    if not path.is_file():
        if (dir_ / STATE_FILE).is_file():
            return None
        raise CrosschipError(f"{path} is missing: the run cannot resume from it", "start without --resume")
    return torch.load(path, map_location="cpu", weights_only=True)  # weights_only: a state file is data


def load_sharded(dir_: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer from DCP, resharded onto this run's ranks and parallel mode."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _model_and_optim(model, optimizer)
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=dir_ / DCP_DIR, no_dist=not parallel.active())
    # DCP gathers every rank's failure into a CheckpointException (a BaseException, not an Exception).
    except (CheckpointException, RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
        raise CrosschipError(f"the training state in {dir_} does not fit this model ({first})",
                             "resume with the model the run was trained with, or start a new --out") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_rng(dir_: Path, rank: int) -> dict[str, Any] | None:
    """This rank's generators; None when the run was saved with fewer ranks."""
    path = dir_ / _rng_file(rank)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    random.setstate(state.pop("python"))
    return state


def load_legacy_state(dir_: Path) -> dict[str, Any]:
    """state.pt of a single-process run saved before sharded checkpoints."""
    state = torch.load(dir_ / STATE_FILE, map_location="cpu", weights_only=True)
    random.setstate(state.pop("python_rng"))
    return state


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it 'assumes' one process when there is no process group: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield




def complete_steps(out: Path) -> list[int]:
    """Steps with a complete saved checkpoint, ascending. Renames are atomic, so any
    `step-N` directory is whole; half-written saves live under hidden temp names."""
    if not out.is_dir():
        return []
    return sorted(int(m.group(1)) for p in out.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())


def mark_latest(out: Path, step: int) -> None:
    atomic_write_bytes(out / LATEST_POINTER, (step_dir_name(step) + "\n").encode())


def prune(out: Path, keep: int) -> None:
    """Drop old step checkpoints. Temporaries of interrupted saves are fsio's: every atomic writer
    (the next save, `latest`) reclaims those whose owner process is gone."""
    for step in complete_steps(out)[:-keep]:
        shutil.rmtree(out / step_dir_name(step), ignore_errors=True)
