"""Training throughput of crosschip's real loop against a plain fp32 eager PyTorch loop, in one process.

Runs, on the same preset, initial weights, batches, batch size, sequence length and thread count:
  reference          the same Hugging Face model class in a nanoGPT-style loop: fp32 eager,
                     `F.cross_entropy`, grad clipping, torch AdamW with its defaults (not fused)
  crosschip-default  a real `crosschip.train.loop.Trainer`, `--precision auto` and its other defaults
  crosschip-fp32     the same Trainer with `--precision fp32`: what the loop costs at equal precision
and prints tokens/s, model FLOPs/token, achieved TFLOP/s and MFU against matmul peaks measured here.

The runs are interleaved in short rounds (round-robin, rotating order), so a neighbour process that
slows the machine for a while hits every run alike instead of whichever happened to run then. The
headline figure of each run comes from its fastest timed step (as `timeit` does: other load only ever
adds time), with the median and mean step alongside; the matmul peaks are likewise a best-of.

    python benchmarks/train_throughput.py [--preset small] [--steps 16] [--json]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from _common import log, machine, prepare_data, run_benchmark
from crosschip import devices, perf
from crosschip.data import PackedBatches
from crosschip.models import count_parameters
from crosschip.train.config import TrainConfig
from crosschip.train.loop import Trainer

TARGET_RATIO = 1.3  # the bar: crosschip's default CPU settings vs the fp32 eager reference
CORPUS_BYTES = 2_000_000  # ~420k tokens: far more windows than the timed steps use
NEVER = 10**9  # an eval/save interval no benchmark reaches


@dataclass
class Measurement:
    name: str
    precision: str
    tokens_per_step: int
    step_seconds: list[float] = field(default_factory=list)  # wall time of each timed optimizer step
    final_loss: float = float("nan")

    @property
    def tokens_per_s(self) -> float:
        """From the fastest step: on a shared machine other load only adds time to a step."""
        return self.tokens_per_step / max(min(self.step_seconds), 1e-9)

    @property
    def median_tokens_per_s(self) -> float:
        return self.tokens_per_step / max(statistics.median(self.step_seconds), 1e-9)

    @property
    def mean_tokens_per_s(self) -> float:
        return self.tokens_per_step * len(self.step_seconds) / max(sum(self.step_seconds), 1e-9)


class Runner(Protocol):
    result: Measurement

    def run_steps(self, n: int) -> list[float]: ...


class StepClock:
    """A Trainer Reporter: wall-clock stamps (after a device sync) as `run()` starts and after each step.

    The Trainer calls `update` right after logging a step, so the span between two stamps is
    everything the real loop does for one step: data, forward, backward, clip, optimizer, logging.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.begin = 0.0
        self.stamps: dict[int, tuple[float, float]] = {}  # step -> (perf_counter, loss)

    def _now(self) -> float:
        devices.synchronize(self.device)
        return time.perf_counter()

    def start(self, total: int, completed: int) -> None:
        self.begin, self.stamps = self._now(), {}

    def update(self, step: int, row: dict[str, Any]) -> None:
        self.stamps[step] = (self._now(), float(row["loss"]))

    def log(self, message: str) -> None:
        log(f"  {message}")

    def close(self) -> None:
        pass


class TrainerRunner:
    """crosschip's real loop: each `run_steps(n)` extends cfg.steps by n and calls `Trainer.run()`.

    `run()` ends with an eval on its last step and a checkpoint save after it, so the last step of
    each call is not timed and the save falls outside every timed span: n steps give n - 1 timings.
    """

    def __init__(self, name: str, trainer: Trainer) -> None:
        self.trainer = trainer
        self.clock: StepClock = trainer.reporter  # type: ignore[assignment]
        self.result = Measurement(name, trainer.precision, trainer.cfg.tokens_per_step)

    def run_steps(self, n: int) -> list[float]:
        first = self.trainer.step + 1
        self.trainer.cfg.steps = self.trainer.step + n
        self.trainer.run()
        stamps = [self.clock.begin] + [self.clock.stamps[s][0] for s in range(first, first + n - 1)]
        self.result.final_loss = self.clock.stamps[first + n - 1][1]
        return [b - a for a, b in itertools.pairwise(stamps)]


class ReferenceRunner:
    """The nanoGPT-style baseline: same HF class and initial weights, fp32 eager, default torch AdamW."""

    def __init__(self, model_like: torch.nn.Module, init_state: dict[str, torch.Tensor], tokens: Any,
                 args: argparse.Namespace, cfg: TrainConfig, device: torch.device) -> None:
        self.model = type(model_like)(copy.deepcopy(model_like.config))
        self.model.load_state_dict(init_state)
        self.model.to(device).train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
        )
        self.loader = PackedBatches(tokens, args.batch_size, args.seq_len, args.seed)  # the Trainer's order
        self.device, self.grad_clip = device, cfg.grad_clip
        self.result = Measurement("reference", "fp32", args.batch_size * args.seq_len)

    def _step(self) -> torch.Tensor:
        x, y = (t.to(self.device) for t in self.loader.next_batch())
        logits = self.model(x).logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def run_steps(self, n: int) -> list[float]:
        devices.synchronize(self.device)
        stamps = [time.perf_counter()]
        for _ in range(n):
            loss = self._step()
            devices.synchronize(self.device)
            stamps.append(time.perf_counter())
        self.result.final_loss = float(loss.item())
        return [b - a for a, b in itertools.pairwise(stamps)]


def training_parser(doc: str) -> argparse.ArgumentParser:
    """The options every training benchmark shares (this one and probe_overhead.py)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="model preset (default: small)")
    p.add_argument("--steps", type=int, default=16, help="timed optimizer steps per run (default: 16)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run before timing (default: 2)")
    p.add_argument("--round-steps", type=int, default=2, help="timed steps per run per round (default: 2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, npu, ... (default: cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep/reuse corpus, tokenizer and token cache here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def parse_training_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, refusing counts below 1 with argparse's usage error."""
    args = p.parse_args(argv)
    for name in ("steps", "warmup", "round_steps", "batch_size", "seq_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = training_parser(__doc__)
    p.add_argument("--no-fp32", action="store_true", help="skip the crosschip --precision fp32 run")
    return parse_training_args(p, argv)


def build_trainer(
    args: argparse.Namespace, corpus: Path, tok_dir: Path, workdir: Path, precision: str
) -> Trainer:
    """A Trainer on TrainConfig defaults except what the benchmark must pin: sizes, data, eval/save.

    No periodic eval or save (only the one `run()` always does at its end, never timed); log_every=1
    so every step is stamped: on CPU the per-step `.item()` that adds is free (CPU ops are synchronous).
    """
    first_run = args.warmup + 1
    cfg = TrainConfig(
        data=corpus, model=args.preset, out=workdir / "runs" / precision, device=args.device,
        precision=precision, steps=first_run, batch_size=args.batch_size, seq_len=args.seq_len,
        warmup_steps=min(TrainConfig.warmup_steps, first_run), eval_every=NEVER, eval_batches=1,
        save_every=NEVER, keep=1, log_every=1, seed=args.seed, tokenizer=tok_dir, threads=args.threads,
        overwrite=True, cache_dir=workdir / "cache",
    )
    return Trainer(cfg, StepClock(devices.resolve_device(args.device)))


def interleave(runners: list[Runner], args: argparse.Namespace) -> list[Measurement]:
    """Warm every runner up, then time them round-robin, rotating who goes first each round."""
    for r in runners:
        log(f"warming up {r.result.name} ({r.result.precision}) ...")
        r.run_steps(args.warmup + (1 if isinstance(r, TrainerRunner) else 0))
    done, rnd = 0, 0
    while done < args.steps:
        n = min(args.round_steps, args.steps - done)
        order = runners[rnd % len(runners):] + runners[: rnd % len(runners)]
        for r in order:
            r.result.step_seconds += r.run_steps(n + (1 if isinstance(r, TrainerRunner) else 0))
        done, rnd = done + n, rnd + 1
        log(f"round {rnd}: {done}/{args.steps} timed steps per run")
    return [r.result for r in runners]


def measure_peaks(device: torch.device, precisions: set[str], threads: int | None) -> dict[str, float]:
    """Matmul FLOP/s per precision, measured here and now (CPU: with the benchmark's thread count)."""
    n = 2048 if device.type == "cpu" else 8192  # 8192: big enough to saturate an H100/H200-class GPU
    perf.clear_perf_cache()  # measured twice per run (start and end): the later call must re-measure
    dtypes = {p: devices.torch_dtype(p) for p in precisions}
    return {p: perf.measure_matmul_peak(device, dtype, n=n, threads=threads) for p, dtype in dtypes.items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a)


def summarize(
    runs: list[Measurement], peaks: dict[str, float], flops_per_token: float, meta: dict[str, Any]
) -> dict[str, Any]:
    rows = []
    for r in runs:
        rows.append({
            "name": r.name, "precision": r.precision, "tokens_per_step": r.tokens_per_step,
            "timed_steps": len(r.step_seconds), "step_seconds": [round(t, 4) for t in r.step_seconds],
            "tokens_per_s": round(r.tokens_per_s, 1), "median_tokens_per_s": round(r.median_tokens_per_s, 1),
            "mean_tokens_per_s": round(r.mean_tokens_per_s, 1),
            "achieved_tflops": r.tokens_per_s * flops_per_token / 1e12,
            "mfu": perf.mfu(r.tokens_per_s, flops_per_token, peaks[r.precision]), "mfu_vs_peak": r.precision,
            "final_loss": r.final_loss,
        })
    ref = next(r for r in runs if r.name == "reference")
    ratios = {r.name: r.tokens_per_s / ref.tokens_per_s for r in runs if r is not ref}
    median_ratios = {r.name: r.median_tokens_per_s / ref.median_tokens_per_s for r in runs if r is not ref}
    return {
        **meta, "model_flops_per_token": flops_per_token,
        "matmul_peak_tflops": {p: peaks[p] / 1e12 for p in sorted(peaks)}, "runs": rows,
        "ratio_vs_reference": ratios, "median_ratio_vs_reference": median_ratios,
        "target_ratio": TARGET_RATIO,
        "target_met": ratios["crosschip-default"] >= TARGET_RATIO,
    }


def print_table(s: dict[str, Any]) -> None:
    m = s["machine"]
    print(f"{s['preset']} ({s['params'] / 1e6:.2f}M params), batch {s['batch_size']} x seq {s['seq_len']}, "
          f"{s['steps']} timed steps per run after {s['warmup']} warm-up, interleaved, "
          f"{m['cpu_threads']} threads")
    print(f"{m['device']} ({m['device_name']}), torch {m['torch']}, {m['date_utc']}")
    peaks = ", ".join(f"{p} {v:.3f} TFLOP/s" for p, v in s["matmul_peak_tflops"].items())
    print(f"measured matmul peak: {peaks}")
    print(f"model FLOPs/token (6N + attention): {s['model_flops_per_token'] / 1e6:.2f} MFLOP")
    print("tok/s, TFLOP/s and MFU from the fastest timed step; MFU against the same-precision peak")
    print(f"{'run':<20}{'precision':>10}{'tok/s':>10}{'median':>10}{'mean':>10}{'TFLOP/s':>10}{'MFU':>8}")
    for r in s["runs"]:
        print(f"{r['name']:<20}{r['precision']:>10}{r['tokens_per_s']:>10.1f}"
              f"{r['median_tokens_per_s']:>10.1f}{r['mean_tokens_per_s']:>10.1f}"
              f"{r['achieved_tflops']:>10.4f}{r['mfu']:>8.1%}")
    for name, ratio in s["ratio_vs_reference"].items():
        median = s["median_ratio_vs_reference"][name]
        print(f"{name} / reference-fp32: {ratio:.2f}x (median steps: {median:.2f}x)")
    verdict = "met" if s["target_met"] else "NOT met"
    print(f"target: crosschip-default >= {s['target_ratio']}x reference-fp32: {verdict}")


def run_all(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    device = devices.resolve_device(args.device)
    corpus, tok_dir = prepare_data(workdir, CORPUS_BYTES, TrainConfig.vocab_size)
    default = build_trainer(args, corpus, tok_dir, workdir, "auto")
    model = default.model
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    runners: list[Runner] = [
        ReferenceRunner(model, init_state, default.inputs.dataset.train, args, default.cfg, device),
        TrainerRunner("crosschip-default", default),
    ]
    same_init = True
    if not args.no_fp32:
        fp32 = build_trainer(args, corpus, tok_dir, workdir, "fp32")
        same_init = same_weights(init_state, fp32.model.state_dict())
        runners.append(TrainerRunner("crosschip-fp32", fp32))
    precisions = {"fp32", default.precision} | ({"bf16"} & set(devices.train_precisions(device)))
    log(f"measuring matmul peaks ({', '.join(sorted(precisions))}) ...")
    before = measure_peaks(device, precisions, args.threads)
    runs = interleave(runners, args)
    after = measure_peaks(device, precisions, args.threads)
    peaks = {p: max(before[p], after[p]) for p in precisions}  # a ceiling: contention only lowers it
    meta = {
        "preset": args.preset, "params": count_parameters(model), "batch_size": args.batch_size,
        "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup, "round_steps": args.round_steps,
        "same_initial_weights": same_init, "machine": machine(device),
    }
    return summarize(runs, peaks, perf.model_flops_per_token(model, args.seq_len), meta)


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), run_all, print_table)


if __name__ == "__main__":
    sys.exit(main())
