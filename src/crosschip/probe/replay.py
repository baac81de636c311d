"""Replay: re-run the steps up to S from the last checkpoint before S, dumping full tensors on the way.

The replay is an ordinary `--resume` of the original run's TrainConfig (read from the checkpoint's
crosschip.json provenance, so the LR schedule, data order, batch shape and thread count are the
run's own) in a new run directory holding a hardlinked copy of that checkpoint. The resume path
restores optimizer, loss scaler, RNG and data position exactly, so on the same device and precision
the replayed steps reproduce the recorded statistics bit for bit (CPU; accelerators only as far as
their kernels are deterministic), and on another device/precision they show what that one computes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from crosschip import checkpoint, devices
from crosschip.errors import CrosschipError
from crosschip.probe import store
from crosschip.train.config import TrainConfig
from crosschip.train.report import NullReporter, Reporter
from crosschip.train.setup import clear_run_dir
from crosschip.train.state import complete_steps, mark_latest, step_dir_name

NEVER = 10**9  # an eval/save interval the replay never reaches: it saves once, at step S
_PATH_FIELDS = ("data", "out", "tokenizer", "cache_dir")


def config_from_provenance(train_config: dict[str, Any]) -> TrainConfig:
    """The TrainConfig a checkpoint was trained with (its `provenance.train_config`)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in train_config.items() if k in names}
    for key in _PATH_FIELDS:
        if values.get(key) is not None:
            values[key] = Path(values[key])
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise CrosschipError(f"checkpoint provenance holds no usable train_config ({e})",
                             "replay a run trained by crosschip train") from e


def _start_step(run_dir: Path, step: int) -> int:
    """c: the last complete checkpoint step before `step`."""
    before = [s for s in complete_steps(run_dir) if s < step]
    if not before:
        have = ", ".join(map(str, complete_steps(run_dir))) or "none"
        raise CrosschipError(
            f"{run_dir} holds no complete checkpoint before step {step} (checkpoints at: {have})",
            "train with --save-every smaller (and --keep larger) so a checkpoint precedes the step",
        )
    return before[-1]


def _link_tree(src: Path, dst: Path) -> None:
    """Hardlink a checkpoint directory (copy where links fail): the replay only ever adds files."""
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise CrosschipError(f"replay output {out} already exists", "pass --overwrite or choose another --out")
        if not out.is_dir():
            raise CrosschipError(f"replay output {out} is not a directory", "choose another --out")
        clear_run_dir(out)  # only what a run writes; anything else there is left alone
    out.mkdir(parents=True, exist_ok=True)


def replay_config(run_dir: Path, step: int, device: str | None = None,
                  precision: str | None = None) -> tuple[TrainConfig, int, str, str]:
    """(original TrainConfig, c, device spec, precision) of a replay of `run_dir` up to `step`."""
    if step < 1:
        raise CrosschipError(f"--step must be >= 1 (got {step})", "pass the step to replay up to")
    start = _start_step(run_dir, step)
    manifest = checkpoint.read_manifest(run_dir / step_dir_name(start) / "model") or {}
    provenance = manifest.get("provenance", {})
    if "train_config" not in provenance:
        raise CrosschipError(f"{run_dir / step_dir_name(start)} records no train_config",
                             "replay a run trained by crosschip train")
    original = config_from_provenance(provenance["train_config"])
    if step > original.steps:
        raise CrosschipError(f"--step {step} is past the run's last step ({original.steps})",
                             f"pass a step in {start + 1}..{original.steps}")
    device = device or original.device
    resolved = devices.resolve_device(device)
    precision = precision or provenance.get("precision") or original.precision
    if precision == "auto":
        precision = devices.default_precision(resolved)
    return original, start, device, precision


def replay(run_dir: Path, step: int, *, device: str | None = None, precision: str | None = None,
           out: Path | None = None, overwrite: bool = False, reporter: Reporter | None = None) -> Path:
    """Replay steps c+1..`step` of `run_dir` (c: last checkpoint before it) with `--probe tensors`.

    Returns the replay run directory (default RUN/replay-step-S-<device>-<precision>); its probe/
    holds the stats and full tensors of the selected modules for those steps.
    """
    from crosschip.train.loop import Trainer

    run_dir = Path(run_dir)
    original, start, device, precision = replay_config(run_dir, step, device, precision)
    tag = str(devices.resolve_device(device)).replace(":", "")
    out = Path(out) if out is not None else run_dir / f"replay-step-{step}-{tag}-{precision}"
    try:
        modules = store.read_manifest(run_dir)["modules_glob"]
    except CrosschipError:
        modules = "*"  # a run recorded without --probe replays with every module probed
    _prepare_out(out, overwrite)
    start_dir = out / step_dir_name(start)
    _link_tree(run_dir / step_dir_name(start), start_dir)
    mark_latest(out, start)
    cfg = dataclasses.replace(
        original, out=out, model=str(start_dir / "model"), tokenizer=None, device=device, precision=precision,
        resume=True, overwrite=False, stop_at=step, probe="tensors", probe_modules=modules,
        probe_steps=f"{start + 1}-{step}", save_every=NEVER, eval_every=NEVER, keep=max(original.keep, 2),
        time_budget_s=None, compile=False,
    )
    Trainer(cfg, reporter or NullReporter()).run()
    return out
