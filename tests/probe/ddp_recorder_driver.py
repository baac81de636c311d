"""Driver for tests/probe/test_torchrun.py: a bare DDP loop (no Trainer) with a Recorder on every rank.

    torchrun --standalone --nproc_per_node 2 tests/probe/ddp_recorder_driver.py RUN_DIR NAN_RANK NAN_STEP MODULE

Every rank builds the `tiny` preset with the same seed, wraps it in DistributedDataParallel (gloo, CPU),
and records the unwrapped module with Recorder(rank=RANK, world_size=WORLD_SIZE); each rank draws its own
batches. Rank NAN_RANK's MODULE returns NaN at step NAN_STEP (a forward hook registered before the
Recorder). Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from crosschip import models
from crosschip.probe.record import ProbeConfig, Recorder

VOCAB, STEPS = 400, 6


def nan_on_call(step: int) -> Any:
    calls = [0]

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        calls[0] += 1
        return output * float("nan") if calls[0] == step else None

    return hook


def main(run: Path, nan_rank: int, nan_step: int, module: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        model = models.build_model(models.get_preset("tiny").build_config(VOCAB, 1, 2, 0), seed=0).train()
        if rank == nan_rank:
            model.get_submodule(module).register_forward_hook(nan_on_call(nan_step))
        ddp = DistributedDataParallel(model)
        rec = Recorder(model, ProbeConfig("stats"), run, "cpu", "fp32", rank=rank, world_size=world_size)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
        for step in range(1, STEPS + 1):
            rec.begin_step(step)
            x = torch.randint(VOCAB, (2, 16), generator=data)  # x: [B, T]
            loss = ddp(input_ids=x, labels=x).loss
            loss.backward()  # DDP all-reduces the gradients here
            rec.record_grads()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            rec.end_step(step, loss.detach(), norm, 0.05)
        rec.close()
    finally:
        dist.destroy_process_group()
    print(f"rank {rank} of {world_size} recorded {STEPS} steps (pid {os.getpid()})")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
