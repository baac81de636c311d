"""Probe fixtures: real tiny training runs recorded with `--probe`, through the real Trainer.

`make_probe_run(out, *, seed=0, precision="fp32", steps=6, plant=None, save_every=2, **overrides) -> out`
trains the `tiny` preset on `tiny_corpus` (CPU, one thread, batch 2 x 16 tokens) with `probe="stats"`
on every module and every step, keeping every checkpoint (so any step can be replayed), and returns
the run directory. `overrides` go to TrainConfig (e.g. probe="tensors", probe_steps="2-3", grad_accum=2).

`plant(model)` runs on the Trainer's live model after it is built (seeded init, or the checkpoint a
`model=` override names) and before the first step, i.e. before the probe's hooks are installed:
  - weight edits must be in place (`with torch.no_grad(): layer.weight.mul_(1e4)`), so the optimizer
    keeps training the same parameters; they persist in the saved checkpoints (a replay sees them);
  - forward hooks it registers (e.g. one that returns `output * float("nan")` from step k on) fire
    before the probe's, so the probe records the planted output as the module's own; hooks do not
    survive a checkpoint, so a replay does not see them.
The same seed gives bit-identical runs (CPU, fp32).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

PlantFn = Callable[[torch.nn.Module], None]
MakeProbeRun = Callable[..., Path]
ProbeTrainConfig = Callable[..., Any]


@pytest.fixture(scope="session")
def probe_tokenizer_dir(tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_tokenizer` saved as a directory, so every run shares it (TrainConfig.tokenizer)."""
    out = tmp_path_factory.mktemp("probe_tokenizer")
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def probe_train_config(tiny_corpus: Path, probe_tokenizer_dir: Path) -> ProbeTrainConfig:
    """Factory: the TrainConfig `make_probe_run` trains with (same arguments, without `plant`)."""
    from crosschip.train.config import TrainConfig

    def make(out: Path, *, seed: int = 0, precision: str = "fp32", steps: int = 6, save_every: int = 2,
             **overrides: Any) -> TrainConfig:
        base: dict[str, Any] = dict(
            data=tiny_corpus, model="tiny", out=Path(out), device="cpu", precision=precision, steps=steps,
            batch_size=2, seq_len=16, lr=3e-3, warmup_steps=2, eval_every=10**6, eval_batches=2,
            save_every=save_every, keep=max(2, steps), log_every=1, seed=seed, tokenizer=probe_tokenizer_dir,
            threads=1, probe="stats",
        )
        base.update(overrides)
        return TrainConfig(**base)

    return make


@pytest.fixture(scope="session")
def make_probe_run(probe_train_config: ProbeTrainConfig) -> MakeProbeRun:
    """Factory: train a tiny recorded run into `out` and return `out` (see the module docstring)."""
    from crosschip.train.loop import Trainer
    from crosschip.train.report import NullReporter

    def make(out: Path, *, seed: int = 0, precision: str = "fp32", steps: int = 6, plant: PlantFn | None = None,
             save_every: int = 2, **overrides: Any) -> Path:
        cfg = probe_train_config(out, seed=seed, precision=precision, steps=steps, save_every=save_every,
                                 **overrides)
        trainer = Trainer(cfg, NullReporter())
        if plant is not None:
            plant(trainer.model)
        trainer.run()
        return Path(out)

    return make
