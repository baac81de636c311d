"""The training loop: AdamW, warmup + cosine, clipping, accumulation, autocast, exact resume.

One process, or torchrun workers under DDP or FSDP2 (crosschip.train.parallel): every rank runs the
same steps on its slice of one global batch, saves its shard of the state (DCP), and stops at the
same step; rank 0 alone logs and writes the hand-off checkpoint.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from crosschip import devices
from crosschip.checkpoint import write_checkpoint
from crosschip.data.loader import PackedBatches, eval_batches
from crosschip.errors import CrosschipError
from crosschip.train import parallel
from crosschip.train.config import TrainConfig
from crosschip.train.report import Reporter
from crosschip.train.schedule import lr_at
from crosschip.train.setup import (
    METRICS_FILE,
    PROBE_DIR,
    RunInputs,
    check_inputs,
    open_out_dir,
    prepare_inputs,
    resume_step_of,
)
from crosschip.train.state import (
    complete_steps,
    load_legacy_state,
    load_meta,
    load_rng,
    load_sharded,
    mark_latest,
    prune,
    save_train_state,
    step_dir_name,
)

if TYPE_CHECKING:
    from crosschip.probe.record import Recorder


@dataclass
class TrainResult:
    checkpoint: Path
    steps: int
    tokens_seen: int
    train_loss: float
    val_loss: float | None
    tokens_per_s: float
    elapsed_s: float
    device: str
    precision: str
    interrupted_by: str | None = None  # SIGINT, SIGTERM or 'time budget'
    history: list[dict[str, Any]] = field(default_factory=list)


@contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """SIGINT/SIGTERM only set a flag: the loop saves at the next step boundary, then exits."""
    received: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, _frame: received.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def make_optimizer(model: PreTrainedModel, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with no weight decay on norms and biases (1-D tensors), fused where the device allows."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = devices.fused_adamw_supported(device)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # x, y: [B, S]; y is x shifted by one, so the loss is plain next-token cross-entropy.
    logits = model(input_ids=x).logits  # [B, S, V]
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, loader: PackedBatches,
    cfg: TrainConfig, device: torch.device, precision: str, after_unscale: Callable[[], None] | None = None,
    mode: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over grad_accum micro-batches; returns (this rank's mean loss, grad norm).

    Each micro-batch loss is divided by grad_accum and DDP/FSDP2 average over ranks, so the gradient
    is the mean over the whole global batch. `after_unscale` (the probe's gradient statistics) sees
    the true gradients: summed over the micro-batches, unscaled, before clipping and the step.
    """
    total = torch.zeros((), device=device)
    amp = parallel.autocast_precision(mode, precision)
    for micro in range(cfg.grad_accum):
        x, y = (t.to(device, non_blocking=True) for t in loader.next_batch())
        with parallel.micro_sync(model, mode, last=micro == cfg.grad_accum - 1):
            with devices.autocast(device, amp):
                loss = lm_loss(model, x, y) / cfg.grad_accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if after_unscale is not None:
        after_unscale()
    grad_norm = parallel.full_value(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: Any, cfg: TrainConfig, device: torch.device, precision: str) -> float:
    """Mean next-token loss over a fixed set of validation windows (nats per token)."""
    model.eval()
    losses = []
    for x, y in eval_batches(tokens, cfg.batch_size, cfg.seq_len, cfg.eval_batches):
        with devices.autocast(device, precision):  # every rank scores the same windows: FSDP2 needs them all
            losses.append(lm_loss(model, x.to(device), y.to(device)).item())
    model.train()
    return sum(losses) / max(1, len(losses))


class Trainer:
    """Holds a run's state; `run()` trains to cfg.steps or until a signal, saving as it goes."""

    def __init__(self, cfg: TrainConfig, reporter: Reporter) -> None:
        cfg.validate()
        self.cfg, self.reporter = cfg, reporter
        self.launch = parallel.launch_env()
        self.rank, self.world_size = self.launch.rank, self.launch.world_size
        self.mode = parallel.resolve_mode(cfg.parallel, self.launch)  # bad input fails on every rank alike
        if self.launch.torchrun:
            self.device = devices.local_device(cfg.device, self.launch.local_rank)
        else:
            self.device = devices.resolve_device(cfg.device)
        self.precision = devices.default_precision(self.device) if cfg.precision == "auto" else cfg.precision
        devices.check_precision(self.device, self.precision)
        parallel.check_precision(self.mode, self.precision)
        threads = cfg.threads or (parallel.default_threads(self.launch) if self.launch.torchrun else None)
        if threads:
            torch.set_num_threads(threads)
        self.out = Path(cfg.out)
        check_inputs(cfg)  # fail on bad data or model before anything is written
        resume_step = self._resume_step()
        state_dir = self.out / step_dir_name(resume_step) / "train_state" if resume_step is not None else None
        self.meta = load_meta(state_dir) if state_dir is not None else None
        cfg.grad_accum = accumulation(cfg, self.world_size, self.meta, reporter.log)
        self.control = parallel.init_group(self.device, self.launch)  # stop flags travel on the CPU
        self.inputs: RunInputs = prepare_inputs(cfg, resume_step, reporter.log)
        if cfg.probe:
            from crosschip.probe.record import select_modules

            select_modules(self.inputs.model, cfg.probe_modules)  # a glob matching nothing fails before any write
        if self.rank == 0:
            open_out_dir(cfg, resume_step)
        parallel.barrier()
        self.model = self.inputs.model.to(self.device)
        wrapped = parallel.wrap(self.model, self.mode, self.device, self.precision)
        self.step_model = torch.compile(wrapped) if cfg.compile else wrapped
        self.optimizer = make_optimizer(self.model, cfg, self.device)  # after fully_shard: over the shards
        self.scaler = devices.make_grad_scaler(self.device, self.precision)
        self.loader = PackedBatches(self.inputs.dataset.train, cfg.batch_size, cfg.seq_len, cfg.seed, self.rank,
                                    self.world_size, cfg.grad_accum)
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        self.last_loss, self.last_val = float("nan"), None
        self.segments: list[dict[str, Any]] = []
        self.recorder: Recorder | None = None  # exists only inside run(), with --probe
        if state_dir is not None:
            self._restore(state_dir)
        self.segments.append({
            "start_step": self.step, "end_step": self.step, "world_size": self.world_size, "parallel": self.mode,
            "device": self.device.type, "device_name": devices.device_name(self.device), "precision": self.precision,
        })

    def _resume_step(self) -> int | None:
        """--resume's step; after a torchrun restart, the last complete save (or a fresh start) by itself."""
        cfg = self.cfg
        if self.launch.restart > 0 and not cfg.resume:
            steps = complete_steps(self.out)
            cfg.resume, cfg.overwrite = bool(steps), not steps  # the out dir is this run's own first attempt
            where = f"from step {steps[-1]}" if steps else "from the start (no complete save yet)"
            self.reporter.log(f"torchrun restart {self.launch.restart}: resuming {where}")
        return resume_step_of(cfg)

    def _restore(self, state_dir: Path) -> None:
        if self.meta is None:  # a single-process run saved before sharded checkpoints
            if self.mode != "none":
                raise CrosschipError(f"{state_dir} predates sharded checkpoints: it resumes in one process only",
                                     "resume without torchrun, then save once to convert it")
            state = load_legacy_state(state_dir)
            self.optimizer.load_state_dict(state["optimizer"])
            rng, meta = state["rng"], state
        else:
            load_sharded(state_dir, self.model, self.optimizer)
            rng, meta = load_rng(state_dir, self.rank), self.meta
            self.segments = list(meta.get("segments", []))
        if self.scaler is not None and meta.get("scaler") is not None:
            self.scaler.load_state_dict(meta["scaler"])
        if rng is not None:
            devices.set_rng_state(self.device, rng)
        else:  # a rank the saved run did not have: a fresh generator of its own
            torch.manual_seed(self.cfg.seed * 100_003 + meta["step"] * 1009 + self.rank)
        self.loader.load_state_dict(meta["loader"])
        self.step, self.tokens_seen, self.elapsed = meta["step"], meta["tokens_seen"], meta["elapsed"]
        self.last_loss, self.last_val = meta["last_loss"], meta["last_val"]
        if self.rank == 0:
            _truncate_metrics(self.out / METRICS_FILE, self.step)
            if (self.out / PROBE_DIR).is_dir():
                from crosschip.probe.store import truncate

                truncate(self.out, self.step)  # with or without --probe now: recorded steps after it are stale
        parallel.barrier()
        self.reporter.log(f"resumed from {state_dir.parent} at step {self.step}")

    def provenance(self) -> dict[str, Any]:
        dataset = self.inputs.dataset
        return {
            "device": {"kind": self.device.type, "name": devices.device_name(self.device), "spec": self.cfg.device},
            "precision": self.precision,
            "world_size": self.world_size,
            "parallel": self.mode,
            "segments": self.segments,
            "steps": self.step,
            "tokens_seen": self.tokens_seen,
            "data_fingerprint": (dataset.meta.get("source") or {}).get("data_fingerprint"),
            "tokenizer_fingerprint": dataset.meta.get("tokenizer_fingerprint"),
            "dataset": dataset.provenance(),  # the manifest's sha256 and the curation: a model traces to its data
            "model_source": self.inputs.model_source,
            "train_loss": self.last_loss,
            "val_loss": self.last_val,
            "train_config": self.cfg.to_dict(),
        }

    def _meta(self) -> dict[str, Any]:
        return {
            "step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
            "last_loss": self.last_loss, "last_val": self.last_val,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "loader": self.loader.state_dict(), "segments": self.segments,  # the loader state holds the global batch
        }

    def save(self) -> Path:
        """Save weights + training state as one atomic step directory, then point `latest` at it.

        Every rank takes part: the full state dict is gathered to rank 0 (CPU offload, one copy), rank 0
        opens the temp directory and shares its name, all ranks write their DCP shards into it, and rank 0
        renames it into place once all have finished. A kill at any point leaves no complete-looking step.
        """
        self.segments[-1]["end_step"] = self.step
        if self.recorder is not None:
            self.recorder.flush()  # before the checkpoint: a resume from it truncates, never misses, rows
        full = export_state_dict(self.model, self.mode)  # collective under FSDP2
        final = self.out / step_dir_name(self.step)
        rng = devices.get_rng_state(self.device)

        def write_state(tmp: Path | None) -> None:
            tmp = parallel.broadcast_object(tmp)
            meta = self._meta() if self.rank == 0 else None
            save_train_state(tmp / "train_state", self.model, self.optimizer, self.rank, rng, meta)
            parallel.barrier()  # every shard is on disk before rank 0 fsyncs and renames

        if self.rank == 0:
            write_checkpoint(final, self.model, self.inputs.tokenizer, self.provenance(), self.cfg.shard_size,
                             overwrite=True, extra=write_state, state_dict=full)
            mark_latest(self.out, self.step)
            prune(self.out, self.cfg.keep)
        else:
            write_state(None)
        parallel.barrier()  # no rank runs ahead of a save that is not yet in place
        return final / "model"

    def _log_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, window: tuple[float, int],
                  with_eval: bool) -> dict:
        self.last_loss = parallel.mean_across_ranks(loss).item()  # the global batch's loss, on every rank
        t0, tokens0 = window
        dt = max(time.perf_counter() - t0, 1e-9)
        row = {
            "step": self.step, "loss": round(self.last_loss, 6), "lr": lr, "grad_norm": round(grad_norm.item(), 6),
            "tokens_seen": self.tokens_seen, "tokens_per_s": round((self.tokens_seen - tokens0) / dt, 1),
            "elapsed_s": round(self.elapsed, 3),
        }
        if with_eval:
            eval_model = self.step_model if self.mode == "none" else self.model  # DDP's forward would sync
            amp = parallel.autocast_precision(self.mode, self.precision)
            self.last_val = evaluate(eval_model, self.inputs.dataset.val, self.cfg, self.device, amp)
            row["val_loss"] = round(self.last_val, 6)
            row["val_ppl"] = round(float(torch.tensor(self.last_val).exp()), 3)
        if self.rank == 0:
            with open(self.out / METRICS_FILE, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def _over_budget(self, run_t0: float) -> bool:
        budget = self.cfg.time_budget_s
        if budget is None or self.step < self.cfg.min_steps:
            return False
        return time.perf_counter() - run_t0 > budget

    def _one_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        lr = lr_at(self.step, self.cfg.steps, self.cfg.lr, self.cfg.warmup_steps, self.cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        t, rec = time.perf_counter(), self.recorder
        if rec is not None:
            rec.begin_step(self.step + 1)
        loss, grad_norm = train_step(
            self.step_model, self.optimizer, self.scaler, self.loader, self.cfg, self.device, self.precision,
            rec.record_grads if rec is not None else None, self.mode,
        )
        self.step += 1
        if rec is not None:
            rec.end_step(self.step, loss, grad_norm, lr)
        self.tokens_seen += self.cfg.tokens_per_step * self.world_size
        self.elapsed += time.perf_counter() - t
        return loss, grad_norm, lr

    def _open_recorder(self) -> Recorder | None:
        """The probe's recorder (--probe; every rank records its own), opened per run()."""
        if not self.cfg.probe:
            return None
        from crosschip.probe.record import ProbeConfig, Recorder

        probe = ProbeConfig(self.cfg.probe, self.cfg.probe_modules, self.cfg.probe_steps)
        return Recorder(self.model, probe, self.out, self.device, self.precision, self.scaler,
                        rank=self.rank, world_size=self.world_size)

    def run(self) -> TrainResult:
        """Train to cfg.steps (or stop_at); a signal or the time budget ends the run early, always with a save."""
        self.recorder = self._open_recorder()
        try:
            return self._run()
        finally:
            if self.recorder is not None:
                self.recorder.close()  # flushes and removes every hook
                self.recorder = None

    def _run(self) -> TrainResult:
        cfg, history = self.cfg, []
        last = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
        run_t0, tokens0, elapsed0 = time.perf_counter(), self.tokens_seen, self.elapsed
        window = (run_t0, self.tokens_seen)
        stopped_by: str | None = None
        self.reporter.start(last, self.step)
        with stop_on_signals() as received:
            while self.step < last and stopped_by is None:
                loss, grad_norm, lr = self._one_step()
                # One decision for all ranks: a signal or the clock on any rank stops every rank here.
                signalled, out_of_time = parallel.any_rank([bool(received), self._over_budget(run_t0)], self.control)
                final = self.step == last or out_of_time or signalled
                eval_due = final or self.step % cfg.eval_every == 0
                if eval_due or self.step % cfg.log_every == 0:
                    history.append(self._log_step(loss, grad_norm, lr, window, with_eval=eval_due))
                    self.reporter.update(self.step, history[-1])
                    window = (time.perf_counter(), self.tokens_seen)
                if signalled:
                    stopped_by = signal.Signals(received[0]).name if received else "signal on another rank"
                elif out_of_time:
                    stopped_by = "time budget"
                elif self.step % cfg.save_every == 0 and not final:
                    self.save()
            path = self.save()
        self.reporter.close()
        step_time = max(self.elapsed - elapsed0, 1e-9)  # optimizer steps only: no eval, no saves
        return TrainResult(
            path, self.step, self.tokens_seen, self.last_loss, self.last_val,
            (self.tokens_seen - tokens0) / step_time, time.perf_counter() - run_t0, str(self.device),
            self.precision, stopped_by, history,
        )


def accumulation(cfg: TrainConfig, world_size: int, meta: dict[str, Any] | None, log: Callable[[str], None]) -> int:
    """Micro-batches per rank and step, so the global batch is --global-batch, or the resumed run's."""
    per_step = cfg.batch_size * world_size
    saved = meta["loader"].get("global_batch") if meta else None
    target = cfg.global_batch if cfg.global_batch is not None else saved
    if target is None:
        return cfg.grad_accum
    if target % per_step:
        raise CrosschipError(
            f"a global batch of {target} sequences is not a multiple of --batch-size {cfg.batch_size} "
            f"x {world_size} rank(s)", "pass a --batch-size and rank count whose product divides it")
    if cfg.global_batch is None and target // per_step != cfg.grad_accum:
        log(f"global batch {target} kept from the saved run: {target // per_step} micro-batch(es) per rank")
    return target // per_step


def export_state_dict(model: torch.nn.Module, mode: str) -> dict[str, torch.Tensor] | None:
    """The full, unsharded weights for the HF checkpoint: rank 0 receives them on the CPU, one copy.

    None in one process: save_pretrained then reads the model's own tensors."""
    if mode == "none":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from: they will be logged again."""
    if not path.is_file():
        return
    from crosschip.fsio import atomic_write_bytes

    # A SIGKILL during a write can leave a torn last line (no newline): it is dropped, not parsed.
    complete = path.read_text().split("\n")[:-1]
    rows = [line for line in complete if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_bytes(path, ("\n".join(rows) + "\n" if rows else "").encode())


def train(cfg: TrainConfig, reporter: Reporter) -> TrainResult:
    try:
        return Trainer(cfg, reporter).run()
    finally:
        parallel.shutdown()
