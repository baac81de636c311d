"""`crosschip demo`: the pipeline on embedded defaults, as a list of steps later stages extend.

Runs offline on a 2-core CPU: the corpus is the running interpreter's standard-library
docstrings (real technical English every machine has), the model is the `small` preset.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from crosschip import demo_data, devices, perf
from crosschip.data.corpus import unigram_entropy
from crosschip.data.noise import Planted
from crosschip.errors import CrosschipError
from crosschip.generate import SamplingParams, generate_text
from crosschip.models import build_model, count_parameters, get_preset
from crosschip.train.config import TrainConfig
from crosschip.train.loop import Trainer, make_optimizer, train_step
from crosschip.train.report import ConsoleReporter

DEMO_PRESET = "small"
DEMO_PROMPT = "Return a new"
QUALITY_BAR_NATS = 1.5  # validation loss at least this far below the corpus's unigram entropy
# The step floor: the demo's config reaches the quality bar by then on a quiet machine or a busy one (a step is the
# same work either way; see README "make demo" for the measured curve). Below it a run is not worth showing.
DEMO_MIN_STEPS = 600
EVAL_SAVE_OVERHEAD = 1.08  # evaluation and saves, on top of the optimizer steps
SLOW_FACTOR = 1.25  # training this much longer than estimated means the machine was busier than calibrated


@dataclass
class DemoContext:
    workdir: Path
    console: Console
    minutes: float
    steps: int | None
    overwrite: bool
    summary: dict[str, Any] = field(default_factory=dict)
    trainer: Trainer | None = None
    planted: list[Planted] = field(default_factory=list)


def demo_train_config(ctx: DemoContext, steps: int) -> TrainConfig:
    """The demo's run: `small` preset, 4k-token BPE, 256-token windows, bf16 autocast where native.

    The time budget is a hard stop if the machine is slower than calibrated, but never before the step floor."""
    return TrainConfig(
        data=ctx.workdir / "tokens", model=DEMO_PRESET, out=ctx.workdir / "run", device="auto",
        precision="auto", steps=steps, batch_size=8, seq_len=256, lr=3e-3, warmup_steps=min(30, steps // 10),
        eval_every=max(1, steps // 4), save_every=max(1, steps // 2), log_every=10, vocab_size=4096,
        eval_batches=16, overwrite=ctx.overwrite, cache_dir=ctx.workdir / "cache",
        time_budget_s=ctx.minutes * 60 * SLOW_FACTOR, min_steps=min(steps, DEMO_MIN_STEPS),
    )


def plan_steps(per_step_s: float, minutes: float) -> tuple[int, int]:
    """(steps to train, steps that fit the time estimate): the fit, but never below the quality floor."""
    fit = int(minutes * 60 / (per_step_s * EVAL_SAVE_OVERHEAD))
    return max(DEMO_MIN_STEPS, fit), fit


def calibrate_step_seconds(cfg: TrainConfig, vocab_size: int, warmup: int = 2, timed: int = 5) -> float:
    """Seconds per optimizer step of this config on this machine, timed on a throwaway model.

    The fastest of several steps: a transient load spike must not shrink the whole run (the time
    budget in the train config stops it if the machine really is slower).
    """
    from crosschip.data.loader import PackedBatches

    device = devices.resolve_device(cfg.device)
    precision = devices.default_precision(device) if cfg.precision == "auto" else cfg.precision
    config = get_preset(cfg.model).build_config(vocab_size, 0, 1, 2)
    model = build_model(config, seed=cfg.seed).to(device).train()
    optimizer = make_optimizer(model, cfg, device)
    rng = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (cfg.tokens_per_step * (warmup + timed) + 1,), generator=rng).numpy()
    loader = PackedBatches(tokens, cfg.batch_size, cfg.seq_len, seed=0)
    times = []
    for i in range(warmup + timed):
        devices.synchronize(device)
        t0 = time.perf_counter()
        train_step(model, optimizer, None, loader, cfg, device, precision)
        devices.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return min(times)


def step_corpus(ctx: DemoContext) -> None:
    folder, ctx.planted = demo_data.build_corpus(ctx.workdir, ctx.console)
    ctx.summary["corpus"] = {"path": str(folder), "bytes": sum(f.stat().st_size for f in folder.iterdir()),
                             "documents": len(ctx.planted)}


def step_curate(ctx: DemoContext) -> None:
    corpus = Path(ctx.summary["corpus"]["path"])
    ctx.summary["curate"] = demo_data.curate_corpus(ctx.workdir, corpus, ctx.planted, ctx.console, ctx.overwrite)


def step_tokenize(ctx: DemoContext) -> None:
    vocab = demo_train_config(ctx, 1).vocab_size
    ctx.summary["tokenize"] = demo_data.tokenize_curated(ctx.workdir, ctx.console, ctx.overwrite, vocab)


def step_train(ctx: DemoContext) -> None:
    steps, plan = ctx.steps, {"requested_steps": ctx.steps}
    if steps is None:
        per_step = calibrate_step_seconds(demo_train_config(ctx, 1), vocab_size=4096)
        steps, fit = plan_steps(per_step, ctx.minutes)
        plan.update(calibrated_s_per_step=per_step, fit_steps=fit, estimate_s=steps * per_step * EVAL_SAVE_OVERHEAD)
        ctx.console.print(f"calibrated: {per_step:.2f} s/step -> {fit} steps fit in ~{ctx.minutes:g} min", end="")
        ctx.console.print(f"; training {steps}, the quality floor (~{plan['estimate_s'] / 60:.1f} min: this machine "
                          "is slower than the estimate assumes)" if steps > fit else "", highlight=False)
    plan["steps"] = steps
    ctx.summary["plan"] = plan
    trainer = Trainer(demo_train_config(ctx, steps), ConsoleReporter(ctx.console))
    ctx.console.print(f"model: {DEMO_PRESET} preset, {count_parameters(trainer.model) / 1e6:.2f}M parameters, "
                      f"{trainer.device} {trainer.precision}")
    result = trainer.run()
    ctx.trainer = trainer
    ctx.summary["train"] = {k: v for k, v in vars(result).items() if k != "history"}


def step_generate(ctx: DemoContext) -> None:
    ckpt = Path(ctx.summary["train"]["checkpoint"])
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    ctx.console.print(f"sample (greedy, from the saved checkpoint): [bold]{DEMO_PROMPT}[/]", end="")
    text = generate_text(ckpt, DEMO_PROMPT, params, "cpu", on_text=lambda s: ctx.console.print(s, end="", markup=False))
    ctx.console.print()
    ctx.summary["sample"] = {"prompt": DEMO_PROMPT, "continuation": text}


def step_summary(ctx: DemoContext) -> None:
    trainer, train = ctx.trainer, ctx.summary["train"]
    assert trainer is not None
    vocab = len(trainer.inputs.tokenizer)
    entropy = unigram_entropy(trainer.inputs.dataset.train, vocab)
    flops = perf.model_flops_per_token(trainer.model, trainer.cfg.seq_len)
    peak = perf.measure_matmul_peak(trainer.device, devices.torch_dtype(trainer.precision))
    achieved = train["tokens_per_s"] * flops
    ctx.summary["report"] = report = {
        "unigram_entropy": entropy,
        "train_loss": train["train_loss"],
        "val_loss": train["val_loss"],
        "val_below_unigram": entropy - train["val_loss"],
        "tokens_per_s": train["tokens_per_s"],
        "flops_per_token": flops,
        "matmul_peak_flops": peak,
        "mfu": perf.mfu(train["tokens_per_s"], flops, peak),
        "checkpoint": train["checkpoint"],
    }
    c = ctx.console
    c.print("\n[bold]summary[/]")
    c.print(f"  corpus unigram entropy  {entropy:.3f} nats/token ({vocab} tokens)")
    c.print(f"  train loss              {train['train_loss']:.3f}")
    below = report["val_below_unigram"]
    c.print(f"  validation loss         {train['val_loss']:.3f}  ({below:.2f} nats below unigram)")
    c.print(f"  throughput              {train['tokens_per_s']:,.0f} tokens/s ({achieved / 1e9:.1f} GFLOP/s)")
    c.print(f"  MFU                     {report['mfu']:.1%} of measured {trainer.precision} matmul peak "
            f"{peak / 1e9:.0f} GFLOP/s")
    c.print(f"  checkpoint              {train['checkpoint']}")
    notes = quality_notes(below, train, ctx.summary.get("plan", {}))
    report["quality_bar"] = {"nats_below_unigram": QUALITY_BAR_NATS, "met": below >= QUALITY_BAR_NATS,
                             "notes": notes}
    verdict = "met" if below >= QUALITY_BAR_NATS else "NOT met"
    c.print(f"  quality bar             {verdict}: validation at least {QUALITY_BAR_NATS} nats below unigram")
    for note in notes:
        c.print(f"  note                    {note}", highlight=False)


def quality_notes(below: float, train: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    """Plain sentences on why the run fell short of the quality bar or of the time estimate (none when neither)."""
    notes = []
    steps, requested = int(train["steps"]), plan.get("requested_steps")
    if below < QUALITY_BAR_NATS:
        if requested is not None and requested < DEMO_MIN_STEPS:
            notes.append(f"--steps {requested} is below the {DEMO_MIN_STEPS} steps the quality bar needs")
        elif train.get("interrupted_by"):
            notes.append(f"training was stopped by {train['interrupted_by']} at step {steps} of {plan.get('steps')}")
        else:
            notes.append(f"{steps} steps were not enough on this data: train longer (--steps or --minutes)")
    estimate = plan.get("estimate_s")
    if estimate and train["elapsed_s"] > estimate * SLOW_FACTOR:
        measured = train["elapsed_s"] / max(steps, 1) / EVAL_SAVE_OVERHEAD
        notes.append(f"this machine was too slow for the time estimate: training took "
                     f"{train['elapsed_s'] / 60:.1f} min against ~{estimate / 60:.1f} min "
                     f"({measured:.2f} s/step against {plan['calibrated_s_per_step']:.2f} calibrated); "
                     "another process was probably using the CPU")
    return notes


DEMO_CONVERSIONS = (  # (output name, target profile, format): what the demo's serving chips run
    ("ascend-310p-fp16", "ascend-310p", "fp16"),
    ("ascend-w8a8", "ascend-910b", "int8-w8a8-dynamic"),
)


DEMO_CHECK_TARGETS = ("ascend-910b", "ascend-310p")


def _check(ctx: DemoContext, ckpt: Path, target: str, label: str) -> dict[str, Any]:
    """`crosschip check CKPT --target T`, one line per target plus its failing checks' fixes."""
    from crosschip.check.run import run_check

    report = run_check(Path(ckpt), target)
    failed = [c for c in report.checks if c.status == "FAIL"]
    warned = [c.check for c in report.checks if c.status == "WARN"]
    verdict = "FAIL" if report.exit_code else "PASS"  # warnings do not fail a check (exit 0)
    ctx.console.print(f"{label} on {target}: {verdict}"
                      + (f" (warnings: {', '.join(warned)})" if warned else ""), highlight=False)
    for c in failed:
        ctx.console.print(f"  FAIL {c.check}: {c.reason}\n    fix: {c.fix}", highlight=False)
    return {"verdict": report.verdict, "failed": [c.check for c in failed], "warned": warned}


def step_check(ctx: DemoContext) -> None:
    """Preflight the trained checkpoint on the demo's serving chips (before conversion)."""
    source = Path(ctx.summary["train"]["checkpoint"])
    ctx.summary["check"] = {t: _check(ctx, source, t, "trained checkpoint (fp32)") for t in DEMO_CHECK_TARGETS}


def step_recheck(ctx: DemoContext) -> None:
    """Preflight each converted checkpoint on its chip: FAIL -> convert -> PASS."""
    ctx.summary["recheck"] = {
        name: _check(ctx, Path(ctx.summary["convert"][name]["path"]), target, name)
        for name, target, _fmt in DEMO_CONVERSIONS
    }


def step_convert(ctx: DemoContext) -> None:
    """Re-encode the trained checkpoint for the demo's serving targets and report the error."""
    from crosschip.convert.pipeline import convert, resolve_options

    source = Path(ctx.summary["train"]["checkpoint"])
    ctx.summary["convert"] = {}
    for name, target, fmt in DEMO_CONVERSIONS:
        out = ctx.workdir / "serve" / name
        record = convert(source, out, resolve_options(fmt, target, None, None, overwrite=ctx.overwrite))
        summary = record["summary"]
        ctx.summary["convert"][name] = {"path": str(out), **{k: v for k, v in record.items() if k != "tensors"}}
        audit = "range audit: no overflow" if fmt == "fp16" and not record["clamped_tensors"] else ""
        ctx.console.print(
            f"{target}: {record['from']} -> {fmt} ({record['layout']}, {record['dtype']}), "
            f"{summary.get('quantized', 0)}/{summary['tensors']} tensors quantized, "
            f"max rel error {summary['max_rel']:.2e} ({summary['worst_tensor']}) {audit}\n  -> {out}",
            highlight=False,
        )


DEMO_SERVED = "ascend-310p-fp16"
# A prompt from the model's own domain (stdlib docstrings): a 5M-parameter docstring model continues a docstring;
# it cannot answer a chat question. Greedy, cut at the first blank line, as long as a docstring sentence.
DEMO_SERVE_PROMPT = "Return the number of"
DEMO_SERVE_STOP = ["\n\n"]
DEMO_SERVE_MAX_TOKENS = 48


def _start_server(ckpt: Path) -> tuple[subprocess.Popen[str], str]:
    """A real `crosschip serve` process on a free loopback port; returns it and its /v1 URL."""
    cmd = [sys.executable, "-m", "crosschip.serve.api", str(ckpt), "--device", "cpu", "--port", "0",
           "--max-batch", "4"]
    # stderr to a file, not a pipe: nobody drains it while the server runs (the child keeps its own handle).
    with tempfile.TemporaryFile(mode="w+") as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True)
        assert proc.stdout is not None
        # stdout says "loaded <model> ..." first, then "serving <model> at http://127.0.0.1:PORT/v1" once ready.
        for line in proc.stdout:
            if line.startswith("serving "):
                return proc, line.rsplit(" at ", 1)[1].strip()
        proc.kill()
        proc.wait()
        errors.seek(0)
        why = errors.read().strip()[-300:]
    raise CrosschipError(f"the demo server did not start: {why}",
                         "run `crosschip serve` on the checkpoint by hand to see why")


def step_serve(ctx: DemoContext) -> None:
    """Serve the converted checkpoint, ask one chat question through the official openai client."""
    from openai import OpenAI

    ckpt = Path(ctx.summary["convert"][DEMO_SERVED]["path"])
    proc, url = _start_server(ckpt)
    try:
        client = OpenAI(base_url=url, api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        answer, finish, _ = ask_served(client, model)
        trained = ctx.summary["train"]["checkpoint"]
        ctx.summary["verify_endpoint"] = _verify(ctx, "endpoint", trained, f"{url}#{model}")
    finally:
        proc.send_signal(signal.SIGTERM)  # drains, then exits
        proc.wait(timeout=60)
    ctx.summary["serve"] = {"checkpoint": str(ckpt), "url": url, "prompt": DEMO_SERVE_PROMPT, "completion": answer,
                            "finish_reason": finish}
    ctx.console.print(f"served {ckpt.name} at {url}\n  completion ({finish}): {DEMO_SERVE_PROMPT}", end="",
                      highlight=False)
    ctx.console.print(answer, markup=False, highlight=False)


def ask_served(client: Any, model: str) -> tuple[str, str, int]:
    """The demo's request through the official client: (the completion, finish reason, tokens generated)."""
    reply = client.completions.create(model=model, prompt=DEMO_SERVE_PROMPT, max_tokens=DEMO_SERVE_MAX_TOKENS,
                                      temperature=0, stop=DEMO_SERVE_STOP)
    return reply.choices[0].text.rstrip(), str(reply.choices[0].finish_reason), int(reply.usage.completion_tokens)


def _verify(ctx: DemoContext, name: str, ref: str, target: str, emulate: str | None = None) -> dict[str, Any]:
    """One `crosschip verify` run, its verdict printed on a line; the report goes to workdir/verify/NAME."""
    from crosschip.verify.run import VerifyOptions, run_verify

    report_dir = ctx.workdir / "verify" / name
    opts = VerifyOptions(ref=ref, target=target, emulate=emulate, report_dir=report_dir, overwrite=ctx.overwrite,
                         max_new_tokens=16)
    report = run_verify(opts)
    dist = report.get("distribution") or {}
    layers = report.get("layers") or {}
    where = f", first failing layer {layers['first_failing']}" if layers.get("first_failing") else ""
    label = f" (emulated {emulate})" if emulate else ""
    measured = (report.get("noise_floor") or {}).get("gate_basis") == "measured"
    gates = "gates measured against the golden conversion" if measured else f"{report['precision']} class gates"
    ctx.console.print(
        f"{name}{label}: {report['verdict'].upper()} ({gates}): "
        f"mean KL {dist.get('kl_mean', float('nan')):.2e} nats, top-1 {dist.get('top1_agreement', float('nan')):.3f}"
        f"{where}\n  -> {report_dir}/report.html",
        highlight=False,
    )
    return {"verdict": report["verdict"], "report": str(report_dir), "kl_mean": dist.get("kl_mean"),
            "top1_agreement": dist.get("top1_agreement"), "first_failing": layers.get("first_failing")}


def step_verify(ctx: DemoContext) -> None:
    """Verify each converted checkpoint against the trained one, in-process (310P fp16 emulated)."""
    trained = ctx.summary["train"]["checkpoint"]
    ctx.summary["verify"] = {}
    for name, target, _fmt in DEMO_CONVERSIONS:
        path = ctx.summary["convert"][name]["path"]
        emulate = target if target == "ascend-310p" else None
        ctx.summary["verify"][name] = _verify(ctx, name, trained, path, emulate)


STEPS: list[tuple[str, Callable[[DemoContext], None]]] = [
    ("corpus", step_corpus),
    ("curate", step_curate),
    ("tokenize", step_tokenize),
    ("train", step_train),
    ("generate", step_generate),
    ("summary", step_summary),
    ("check", step_check),
    ("convert", step_convert),
    ("check again", step_recheck),
    ("verify", step_verify),
    ("serve", step_serve),
]


def run_demo(
    workdir: Path, steps: int | None = None, minutes: float = 6.0, console: Console | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    workdir = Path(workdir)
    if workdir.exists() and any(workdir.iterdir()) and not overwrite:
        raise CrosschipError(f"demo directory {workdir} already exists", "pass --overwrite or --workdir elsewhere")
    workdir.mkdir(parents=True, exist_ok=True)
    if console is None:
        from crosschip.cli_common import make_console

        console = make_console(stderr=True)
    ctx = DemoContext(workdir, console, minutes, steps, overwrite)
    t0 = time.perf_counter()
    for name, fn in STEPS:
        if ctx.console.is_terminal:
            ctx.console.rule(f"[bold]{name}")
        else:  # piped: a rule would fill the full-width console with thousands of dashes
            ctx.console.print(f"\n== {name} ==", highlight=False)
        fn(ctx)
    ctx.summary["elapsed_s"] = time.perf_counter() - t0
    ctx.console.print(f"\ndemo finished in {ctx.summary['elapsed_s'] / 60:.1f} min")
    return ctx.summary
