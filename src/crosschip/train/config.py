"""Typed configuration of a training run."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from crosschip.errors import CrosschipError


@dataclass
class TrainConfig:
    data: Path
    model: str  # a preset name or a checkpoint directory (continue training / fine-tune)
    out: Path
    device: str = "auto"
    precision: str = "auto"  # fp32 | bf16 | fp16 | auto (the device's fastest exact-enough choice)
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    global_batch: int | None = None  # sequences per optimizer step over all ranks; sets grad_accum per rank
    parallel: str = "auto"  # auto | none | ddp | fsdp (auto: ddp under torchrun with several ranks)
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep: int = 2  # how many step checkpoints to keep
    log_every: int = 10
    seed: int = 0
    vocab_size: int = 4096  # for a newly trained tokenizer
    tokenizer: Path | None = None  # reuse a tokenizer directory instead of training one
    val_fraction: float = 0.05
    compile: bool = False
    threads: int | None = None
    shard_size: str = "2GB"
    overwrite: bool = False
    resume: bool = False
    time_budget_s: float | None = None  # stop early (and save) once training has run this long
    min_steps: int = 0  # the time budget never stops the run before this step (the demo's quality floor)
    cache_dir: Path | None = None  # where raw --data is tokenized to; default $CROSSCHIP_CACHE/datasets
    probe: str | None = None  # record per-module statistics: "stats" or "tensors" (crosschip.probe)
    probe_modules: str = "*"  # comma-separated globs over canonical module names
    probe_steps: str | None = None  # e.g. "1-100,200,300-"; None = every step
    stop_at: int | None = None  # stop after this step; the LR schedule still runs to `steps` (replay)

    def validate(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "save_every", "keep", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                flag = f"--{name.replace('_', '-')}"
                raise CrosschipError(f"{flag} must be >= 1 (got {getattr(self, name)})", f"pass {flag} 1 or more")
        if self.global_batch is not None and self.global_batch < 1:
            raise CrosschipError(f"--global-batch must be >= 1 (got {self.global_batch})", "pass 1 or more")
        if self.global_batch is not None and self.grad_accum != 1:
            raise CrosschipError("--global-batch and --grad-accum both set the accumulation",
                                 "pass only --global-batch (grad_accum = global batch / (batch size x ranks))")
        if not 0 < self.lr < 1:
            raise CrosschipError(f"--lr must be in (0, 1) (got {self.lr})", "pass e.g. --lr 3e-4")
        if self.warmup_steps < 0:
            raise CrosschipError(f"--warmup-steps must be >= 0 (got {self.warmup_steps})", "pass 0 or more")
        if not 0 < self.val_fraction < 0.5:
            raise CrosschipError(f"--val-fraction must be in (0, 0.5) (got {self.val_fraction})", "pass e.g. 0.05")
        if self.resume and self.overwrite:
            raise CrosschipError("--resume and --overwrite contradict each other", "pass only one of them")
        if not 0 <= self.min_steps <= self.steps:
            raise CrosschipError(f"min_steps must be in [0, --steps] (got {self.min_steps})", "lower it")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise CrosschipError(f"stop_at must be in [1, --steps] (got {self.stop_at})", "pass a step of the run")
        self._validate_probe()

    def _validate_probe(self) -> None:
        if self.probe is None:
            if self.probe_modules != "*" or self.probe_steps is not None:
                raise CrosschipError("--probe-modules and --probe-steps need --probe", "add --probe stats")
            return
        from crosschip.probe.record import ProbeConfig

        ProbeConfig(self.probe, self.probe_modules, self.probe_steps)  # raises on bad values
        if self.compile:
            raise CrosschipError("--probe cannot be combined with --compile (its hooks would break the graph)",
                                 "drop --compile while probing")

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len
