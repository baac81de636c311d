"""Recording: per-module forward-output and gradient statistics of a training run, cheap enough to leave on.

A `Recorder` hooks the selected modules (canonical names from `model.named_modules()`, fnmatch globs).
On a selected step each hook reduces the module's first output tensor to a raw stats row on the
device (crosschip.probe.stats); `record_grads` does the same for the gradients of each module's own
parameters; `end_step` finalizes the rows and copies them, with the steps' loss/grad norm/loss scale,
to the host in ONE transfer. Unselected steps cost nothing but a device-side stack of three scalars,
which rides along with the next transfer. msprobe hooks per API call and synchronizes per tensor
(4.5x-38x per step, /work/shared/reference/parity-tools.md); this is per module and per step.

Under torchrun every rank runs its own Recorder (`rank`, `world_size`) and writes its own recording
(store.probe_dir(run, rank)); the manifest says which rank and how the gradients were seen:
  grad_scope "full"         plain tensors: the whole gradient (under DDP already all-reduced, so the
                            same on every rank)
  grad_scope "local shard"  DTensor parameters (FSDP2): statistics of this rank's shard (`to_local()`),
                            numel = the shard's; no rank ever waits for another to record
Forward outputs are recorded as the rank computed them (under DDP each rank sees its own batch).
"""

from __future__ import annotations

import fnmatch
import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crosschip.errors import CrosschipError
from crosschip.fsio import atomic_write_bytes
from crosschip.probe import store
from crosschip.probe.stats import (
    COUNT_STATS,
    FLOAT_STATS,
    STAT_NAMES,
    Scratch,
    acc_dtype,
    finalize,
    merge_raw,
    raw_stats,
)
from crosschip.train.parallel import full_value

MODES = ("stats", "tensors")
_RANGE = re.compile(r"(\d+)(-(\d+)?)?")
_STEPS_HELP = "use steps and inclusive ranges like 1-100,200,300- (300- = from 300 on)"
_ROW = len(STAT_NAMES) + 1  # stats + in_nonfinite
_STEP_VALUES = 3  # loss, grad_norm, loss_scale


@dataclass(frozen=True)
class StepSet:
    """The steps --probe-steps selects: inclusive (first, last) ranges, last None = open-ended."""

    ranges: tuple[tuple[int, int | None], ...]

    def __call__(self, step: int) -> bool:
        return any(lo <= step and (hi is None or step <= hi) for lo, hi in self.ranges)


def parse_steps(spec: str | None) -> StepSet:
    """'1-100,200,300-' -> StepSet; None selects every step. CrosschipError on bad syntax."""
    if spec is None:
        return StepSet(((1, None),))
    ranges = []
    for item in spec.split(","):
        m = _RANGE.fullmatch(item.strip())
        if m is None:
            raise CrosschipError(f"--probe-steps {spec!r}: cannot read {item.strip()!r}", _STEPS_HELP)
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
        if lo < 1 or (hi is not None and hi < lo):
            raise CrosschipError(f"--probe-steps {spec!r}: {item.strip()!r} is empty (steps start at 1)", _STEPS_HELP)
        ranges.append((lo, hi))
    return StepSet(tuple(ranges))


@dataclass(frozen=True)
class ProbeConfig:
    """What to record: `mode` stats|tensors, module globs (comma-separated), steps (parse_steps syntax)."""

    mode: str
    modules: str = "*"
    steps: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise CrosschipError(f"--probe must be one of {', '.join(MODES)} (got {self.mode!r})",
                                 "pass --probe stats (statistics) or --probe tensors (statistics + full tensors)")
        if not self.patterns:
            raise CrosschipError("--probe-modules is empty", "pass a glob like '*' or 'model.layers.*.mlp'")
        parse_steps(self.steps)

    @property
    def patterns(self) -> list[str]:
        return [p.strip() for p in self.modules.split(",") if p.strip()]


def select_modules(model: torch.nn.Module, modules: str) -> list[tuple[str, torch.nn.Module]]:
    """Modules whose canonical name matches any comma-separated glob, in registration order (root skipped)."""
    patterns = [p.strip() for p in modules.split(",") if p.strip()]
    chosen = [(n, m) for n, m in model.named_modules() if n and any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        example = next((n for n, _ in model.named_modules() if n), "")
        raise CrosschipError(f"--probe-modules {modules!r} matches no module of the model",
                             f"use canonical names from model.named_modules(), e.g. {example!r}, or '*'")
    return chosen


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor in a module's inputs or outputs (tensor, tuple/list, dict or HF ModelOutput)."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def _empty_columns(schema: Any) -> dict[str, list[Any]]:
    return {name: [] for name in schema.names}


@functools.cache
def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(x: Any) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(x, dtensor)


def local(x: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (no communication); any other tensor as is."""
    return x.to_local() if is_dtensor(x) else x


def grad_scope(params: list[list[tuple[str, torch.nn.Parameter]]]) -> str:
    """'local shard' when the recorded parameters are DTensors (FSDP2), else 'full'."""
    return "local shard" if any(is_dtensor(p) for group in params for _, p in group) else "full"


class Recorder:
    """Hooks `model`'s selected modules and writes `rank`'s recording under `run_dir`.

    Use begin_step, record_grads, end_step, flush, close; every rank calls them at the same points."""

    def __init__(self, model: torch.nn.Module, cfg: ProbeConfig, run_dir: Path, device: torch.device | str,
                 precision: str, scaler: Any = None, *, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise CrosschipError(f"probe recorder: rank {rank} is outside world size {world_size}",
                                 "pass the RANK and WORLD_SIZE torchrun sets (0 <= rank < world_size)")
        self.cfg, self.run_dir, self.device = cfg, Path(run_dir), torch.device(device)
        self.scaler, self.rank, self.world_size = scaler, rank, world_size
        self.selects = parse_steps(cfg.steps)
        self.modules = select_modules(model, cfg.modules)
        self.acc = acc_dtype(self.device)
        self._scratch = Scratch() if self.device.type == "cpu" else None
        self._params = [list(m.named_parameters(recurse=False)) for _, m in self.modules]
        self._no_scale = torch.full((), math.nan, device=self.device)
        self._zero = torch.zeros(1, dtype=self.acc, device=self.device)
        self._no_input = torch.full((1,), -1.0, dtype=self.acc, device=self.device)
        self._scale = self._no_scale
        self._pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, [loss, grad_norm, scale])
        self._stats = _empty_columns(store.STATS_SCHEMA)
        self._steps = _empty_columns(store.STEPS_SCHEMA)
        self._reset(None)
        store.write_manifest(self.run_dir, {
            "mode": cfg.mode, "modules_glob": cfg.modules, "steps": cfg.steps, "stats": list(STAT_NAMES),
            "device": str(self.device), "precision": precision, "modules": [n for n, _ in self.modules],
            "rank": rank, "world_size": world_size, "grad_scope": grad_scope(self._params),
        }, rank)
        self._handles = [m.register_forward_hook(self._hook(n), with_kwargs=True) for n, m in self.modules]

    def _reset(self, step: int | None) -> None:
        self._step = step  # the step being recorded; None between steps and on unselected steps
        self._rows: list[torch.Tensor] = []  # raw stats + in_nonfinite, [_ROW] each
        self._meta: list[list[Any]] = []  # [module, kind, order, numel] per row
        self._first: dict[str, int] = {}  # module -> its output row this step
        self._calls = 0
        self._tensors: dict[str, torch.Tensor] = {}

    # ---------------------------------------------------------------- per step

    def begin_step(self, step: int) -> None:
        """Arm the hooks if `step` (1-based, the optimizer step about to run) is selected."""
        self._reset(step if self.selects(step) else None)

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if self._step is not None:
                self._record_output(name, args, kwargs, output)
            # returns None: the output passes on untouched

        return hook

    @torch.no_grad()
    def _input_nonfinite(self, x: torch.Tensor | None) -> torch.Tensor:
        if x is None or not x.is_floating_point() or x.numel() == 0:
            return self._zero
        # CPU: a finite sum proves a finite input (one cheap pass); reading it back is free there.
        if x.device.type == "cpu" and math.isfinite(float(x.detach().sum())):
            return self._zero
        return (x.numel() - torch.count_nonzero(torch.isfinite(x))).reshape(1).to(self.acc)

    def _record_output(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        out = first_tensor(output)
        if out is None:
            return
        out = local(out)  # plain already under DDP and FSDP2; a DTensor only under tensor parallelism
        inp = first_tensor(args)
        inp = first_tensor(kwargs) if inp is None else inp
        inp = None if inp is None else local(inp)
        row = torch.cat([raw_stats(out, self._scratch), self._input_nonfinite(inp)])
        index = self._first.get(name)
        if index is None:  # first call this step
            self._first[name] = len(self._rows)
            self._rows.append(row)
            self._meta.append([name, "output", self._calls, out.numel()])
        else:  # called again (gradient accumulation): one row over all calls
            self._rows[index] = merge_raw(self._rows[index], row)
            self._meta[index][3] += out.numel()
        self._calls += 1
        if self.cfg.mode == "tensors":
            key, k = f"{name}:output", 1
            while key in self._tensors:
                key, k = f"{name}:output:{k}", k + 1
            self._tensors[key] = out.detach().to("cpu", copy=True).contiguous()

    def record_grads(self) -> None:
        """train_step calls it every step after backward and unscaling, before clipping and the optimizer step.

        Keeps the step's loss scale (every step, for the steps table) and, on a selected step, reduces the
        gradients of each selected module's own parameters (summed over micro-batches, unscaled).
        """
        self._scale = self._current_scale()
        if self._step is None:
            return
        for order, ((name, _), params) in enumerate(zip(self.modules, self._params, strict=True)):
            # FSDP2: the sharded parameters hold DTensor grads; this rank's shard, without communication
            grads = [(pname, local(p.grad)) for pname, p in params if p.grad is not None]
            if not grads:
                continue
            raw = raw_stats(grads[0][1], self._scratch)
            for _, g in grads[1:]:
                raw = merge_raw(raw, raw_stats(g, self._scratch))
            self._rows.append(torch.cat([raw, self._no_input]))
            self._meta.append([name, "grad", order, sum(g.numel() for _, g in grads)])
            if self.cfg.mode == "tensors":
                for pname, g in grads:
                    self._tensors[f"{name}:grad:{pname}"] = g.detach().to("cpu", copy=True).contiguous()

    def _current_scale(self) -> torch.Tensor:
        if self.scaler is None:
            return self._no_scale
        # GradScaler keeps its scale as a device tensor; get_scale() would .item() it (a sync every step).
        scale = getattr(self.scaler, "_scale", None)
        if isinstance(scale, torch.Tensor):
            return scale.detach().reshape(()).float().clone()
        return torch.tensor(float(self.scaler.get_scale()), device=self.device)

    @torch.no_grad()
    def end_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        """Queue the step's loss/grad norm/scale; on a selected step copy everything to the host, once."""
        # A DTensor norm (FSDP2's clip_grad_norm_): end_step runs on every rank at every step, so the
        # collective full_value may need is reached by all ranks in the same order.
        loss, grad_norm = full_value(loss), full_value(grad_norm)
        values = torch.stack([loss.detach().float().reshape(()), grad_norm.detach().float().reshape(()),
                              self._scale])
        self._pending.append((step, lr, values))
        if self._step is None:
            return
        rows = finalize(torch.stack(self._rows)) if self._rows else torch.empty(0, _ROW, dtype=self.acc)
        host = self._to_host(rows.to(self.device))
        for meta, values_ in zip(self._meta, host.tolist(), strict=True):
            self._append_stats(step, meta, values_)
        if self.cfg.mode == "tensors" and self._tensors:
            import safetensors.torch

            data = safetensors.torch.save(self._tensors, metadata={"step": str(step)})
            atomic_write_bytes(store.tensors_path(self.run_dir, step, self.rank), data)
        self._reset(None)

    def _to_host(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [M, _ROW] plus every queued step's values, in one device-to-host copy; returns rows."""
        queued = torch.stack([v for _, _, v in self._pending]).to(self.acc)  # [P, 3]
        flat = torch.cat([rows.flatten(), queued.flatten()]).cpu()
        n = rows.numel()
        for (step, lr, _), (loss, grad_norm, scale) in zip(self._pending, flat[n:].view(-1, _STEP_VALUES).tolist(),
                                                           strict=True):
            for key, value in zip(store.STEPS_SCHEMA.names, (step, loss, grad_norm, lr, scale), strict=True):
                self._steps[key].append(value)
        self._pending = []
        return flat[:n].view(-1, _ROW)

    def _append_stats(self, step: int, meta: list[Any], values: list[float]) -> None:
        name, kind, order, numel = meta
        cols = self._stats
        for key, value in (("step", step), ("module", name), ("kind", kind), ("order", order),
                           ("in_nonfinite", int(values[-1])), ("numel", numel)):
            cols[key].append(value)
        for i, key in enumerate(FLOAT_STATS):
            cols[key].append(values[i])
        for i, key in enumerate(COUNT_STATS, start=len(FLOAT_STATS)):
            cols[key].append(int(values[i]))

    # ---------------------------------------------------------------- files

    def flush(self) -> None:
        """Write what was recorded since the last flush as new parquet parts (called at every save)."""
        if self._pending:
            self._to_host(torch.empty(0, _ROW, dtype=self.acc, device=self.device))
        for kind, cols in (("stats", self._stats), ("steps", self._steps)):
            if cols["step"]:
                store.write_part(self.run_dir, kind, cols, self.rank)
                cols.update(_empty_columns(store.STATS_SCHEMA if kind == "stats" else store.STEPS_SCHEMA))

    def close(self) -> None:
        """Flush and remove every hook (idempotent)."""
        if not self._handles:
            return
        try:
            self.flush()
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []
