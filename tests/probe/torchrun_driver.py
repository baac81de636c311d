"""Driver for tests/probe/test_torchrun.py: one rank of a real `torchrun` training run with a NaN planted on one rank.

    torchrun --standalone --nproc_per_node 2 tests/probe/torchrun_driver.py CONFIG_JSON

CONFIG_JSON holds TrainConfig's fields (paths as strings; e.g. parallel="ddp", probe="stats") plus
"plant": {"rank": R, "step": S, "module": NAME}. Every rank builds the Trainer from crosschip.train.loop;
rank R alone registers a forward hook on NAME, before run() opens the probe's recorder (so the probe
records the planted output as the module's own), that turns NAME's output into NaN on the S-th training
forward call (one micro-batch per step: step S). Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch


def nan_on_call(step: int) -> Any:
    """A forward hook: NaN output on the `step`-th call made in training mode (evaluation calls don't count)."""
    calls = [0]

    def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None
        calls[0] += 1
        return output * float("nan") if calls[0] == step else None

    return hook


def main(config_path: str) -> None:
    from crosschip.train.config import TrainConfig
    from crosschip.train.loop import Trainer
    from crosschip.train.report import NullReporter

    raw = json.loads(Path(config_path).read_text())
    plant = raw.pop("plant")
    for key in ("data", "out", "tokenizer"):
        if raw.get(key) is not None:
            raw[key] = Path(raw[key])
    trainer = Trainer(TrainConfig(**raw), NullReporter())
    if trainer.rank == plant["rank"]:
        model = getattr(trainer.model, "module", trainer.model)  # DDP wraps the HF module; hook the HF one
        model.get_submodule(plant["module"]).register_forward_hook(nan_on_call(plant["step"]))
    trainer.run()


if __name__ == "__main__":
    main(sys.argv[1])
