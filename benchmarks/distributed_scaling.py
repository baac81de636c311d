"""Training throughput of 1 process (best thread count) against 2-process DDP and FSDP2 under torchrun.

Every run trains the same preset from the same seed on the same data (the stdlib docstring corpus), with
the same global batch (`--global-batch` sequences per optimizer step over all ranks), sequence length,
precision (fp32 on CPU) and number of timed steps, through crosschip's real `Trainer`, so the loop is
exactly what `crosschip train` runs:
  single  one plain process (no process group), for each thread count in --single-threads and each
          micro-batch in --single-batch-sizes (grad_accum = global batch / micro-batch), all in one
          process; the fastest of them is the baseline
  ddp     `torchrun --nproc_per_node 2` workers, `--parallel ddp`, --batch-size sequences per rank
  fsdp    the same with `--parallel fsdp` (FSDP2 `fully_shard` per decoder block, then the root)

All launches start at once and take turns (class Baton): each turn times one launch's --round-steps
steps while the others sleep, in rotating order, so that on a shared machine every run meets the same
spells of outside load (launched one after another, the ratios measured when the load came).

Communication fraction, measured, not estimated. After its timed steps each torchrun worker replays,
in the same process group and on buffers of the same sizes, exactly the collectives one step issued:
  ddp   an all_reduce per gradient bucket, with the bucket sizes DDP itself reports (its reducer's
        logging data), launched asynchronously and waited for at the end, as the reducer does;
  fsdp  per FSDP unit (each decoder block, and the root holding embeddings, final norm and lm_head):
        an all_gather of its parameters in forward, again in backward (the root keeps its parameters
        after forward, as FSDP2 does), and a reduce_scatter of its gradients; per micro-batch;
  both  plus the scalar all_reduces of the loop (loss mean, stop flags; FSDP2's grad norm).
The fraction is the replay's time over the step's time, fastest of each (as `timeit`: other load only
adds time). It is an upper bound on the communication a step waits for: DDP overlaps its all_reduces
with backward and FSDP2 prefetches the next all_gather, which the replay does not credit.

    python benchmarks/distributed_scaling.py [--preset small] [--global-batch 16] [--steps 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from _common import log, machine, prepare_data, run_benchmark
from crosschip import devices
from crosschip.data import load_tokenizer
from crosschip.data.tokenize import cached_dataset
from crosschip.errors import CrosschipError
from crosschip.models import count_parameters
from crosschip.train import parallel
from crosschip.train.config import TrainConfig
from crosschip.train.loop import Trainer
from train_throughput import NEVER, StepClock, TrainerRunner, parse_training_args, training_parser

CORPUS_BYTES = 2_000_000  # as train_throughput.py: far more windows than the timed steps use
NPROC = 2  # the comparison: two processes on this machine
DIST_MODES = ("ddp", "fsdp")
POLL_S = 0.02  # turn-taking poll: ~250 file reads/s over all waiting processes, no measurable load
COMM_REPEATS = 10  # replays of one step's collectives; the fastest is kept
SCALAR_ALL_REDUCES = {"ddp": 2, "fsdp": 3}  # per logged step: loss mean, stop flags (+ FSDP2's grad norm)


# ---------------------------------------------------------------- the runs (workers)


def train_config(args: argparse.Namespace, workdir: Path, name: str, mode: str, batch_size: int,
                 threads: int | None) -> TrainConfig:
    """What every run shares; only the parallel mode, micro-batch and thread count differ.

    No periodic eval or save (only the one `run()` always does at its end, never timed); log_every=1 so
    every step is stamped (it adds one scalar all_reduce per step under torchrun, counted in the replay).
    """
    first_run = args.warmup + 1
    return TrainConfig(
        data=workdir / "corpus.jsonl", model=args.preset, out=workdir / "runs" / name, device=args.device,
        precision="fp32", steps=first_run, batch_size=batch_size, global_batch=args.global_batch,
        parallel=mode, seq_len=args.seq_len, warmup_steps=min(TrainConfig.warmup_steps, first_run),
        eval_every=NEVER, eval_batches=1, save_every=NEVER, keep=1, log_every=1, seed=args.seed,
        tokenizer=workdir / "tokenizer", threads=threads, overwrite=True, cache_dir=workdir / "cache",
    )


class ThreadedRunner(TrainerRunner):
    """A TrainerRunner that sets its own thread count before each round (the runs share one process)."""

    def __init__(self, name: str, trainer: Trainer, threads: int) -> None:
        super().__init__(name, trainer)
        self.threads = threads

    def run_steps(self, n: int) -> list[float]:
        torch.set_num_threads(self.threads)
        return super().run_steps(n)


def run_record(runner: TrainerRunner, threads: int, **extra: Any) -> dict[str, Any]:
    t = runner.trainer
    return {"name": runner.result.name, "mode": t.mode, "processes": t.world_size, "threads": threads,
            "params": count_parameters(t.model), "micro_batch": t.cfg.batch_size, "grad_accum": t.cfg.grad_accum,
            "tokens_per_step": t.cfg.tokens_per_step * t.world_size, "step_seconds": runner.result.step_seconds,
            "final_loss": runner.result.final_loss, **extra}


class Baton:
    """Turn-taking between the concurrently launched runs, through files in the workdir.

    All runs start at once and wait; the driver names whose turn it is, and a run times its steps only in
    its own turn, so every run sees the same spells of the shared machine's load, as in train_throughput's
    in-process rounds. Waiting is a POLL_S sleep-poll.
    """

    def __init__(self, workdir: Path, role: str, is_main: bool, timeout: float) -> None:
        self.dir, self.role, self.is_main = workdir / "baton", role, is_main
        self.deadline = time.monotonic() + timeout  # a driver that died must not leave workers polling forever

    def ready(self) -> None:
        parallel.barrier()  # every rank is built before the driver starts the turns
        if self.is_main:
            (self.dir / f"ready-{self.role}").touch()

    def wait(self, rnd: int) -> None:
        turn = f"{self.role} {rnd}"
        while not (self.dir / "turn").is_file() or (self.dir / "turn").read_text() != turn:
            if time.monotonic() > self.deadline:
                raise CrosschipError(f"{self.role}: no turn {rnd} from the driver within --timeout", "rerun")
            time.sleep(POLL_S)

    def done(self, rnd: int) -> None:
        parallel.barrier()
        if self.is_main:
            (self.dir / f"done-{self.role}-{rnd}").touch()


def schedule(args: argparse.Namespace) -> list[int]:
    """Steps per turn: the untimed warm-up first, then rounds of --round-steps until --steps are timed."""
    timed = [min(args.round_steps, args.steps - done) for done in range(0, args.steps, args.round_steps)]
    return [args.warmup, *timed]


def take_turns(args: argparse.Namespace, baton: Baton, runners: list[TrainerRunner]) -> None:
    """Each turn runs every runner of this role for that round's steps (+1: the eval/save step, untimed)."""
    baton.ready()
    for rnd, n in enumerate(schedule(args)):
        baton.wait(rnd)
        for r in runners[rnd % len(runners):] + runners[: rnd % len(runners)]:
            times = r.run_steps(n + 1)
            if rnd > 0:
                r.result.step_seconds += times
        baton.done(rnd)


def worker_single(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """Every (threads, micro-batch) candidate of the single process, in one process, rotating each turn."""
    runners: list[ThreadedRunner] = []
    for threads in args.single_threads:
        for micro in args.single_batch_sizes:
            name = f"single-t{threads}-b{micro}"
            cfg = train_config(args, workdir, name, "none", micro, threads)
            runners.append(ThreadedRunner(name, Trainer(cfg, StepClock(devices.resolve_device(args.device))), threads))
    take_turns(args, Baton(workdir, "single", True, args.timeout), list(runners))
    return [run_record(r, r.threads) for r in runners]


def worker_dist(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """One torchrun worker: its timed turns, then (a last turn) one step's collectives replayed alone."""
    cfg = train_config(args, workdir, args.mode, args.mode, args.batch_size, args.threads)
    trainer = Trainer(cfg, StepClock(devices.resolve_device(args.device)))
    trainer.reporter.device = trainer.device  # type: ignore[attr-defined]  # this rank's own GPU, not cuda:0
    runner = TrainerRunner(args.mode, trainer)
    baton = Baton(workdir, args.mode, trainer.rank == 0, args.timeout)
    try:
        take_turns(args, baton, [runner])
        last = len(schedule(args))
        baton.wait(last)
        comm = replay_step_collectives(trainer, COMM_REPEATS)
        rows = [run_record(runner, torch.get_num_threads(), comm=comm)]
        baton.done(last)
        # gloo's worker threads drop finished works (holding Python tensors) under the GIL: let them, before
        # teardown joins those threads while holding the GIL (seen here as a hang in ~ProcessGroupGloo).
        time.sleep(0.5)
    finally:
        parallel.shutdown()
    return rows


# ---------------------------------------------------------------- the collectives of one step, replayed


def ddp_buckets(ddp_model: torch.nn.Module) -> list[int]:
    """Bytes of each gradient bucket, as DDP's reducer reports them (rebuilt after the first step)."""
    data = ddp_model._get_ddp_logging_data()  # type: ignore[operator]
    sizes = data.get("rebuilt_bucket_sizes") or data.get("bucket_sizes") or ""
    return [int(s) for s in str(sizes).split(",") if s.strip()]


def fsdp_units(model: torch.nn.Module, world: int) -> list[int]:
    """Elements of each FSDP unit's all_gather output (padded as FSDP2 shards dim 0): root first, then blocks."""
    def padded(params: list[torch.nn.Parameter]) -> int:
        return sum(-(-p.shape[0] // world) * world * (p.numel() // max(p.shape[0], 1)) for p in params)

    blocks = [list(b.parameters()) for b in parallel.decoder_blocks(model)]
    in_blocks = {id(p) for ps in blocks for p in ps}
    root = [p for p in model.parameters() if id(p) not in in_blocks]
    return [padded(root)] + [padded(ps) for ps in blocks]


def _collective(name: str) -> Any:
    """The collective FSDP2 calls in this torch (`*_single`), else its older public name."""
    older = {"all_gather_single": "all_gather_into_tensor", "reduce_scatter_single": "reduce_scatter_tensor"}
    return getattr(dist, name, None) or getattr(dist, older[name])


def _fsdp_ops(units: list[int], world: int, grad_accum: int, dtype: torch.dtype,
              device: torch.device | None = None) -> list[Any]:
    """Closures issuing FSDP2's per-step collectives in its order, on preallocated buffers."""
    gather, scatter = _collective("all_gather_single"), _collective("reduce_scatter_single")
    full = [torch.zeros(n, dtype=dtype, device=device) for n in units]
    shard = [torch.zeros(n // world, dtype=dtype, device=device) for n in units]

    def ag(i: int) -> Any:
        return lambda: gather(full[i], shard[i])

    def rs(i: int) -> Any:  # SUM: gloo has no AVG, so FSDP2 divides around a SUM there too
        return lambda: scatter(shard[i], full[i], op=dist.ReduceOp.SUM)

    blocks = range(1, len(units))
    ops: list[Any] = []
    for micro in range(grad_accum):
        ops += [ag(0)] + [ag(i) for i in blocks]  # forward: the root, then every block
        ops += [ag(i) for i in reversed(blocks)]  # backward: blocks were resharded after forward
        if micro == grad_accum - 1:
            ops += [rs(i) for i in reversed(blocks)] + [rs(0)]
    return ops


def replay_step_collectives(trainer: Trainer, repeats: int) -> dict[str, Any]:
    """Time one step's collectives alone (same group, same sizes); fastest and median of `repeats`."""
    world, mode, accum = trainer.world_size, trainer.mode, trainer.cfg.grad_accum
    dtype = next(trainer.model.parameters()).dtype
    scalar = torch.zeros(2, device=trainer.device)
    scalars = [lambda: dist.all_reduce(scalar)] * SCALAR_ALL_REDUCES[mode]
    if mode == "ddp":
        buckets = [torch.zeros(b // dtype.itemsize, dtype=dtype, device=trainer.device)
                   for b in ddp_buckets(trainer.step_model)]
        sizes = [b.numel() for b in buckets]

        def run() -> None:  # the reducer launches each bucket's all_reduce async, then waits for them all
            for w in [dist.all_reduce(b, async_op=True) for b in buckets]:
                w.wait()
            devices.synchronize(trainer.device)
            for op in scalars:
                op()
        count = len(buckets)
    else:
        sizes = fsdp_units(trainer.model, world)
        ops = _fsdp_ops(sizes, world, accum, dtype, trainer.device) + scalars
        count = len(ops) - len(scalars)

        def run() -> None:
            for op in ops:
                op()
            devices.synchronize(trainer.device)
    times = []
    for _ in range(repeats + 1):  # the first replay warms the buffers and gloo's connections: untimed
        dist.barrier()
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"method": "replay", "collectives": count, "scalar_all_reduces": len(scalars),
            "unit_or_bucket_elements": sizes, "bytes_per_element": dtype.itemsize,
            "seconds": times[1:], "fastest_s": min(times[1:]), "median_s": statistics.median(times[1:])}


# ---------------------------------------------------------------- the driver: launch, collect, compare


def worker_command(args: argparse.Namespace, workdir: Path, role: str, result: Path) -> list[str]:
    """This script again, as a worker: a plain process, or NPROC torchrun workers (--standalone: own port)."""
    own = [__file__, "--worker", role, "--workdir", str(workdir), "--result", str(result)]
    passed = ["--preset", args.preset, "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--round-steps", str(args.round_steps), "--batch-size", str(args.batch_size),
              "--seq-len", str(args.seq_len), "--global-batch", str(args.global_batch), "--device", args.device,
              "--seed", str(args.seed), "--single-threads", ",".join(map(str, args.single_threads)),
              "--single-batch-sizes", ",".join(map(str, args.single_batch_sizes))]
    if args.threads is not None:
        passed += ["--threads", str(args.threads)]
    if role == "single":
        return [sys.executable, *own, *passed]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NPROC),
            *own, *passed]


def wait_for(path: Path, procs: dict[str, subprocess.Popen], deadline: float) -> None:
    """Until `path` exists; a launch that died, or the deadline, ends the benchmark with its reason."""
    while not path.exists():
        for role, proc in procs.items():
            if proc.poll() not in (None, 0):
                raise CrosschipError(f"the {role} launch exited with status {proc.returncode}", "see its log above")
        if time.monotonic() > deadline:
            raise CrosschipError(f"no {path.name} within --timeout", "pass a larger --timeout")
        time.sleep(POLL_S)


def conduct(args: argparse.Namespace, workdir: Path, roles: list[str]) -> dict[str, subprocess.Popen]:
    """Start every launch at once, wait until all are built, then hand out the turns in rotating order."""
    baton = workdir / "baton"
    shutil.rmtree(baton, ignore_errors=True)
    baton.mkdir()
    procs = {}
    for role in roles:
        cmd = worker_command(args, workdir, role, workdir / f"result-{role}.json")
        log(f"launching {role}: {' '.join(cmd[1:4])} ...")
        procs[role] = subprocess.Popen(cmd, stdout=sys.stderr)  # stderr: --json keeps stdout to itself
    deadline = time.monotonic() + args.timeout
    for role in roles:
        wait_for(baton / f"ready-{role}", procs, deadline)
    turns = len(schedule(args)) + 1  # + the dist runs' replay of one step's collectives
    for rnd in range(turns):
        for role in roles[rnd % len(roles):] + roles[: rnd % len(roles)]:
            if rnd == turns - 1 and role == "single":
                continue
            (baton / "turn.tmp").write_text(f"{role} {rnd}")
            os.replace(baton / "turn.tmp", baton / "turn")  # a worker never reads a half-written turn
            wait_for(baton / f"done-{role}-{rnd}", procs, deadline)
        log(f"turn {rnd + 1}/{turns} done")
    return procs


def run_all(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    corpus, tok_dir = prepare_data(workdir, CORPUS_BYTES, TrainConfig.vocab_size)
    cfg = train_config(args, workdir, "tokens", "none", args.batch_size, None)
    # The token dataset once, here: the launches start together and would otherwise all build it at once.
    cached_dataset(corpus, load_tokenizer(tok_dir), workdir / "cache", cfg.val_fraction, cfg.seed)
    roles = ["single", *args.modes]
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs = conduct(args, workdir, roles)
        for role, proc in procs.items():
            if proc.wait(timeout=args.timeout) != 0:
                raise CrosschipError(f"the {role} launch exited with status {proc.returncode}", "see its log above")
    finally:
        for proc in procs.values():  # only on failure: a finished launch has exited already
            if proc.poll() is None:
                proc.terminate()  # SIGTERM: torchrun's agent passes it on to its workers; SIGKILL would not
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    rows = [row for role in roles for row in json.loads((workdir / f"result-{role}.json").read_text())]
    params = next(r["params"] for r in rows if r["mode"] == "none")
    meta = {"preset": args.preset, "params": params, "global_batch": args.global_batch, "seq_len": args.seq_len,
            "steps": args.steps, "warmup": args.warmup, "round_steps": args.round_steps, "precision": "fp32",
            "load_average": list(os.getloadavg()), "machine": machine(devices.resolve_device(args.device))}
    meta["machine"]["cores"] = len(os.sched_getaffinity(0))
    return summarize(rows, meta)


def summarize(rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    for r in rows:
        steps, tokens = r["step_seconds"], r["tokens_per_step"]
        r["tokens_per_s"] = round(tokens / min(steps), 1)
        r["median_tokens_per_s"] = round(tokens / statistics.median(steps), 1)
        if "comm" in r:
            c = r["comm"]
            c["fastest_s"], c["median_s"] = min(c["seconds"]), statistics.median(c["seconds"])
            c["fraction"] = c["fastest_s"] / min(steps)
            c["median_fraction"] = c["median_s"] / statistics.median(steps)
    singles = [r for r in rows if r["mode"] == "none"]
    best = max(singles, key=lambda r: r["tokens_per_s"])
    for r in rows:
        r["ratio_vs_best_single"] = r["tokens_per_s"] / best["tokens_per_s"]
        r["median_ratio_vs_best_single"] = r["median_tokens_per_s"] / best["median_tokens_per_s"]
    return {**meta, "best_single": best["name"], "runs": rows,
            "no_loss_vs_best_single": {r["mode"]: r["ratio_vs_best_single"] >= 1.0
                                       for r in rows if r["mode"] != "none"}}


def print_table(s: dict[str, Any]) -> None:
    m = s["machine"]
    print(f"{s['preset']} ({s['params'] / 1e6:.2f}M params), fp32, global batch {s['global_batch']} x seq "
          f"{s['seq_len']} = {s['global_batch'] * s['seq_len']} tokens/step, {s['steps']} timed steps per run "
          f"after {s['warmup']} warm-up, all launched at once, timed in turns of {s['round_steps']} steps")
    print(f"{m['device']} ({m['device_name']}), {m['cores']} cores, torch {m['torch']}, {m['date_utc']}, "
          f"load average {', '.join(f'{x:.1f}' for x in s['load_average'])}")
    print("tok/s from the fastest timed step (median step in brackets); comm = one step's collectives "
          "replayed alone / step time (upper bound: overlap not credited)")
    print(f"{'run':<18}{'procs x thr':>12}{'micro x acc':>12}{'tok/s':>9}{'(median)':>10}{'vs best 1p':>11}"
          f"{'comm':>8}{'(median)':>10}")
    for r in s["runs"]:
        c = r.get("comm")
        comm = f"{c['fraction']:>8.1%}{c['median_fraction']:>10.1%}" if c else f"{'-':>8}{'':>10}"
        print(f"{r['name']:<18}{r['processes']:>6} x {r['threads']:<3}{r['micro_batch']:>6} x {r['grad_accum']:<3}"
              f"{r['tokens_per_s']:>9.1f}{r['median_tokens_per_s']:>10.1f}{r['ratio_vs_best_single']:>10.2f}x"
              f"{comm}")
    print(f"best single process: {s['best_single']}")
    for r in s["runs"]:
        if r["mode"] != "none":
            verdict = "no loss" if s["no_loss_vs_best_single"][r["mode"]] else "SLOWER"
            print(f"{r['mode']}: {r['ratio_vs_best_single']:.2f}x the best single process, fastest steps "
                  f"({r['median_ratio_vs_best_single']:.2f}x by median steps): {verdict}")


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = training_parser(__doc__)
    p.set_defaults(steps=8, round_steps=2)
    p.add_argument("--global-batch", type=int, default=16, help="sequences per optimizer step, all ranks (16)")
    p.add_argument("--modes", default="ddp,fsdp", help="torchrun modes to run (default: ddp,fsdp)")
    p.add_argument("--single-threads", type=int_list, default=None, help="single-process thread counts "
                   "(default: 1 and every core)")
    p.add_argument("--single-batch-sizes", type=int_list, default=None, help="single-process micro-batches "
                   "(default: --batch-size and the global batch)")
    p.add_argument("--timeout", type=float, default=900, help="seconds the whole comparison may take (default: 900)")
    p.add_argument("--worker", choices=("single", *DIST_MODES), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parse_training_args(p, argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if not set(args.modes) <= set(DIST_MODES):
        p.error(f"--modes takes {', '.join(DIST_MODES)}")
    cores = len(os.sched_getaffinity(0))
    args.single_threads = args.single_threads or sorted({1, cores})
    args.single_batch_sizes = args.single_batch_sizes or sorted({args.batch_size, args.global_batch})
    args.mode = args.worker
    return args


def worker_main(args: argparse.Namespace) -> int:
    rows = worker_single(args, args.workdir) if args.worker == "single" else worker_dist(args, args.workdir)
    if parallel.launch_env().is_main:
        args.result.write_text(json.dumps(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args)
    return run_benchmark(args, run_all, print_table)


if __name__ == "__main__":
    sys.exit(main())
