"""Probe overhead: optimizer-step time of crosschip's real training loop with `--probe stats` on all modules
and without it, in one process.

Two `crosschip.train.loop.Trainer`s on the same preset, initial weights, batches, batch size, sequence
length, precision and thread count, one with `probe="stats"` (every module, every step: forward-output
and gradient statistics, one device-to-host copy per step) and one without. As in
benchmarks/train_throughput.py, the runs are interleaved in short rounds with a rotating order, each
step is stamped by the Trainer's reporter (after a device sync), and the headline figure of each run is
its fastest step (other load on the machine only ever adds time), with the median alongside. Evals and
checkpoint saves (where the probe also flushes its parquet parts) fall outside every timed step.

    python benchmarks/probe_overhead.py [--preset small] [--steps 16] [--device cpu] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from _common import log, machine, prepare_data, run_benchmark
from crosschip import devices
from crosschip.models import count_parameters
from crosschip.probe import store
from crosschip.train.config import TrainConfig
from crosschip.train.loop import Trainer
from train_throughput import (
    NEVER,
    Measurement,
    StepClock,
    TrainerRunner,
    parse_training_args,
    training_parser,
)

TARGET_RATIO = 1.2  # the bar: probed step time / plain step time
CORPUS_BYTES = 2_000_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = training_parser(__doc__)
    p.add_argument("--precision", default="fp32", help="fp32, bf16, fp16 or auto (default: fp32)")
    return parse_training_args(p, argv)


def build_trainer(args: argparse.Namespace, corpus: Path, tok_dir: Path, workdir: Path, probe: str | None) -> Trainer:
    """The same Trainer twice; only `probe` differs. No periodic eval/save; every step is stamped."""
    first_run = args.warmup + 1
    cfg = TrainConfig(
        data=corpus, model=args.preset, out=workdir / "runs" / (probe or "plain"), device=args.device,
        precision=args.precision, steps=first_run, batch_size=args.batch_size, seq_len=args.seq_len,
        warmup_steps=first_run, eval_every=NEVER, eval_batches=1, save_every=NEVER, keep=1, log_every=1,
        seed=args.seed, tokenizer=tok_dir, threads=args.threads, overwrite=True, cache_dir=workdir / "cache",
        probe=probe,
    )
    return Trainer(cfg, StepClock(devices.resolve_device(args.device)))


def interleave(runners: list[TrainerRunner], args: argparse.Namespace) -> list[Measurement]:
    """Warm both up, then time them round-robin, rotating who goes first; n+1 steps give n timings."""
    for r in runners:
        log(f"warming up {r.result.name} ...")
        r.run_steps(args.warmup + 1)
    done, rnd = 0, 0
    while done < args.steps:
        n = min(args.round_steps, args.steps - done)
        for r in runners[rnd % 2:] + runners[: rnd % 2]:
            r.result.step_seconds += r.run_steps(n + 1)
        done, rnd = done + n, rnd + 1
        log(f"round {rnd}: {done}/{args.steps} timed steps per run")
    return [r.result for r in runners]


def run_all(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    corpus, tok_dir = prepare_data(workdir, CORPUS_BYTES, TrainConfig.vocab_size)
    plain = build_trainer(args, corpus, tok_dir, workdir, None)
    probed = build_trainer(args, corpus, tok_dir, workdir, "stats")
    runners = [TrainerRunner("plain", plain), TrainerRunner("probe-stats", probed)]
    plain_s, probe_s = interleave(runners, args)
    rows = store.read_stats(probed.out)
    fastest = min(probe_s.step_seconds) / min(plain_s.step_seconds)
    median = statistics.median(probe_s.step_seconds) / statistics.median(plain_s.step_seconds)
    return {
        "preset": args.preset, "params": count_parameters(plain.model), "batch_size": args.batch_size,
        "seq_len": args.seq_len, "precision": plain.precision, "steps": args.steps, "warmup": args.warmup,
        "probed_modules": len(store.read_manifest(probed.out)["modules"]), "probe_rows": rows.num_rows,
        "probe_rows_per_step": rows.num_rows / max(1, len(set(rows["step"].to_pylist()))),
        "plain_step_s": {"fastest": min(plain_s.step_seconds), "median": statistics.median(plain_s.step_seconds),
                         "all": [round(t, 4) for t in plain_s.step_seconds]},
        "probe_step_s": {"fastest": min(probe_s.step_seconds), "median": statistics.median(probe_s.step_seconds),
                         "all": [round(t, 4) for t in probe_s.step_seconds]},
        "ratio": fastest, "median_ratio": median, "target_ratio": TARGET_RATIO, "target_met": fastest <= TARGET_RATIO,
        "machine": machine(devices.resolve_device(args.device)),
    }


def print_table(s: dict[str, Any]) -> None:
    m = s["machine"]
    print(f"{s['preset']} ({s['params'] / 1e6:.2f}M params), batch {s['batch_size']} x seq {s['seq_len']}, "
          f"{s['precision']}, {s['steps']} timed steps per run after {s['warmup']} warm-up, interleaved, "
          f"{m['cpu_threads']} threads")
    print(f"{m['device']} ({m['device_name']}), torch {m['torch']}, {m['date_utc']}")
    print(f"probe: {s['probed_modules']} modules, {s['probe_rows_per_step']:.0f} stats rows per step")
    print(f"{'run':<14}{'fastest step s':>16}{'median step s':>16}")
    for name, key in (("plain", "plain_step_s"), ("probe stats", "probe_step_s")):
        print(f"{name:<14}{s[key]['fastest']:>16.4f}{s[key]['median']:>16.4f}")
    verdict = "met" if s["target_met"] else "NOT met"
    print(f"ratio probe/plain: {s['ratio']:.3f}x (median steps: {s['median_ratio']:.3f}x); "
          f"target <= {s['target_ratio']}x: {verdict}")


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), run_all, print_table)


if __name__ == "__main__":
    sys.exit(main())
