"""torchrun, DDP and FSDP2 for the training loop: torch.distributed's own engine, glued, never re-written.

A worker learns its place from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, ...); the
process-group backend comes from `devices.dist_backend` (gloo on CPU, nccl on CUDA, hccl on Ascend).
Without torchrun the same code runs as one process with no process group at all.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from crosschip import devices
from crosschip.errors import CrosschipError

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
# A rank that fails outside a collective leaves its peers waiting: keep that wait short, not gloo's 30 min.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)
_LAUNCH = "launch it with torchrun, e.g. torchrun --nproc_per_node 2 -m crosschip train ..."


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a torchrun job; (0, 1, ...) for a plain process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    restart: int = 0  # TORCHELASTIC_RESTART_COUNT: >0 when torchrun restarted the group after a failure
    torchrun: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_env() -> Launch:
    env = os.environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return Launch()
    world = int(env["WORLD_SIZE"])
    return Launch(int(env["RANK"]), world, int(env.get("LOCAL_RANK", "0")),
                  int(env.get("LOCAL_WORLD_SIZE", str(world))), int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
                  torchrun=True)


def resolve_mode(requested: str, launch: Launch) -> str:
    """'auto': DDP under torchrun with several ranks, none otherwise. Refuses modes the launch cannot run."""
    if requested not in PARALLEL_MODES:
        raise CrosschipError(f"unknown --parallel {requested!r}", f"pass one of {', '.join(PARALLEL_MODES)}")
    if requested == "auto":
        return "ddp" if launch.world_size > 1 else "none"
    if requested in ("ddp", "fsdp") and not launch.torchrun:
        raise CrosschipError(f"--parallel {requested} needs a process group, and this process has none", _LAUNCH)
    if requested == "none" and launch.world_size > 1:
        raise CrosschipError(f"--parallel none cannot train on {launch.world_size} ranks",
                             "pass --parallel ddp or --parallel fsdp")
    return requested


def check_precision(mode: str, precision: str) -> None:
    if mode == "fsdp" and precision == "fp16":
        raise CrosschipError("--parallel fsdp cannot train in fp16 (its loss scaler needs whole gradients)",
                             "pass --precision bf16 or fp32, or --parallel ddp")


def default_threads(launch: Launch) -> int:
    """Cores per worker: torchrun sets OMP_NUM_THREADS=1, which leaves cores idle on a CPU-only host."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, launch.local_world_size))


def init_group(device: torch.device, launch: Launch) -> Any:
    """The default process group, its store keys scoped to this torchrun attempt; returns the control group.

    torchrun's agent keeps one store across restarts: without the prefix a restarted worker can read
    a dead worker's gloo address from the previous attempt and fail to connect (seen here, 1 in 3).
    The control group carries the per-step stop flags on the CPU: a gloo group beside nccl/hccl, so
    reading them never waits for the device to finish the step (None: the default group is gloo).
    """
    if not launch.torchrun:
        return None
    if not dist.is_initialized():
        store, rank, world = next(dist.rendezvous("env://", timeout=COLLECTIVE_TIMEOUT))
        store = dist.PrefixStore(f"crosschip/attempt-{launch.restart}", store)
        dist.init_process_group(devices.dist_backend(device), store=store, rank=rank, world_size=world,
                                timeout=COLLECTIVE_TIMEOUT)
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (pickled: only for small control data)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across_ranks(t: torch.Tensor) -> torch.Tensor:
    if not active():
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def any_rank(flags: list[bool], control: Any) -> list[bool]:
    """Element-wise OR over ranks (a CPU tensor on init_group's control group): every rank stops at one step."""
    if not active():
        return flags
    t = torch.tensor([float(f) for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control)
    return [bool(v) for v in t.tolist()]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated decoder layers of an HF causal LM (`model.model.layers` for Llama, DeepSeek-V3, ...)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise CrosschipError(f"{type(model).__name__} has no decoder layer list to shard",
                             "train it with --parallel ddp")
    return layers


def mixed_precision(precision: str) -> Any:
    """bf16 parameters with fp32 gradient reduction (torchtitan's default); plain fp32 otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def wrap(model: nn.Module, mode: str, device: torch.device, precision: str) -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` per decoder block, then the root) over a 1-D DeviceMesh."""
    if mode == "none":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type != "cpu" else None
        return DistributedDataParallel(model, device_ids=ids)
    check_precision(mode, precision)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = mixed_precision(precision)
    # No custom gradient divide factor: gloo has no PREMUL_SUM, and the default (world size) is what we want.
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def autocast_precision(mode: str, precision: str) -> str:
    """FSDP2 casts parameters itself (MixedPrecisionPolicy): autocast on top would only add casts."""
    return "fp32" if mode == "fsdp" else precision


def micro_sync(model: nn.Module, mode: str, last: bool) -> Any:
    """Gradient sync only on the last micro-batch of a step: one all-reduce (or reduce-scatter) per step."""
    if mode == "ddp" and not last:
        return model.no_sync()  # type: ignore[operator]
    if mode == "fsdp":
        model.set_requires_gradient_sync(last)  # type: ignore[operator]
    return contextlib.nullcontext()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (FSDP2's grad norm is one); plain tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
