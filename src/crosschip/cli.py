"""The `crosschip` command line: thin wrappers that parse options and call the stage packages."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from crosschip.cli_common import JsonOpt, err, make_app, out, run_app
from crosschip.cli_common import print_json as _print_json
from crosschip.data.cli import data_app
from crosschip.errors import CrosschipError
from crosschip.probe.cli import probe_app

app = make_app("crosschip", "Train where you can, convert for where you must serve, check, verify and serve.")
app.add_typer(data_app, name="data")
app.add_typer(probe_app, name="probe")


def _human_bytes(n: int | None) -> str:
    return "-" if not n else f"{n / 2**30:.1f} GiB"


@app.command()
def devices(json_out: JsonOpt = False) -> None:
    """List the torch devices present on this machine and what they can train in."""
    from crosschip.devices import list_devices

    found = list_devices()
    if json_out:
        return _print_json(found)
    table = Table("device", "name", "memory", "train precisions", "details")
    for d in found:
        details = ""
        if "cores" in d:
            details = f"{d['cores']['physical']} cores / {d['cores']['logical']} threads; {' '.join(d['isa_flags'])}"
        precisions = ", ".join(d["train_precisions"])
        table.add_row(d["device"], d["name"], _human_bytes(d.get("memory_bytes")), precisions, details)
    out.print(table)


@app.command()
def targets(
    name: Annotated[str | None, typer.Argument(help="A target profile, e.g. ascend-310p.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Show the serving/training target profiles (all, or one in full)."""
    from crosschip.targets import list_targets, load_target

    profiles = [load_target(name)] if name else [load_target(n) for n in list_targets()]
    if json_out:
        return _print_json([p.to_dict() for p in profiles] if not name else profiles[0].to_dict())
    if name:
        for key, value in profiles[0].to_dict().items():
            out.print(f"[bold]{key}[/]: {value}", highlight=False)
        return None
    table = Table("target", "device", "memory/dev", "matmul dtypes", "overflow", "serve as", "stacks")
    for p in profiles:
        mem = f"{p.memory_per_device_gib:g} GiB" if p.memory_per_device_gib else "host"
        table.add_row(p.name, p.device_type, mem, ", ".join(p.matmul_dtypes), p.overflow_mode,
                      p.default_serving_format, ", ".join(p.serving_stacks))
    out.print(table)
    return None


@app.command()
def train(
    data: Annotated[Path, typer.Option(help=(
        "A token dataset written by `crosschip data tokenize` (read directly, with its tokenizer), or training "
        "text, tokenized the same way into a cache: .txt, .jsonl/.jsonl.gz (field 'text') or .parquet; file or "
        "dir, or a data curate output. In a dir each .txt file is one document; a single .txt file is split "
        "into documents at blank lines, and one unbroken text is split by position (first 95% train, last 5% "
        "validation, as nanoGPT does)."))],
    model: Annotated[str, typer.Option(help="A preset (tiny, small, base, deepseek-tiny, ...) or a checkpoint dir.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Run directory: step checkpoints, metrics.jsonl.")],
    device: Annotated[str, typer.Option(help="cpu, cuda[:N], npu[:N], mps, xpu, or auto.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, bf16, fp16, or auto (the device's fast default).")] = "auto",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per rank and optimizer step.")] = 1,
    global_batch: Annotated[int | None, typer.Option(help=(
        "Sequences per optimizer step over all ranks; sets --grad-accum to global / (batch size x ranks). "
        "A resumed run keeps its own global batch on any number of ranks."))] = None,
    parallel: Annotated[str, typer.Option(help=(
        "Under torchrun: ddp or fsdp (FSDP2, fully_shard per decoder block). auto = ddp with several "
        "ranks, one plain process otherwise."))] = "auto",
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 256,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 3e-3,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = 20,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.1,
    grad_clip: Annotated[float, typer.Option(help="Max gradient norm.")] = 1.0,
    eval_every: Annotated[int, typer.Option(help="Validate every N steps.")] = 100,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 100,
    log_every: Annotated[int, typer.Option(help="Log every N steps.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed for init, data order and split.")] = 0,
    vocab_size: Annotated[int, typer.Option(help="Vocabulary of a newly trained tokenizer.")] = 4096,
    tokenizer: Annotated[Path | None, typer.Option(help="Reuse a tokenizer directory.")] = None,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    threads: Annotated[int | None, typer.Option(help=(
        "CPU threads per process (default: torch's; under torchrun, cores / local ranks)."))] = None,
    shard_size: Annotated[str, typer.Option(help="Max safetensors shard size, e.g. 2GB.")] = "2GB",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
    probe: Annotated[str | None, typer.Option(
        help="Record per-module statistics into RUN/probe: stats, or tensors (stats + full tensors).")] = None,
    probe_modules: Annotated[str, typer.Option(
        help="Modules to probe: comma-separated globs over canonical names, e.g. 'model.layers.*.mlp'.")] = "*",
    probe_steps: Annotated[str | None, typer.Option(
        help="Steps to probe, e.g. 1-100,200,300- (default: every step).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Train a model (preset or checkpoint) on any torch device; save hand-off checkpoints.

    One process as it stands; many under torchrun, e.g.
    torchrun --nproc_per_node 2 -m crosschip train --parallel fsdp ...
    """
    from crosschip.train.config import TrainConfig
    from crosschip.train.loop import train as run_train
    from crosschip.train.parallel import launch_env
    from crosschip.train.report import ConsoleReporter

    cfg = TrainConfig(
        data=data, model=model, out=out_dir, device=device, precision=precision, steps=steps,
        batch_size=batch_size, grad_accum=grad_accum, global_batch=global_batch, parallel=parallel,
        seq_len=seq_len, lr=lr, warmup_steps=warmup_steps,
        weight_decay=weight_decay, grad_clip=grad_clip, eval_every=eval_every, save_every=save_every,
        log_every=log_every, seed=seed, vocab_size=vocab_size, tokenizer=tokenizer, compile=compile_model,
        threads=threads, shard_size=shard_size, resume=resume, overwrite=overwrite,
        probe=probe, probe_modules=probe_modules, probe_steps=probe_steps,
    )
    main = launch_env().is_main
    result = run_train(cfg, ConsoleReporter(quiet=not main))  # one voice per job: rank 0's
    summary = {k: v for k, v in vars(result).items() if k != "history"}
    if not main:
        pass
    elif json_out:
        _print_json(summary)
    else:
        val = f"{result.val_loss:.4f}" if result.val_loss is not None else "-"
        err.print(
            f"trained {result.steps} steps on {result.device} ({result.precision}): loss {result.train_loss:.4f}, "
            f"val {val}, {result.tokens_per_s:,.0f} tok/s\ncheckpoint: {result.checkpoint}", highlight=False,
        )
    if result.interrupted_by in ("SIGINT", "SIGTERM"):
        err.print(f"stopped by {result.interrupted_by}; checkpoint saved. Continue with --resume.")
        raise typer.Exit(130 if result.interrupted_by == "SIGINT" else 143)


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Source checkpoint directory (any HF safetensors checkpoint).")],
    dst: Annotated[Path, typer.Argument(help="Output directory (appears atomically).")],
    to: Annotated[str | None, typer.Option(help="fp32, bf16, fp16, fp8-block, int8-w8a16, int8-w8a8-dynamic.")] = None,
    target: Annotated[str | None, typer.Option(help="Target profile: picks the default format.")] = None,
    layout: Annotated[str | None, typer.Option(help="Quantized layout: compressed-tensors or ascend (W8A8).")] = None,
    dtype: Annotated[str | None, typer.Option(help="Dtype of unquantized tensors in quantized formats.")] = None,
    clamp: Annotated[bool, typer.Option("--clamp", help="fp16: saturate overflowing values (recorded).")] = False,
    shard_size: Annotated[str, typer.Option(help="Max output shard size, e.g. 4GB.")] = "4GB",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing DST.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="fp8-block: write it even if no engine can load it (recorded).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Re-encode a checkpoint for the serving chip, streaming one tensor at a time."""
    from crosschip.convert.pipeline import convert as run_convert
    from crosschip.convert.pipeline import resolve_options
    from crosschip.train.report import byte_progress

    opts = resolve_options(to, target, layout, dtype, clamp=clamp, overwrite=overwrite,
                           shard_bytes=parse_size(shard_size))
    if opts.fmt == "fp8-block":  # refuse what vLLM's FP8 block-shape rule rejects (crosschip.check.engine)
        from crosschip.check.engine import convert_gate

        opts.forced = tuple(convert_gate(src, force))
        if opts.forced:
            err.print(f"warning: --force: writing fp8-block that no engine can load ({len(opts.forced)} "
                      f"violations, recorded as 'forced'): {opts.forced[0]}", highlight=False, soft_wrap=True)
    with byte_progress(err, "convert", quiet=json_out) as progress:
        record = run_convert(src, dst, opts, progress)
    if json_out:
        return _print_json({k: v for k, v in record.items() if k != "tensors"})
    summary = record["summary"]
    err.print(f"converted {record['from']} -> {record['to']} ({record['layout']}, {record['dtype']}): "
              f"{summary['tensors']} tensors, {summary.get('quantized', 0)} quantized", highlight=False)
    if "max_rel" in summary:
        err.print(f"error vs source: max rel {summary['max_rel']:.3e} ({summary['worst_tensor']}), "
                  f"mean of per-tensor max rel {summary['mean_max_rel']:.3e}", highlight=False)
    if record["clamped_tensors"]:
        err.print(f"clamped to +-65504: {', '.join(record['clamped_tensors'])}", highlight=False)
    if record.get("tokenizer_repaired"):
        err.print("tokenizer repaired: it now adds BOS, as crosschip training did before every document",
                  highlight=False)
    err.print(f"output: {dst}", highlight=False)
    return None


def parse_size(text: str) -> int:
    """'4GB', '500MB', '16KB', '1024' -> bytes (decimal units, as transformers' max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * units[unit])
    if t.isdigit():
        return int(t)
    raise CrosschipError(f"cannot read size {text!r}", "use e.g. 4GB, 500MB or a number of bytes")


@app.command()
def generate(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint directory (or a training run directory).")],
    prompt: Annotated[str, typer.Option(help="Prompt text.")],
    device: Annotated[str, typer.Option(help="cpu, cuda[:N], npu[:N], mps, xpu, or auto.")] = "auto",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Top-k sampling (0 = off).")] = 0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
) -> None:
    """Generate text from a checkpoint with a KV cache, streamed to the terminal."""
    from crosschip.generate import SamplingParams, generate_text

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    started: list[bool] = []

    def emit(text: str) -> None:
        if not started:  # echo the prompt only once the checkpoint has loaded and generation runs
            started.append(True)
            sys.stdout.write(prompt)
        sys.stdout.write(text)
        sys.stdout.flush()

    generate_text(ckpt, prompt, params, device, on_text=emit)
    sys.stdout.write("\n")


@app.command()
def serve(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint directory (any format convert writes).")],
    device: Annotated[str, typer.Option(help="cpu, cuda[:N], npu[:N], mps, xpu, or auto.")] = "auto",
    dtype: Annotated[str | None, typer.Option(
        help="auto (default: the stored precision where native, else fp32 on CPUs), fp32, bf16 or fp16.")] = None,
    host: Annotated[str, typer.Option(help="Bind address (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    max_batch: Annotated[int | None, typer.Option(help="Sequences in the running batch.")] = None,
    max_queue: Annotated[int | None, typer.Option(help="Waiting requests before 429.")] = None,
    max_context: Annotated[int | None, typer.Option(help="Tokens per sequence (prompt + output).")] = None,
    api_key: Annotated[str | None, typer.Option(help="Require 'Authorization: Bearer KEY'.")] = None,
    request_timeout: Annotated[float, typer.Option(help="Seconds before a request is aborted.")] = 600.0,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the step's token-parallel parts.")
                             ] = False,
    max_num_batched_tokens: Annotated[int | None, typer.Option(
        help="Tokens one step may run: decodes first, then prompt chunks (default 512).")] = None,
    block_size: Annotated[int | None, typer.Option(help="Token positions per KV cache block (default 16).")] = None,
    prefix_caching: Annotated[bool, typer.Option(
        help="Share the KV blocks of a common prompt prefix between requests.")] = True,
    decode_kernel: Annotated[str, typer.Option(
        help="auto: decode steps of float32 Llama-style models on the CPU run a compiled C++ kernel where it "
             "builds (else torch ops); cpp: require it; torch: never.")] = "auto",
) -> None:
    """Serve a checkpoint behind an OpenAI-compatible API with continuous batching."""
    from crosschip.serve.api import run_server

    run_server(ckpt, device=device, dtype=dtype, host=host, port=port, max_batch=max_batch, max_queue=max_queue,
               max_context=max_context, api_key=api_key, request_timeout_s=request_timeout, compile=compile_model,
               max_num_batched_tokens=max_num_batched_tokens, block_size=block_size, prefix_caching=prefix_caching,
               decode_kernel=decode_kernel)


@app.command()
def verify(
    ref: Annotated[str, typer.Option(help="Reference: CKPT[@DEVICE][:DTYPE] or http(s)://HOST:PORT/v1[#MODEL].")],
    target: Annotated[str, typer.Option(help="Side to check against the reference (same forms).")],
    prompts: Annotated[Path | None, typer.Option(help="Text or JSONL prompts (default: shipped set).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens per chat prompt (0: skip).")] = 32,
    report: Annotated[Path | None, typer.Option(help="Write report.json and report.html here.")] = None,
    emulate: Annotated[str | None, typer.Option(help="Target under a profile's numerics, e.g. ascend-310p.")] = None,
    precision: Annotated[str | None, typer.Option(help="Gates: fp32 fp16 bf16 int8 fp8 (default: inferred).")] = None,
    layers: Annotated[bool, typer.Option("--layers/--no-layers", help="Per-layer localization (in-process).")] = True,
    isolated: Annotated[bool, typer.Option("--isolated/--no-isolated", help="Each layer on the ref's input.")] = True,
    seq_len: Annotated[int, typer.Option(help="Tokens per teacher-forced row.")] = 128,
    kl_mean_max: Annotated[float | None, typer.Option(help="Gate: upper CI bound of mean KL (nats).")] = None,
    kl_p99_max: Annotated[float | None, typer.Option(help="Gate: p99 per-token KL (nats).")] = None,
    top1_min: Annotated[float | None, typer.Option(help="Gate: top-1 agreement.")] = None,
    ppl_ratio_max: Annotated[float | None, typer.Option(help="Gate: target/ref perplexity.")] = None,
    certify: Annotated[bool, typer.Option("--certify/--no-certify", help="Record the verdict in the target.")] = True,
    golden: Annotated[bool, typer.Option("--golden/--no-golden",
                                         help="Gate against REF converted into the target's format.")] = True,
    served: Annotated[Path | None, typer.Option(help="Checkpoint an endpoint TARGET serves (default: its "
                                                     "model card's root).")] = None,
    served_dtype: Annotated[str | None, typer.Option(help="What that endpoint computes in: fp32 bf16 fp16 "
                                                           "(default: the checkpoint's; fp32 -> bf16).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing report directory.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Check that TARGET computes what REF computes: distributions, greedy text and layer by layer.

    Exit code 0 on pass, 1 on fail, 2 on a usage error."""
    from crosschip.verify.report import render_table
    from crosschip.verify.run import VerifyOptions, run_verify

    opts = VerifyOptions(
        ref=ref, target=target, prompts=prompts, max_new_tokens=max_new_tokens, report_dir=report,
        overwrite=overwrite, emulate=emulate, precision=precision, layers=layers, isolated=isolated,
        seq_len=seq_len, certify=certify, golden=golden, served=served, served_dtype=served_dtype,
        gate_overrides={"kl_mean_max": kl_mean_max, "kl_p99_max": kl_p99_max, "top1_min": top1_min,
                        "ppl_ratio_max": ppl_ratio_max},
    )
    result = run_verify(opts, log=None if json_out else (lambda m: err.print(m, highlight=False)))
    if json_out:
        _print_json(result)
    else:
        tables = render_table(result)
        for table in tables if isinstance(tables, list) else [tables]:
            out.print(table)
        out.print(f"verdict: {result['verdict'].upper()}", highlight=False)
    raise typer.Exit(0 if result["verdict"] == "pass" else 1)


@app.command()
def check(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint directory, or a directory with only config.json.")],
    target: Annotated[str, typer.Option(help="Target profile, e.g. ascend-910b (see `crosschip targets`).")],
    stack: Annotated[str | None, typer.Option(
        help="Serving stack whose rules apply: vllm, vllm-ascend, mindie, transformers (default: the profile's first).")
    ] = None,
    devices: Annotated[int, typer.Option(help="Devices the model is served on (tensor parallel).")] = 1,
    batch: Annotated[int, typer.Option(help="Concurrent sequences the KV cache must hold.")] = 1,
    context: Annotated[int | None, typer.Option(help="Tokens per sequence (default: model max, <= 32768).")] = None,
    script: Annotated[list[Path] | None, typer.Option(help="Script or directory to scan for CUDA-only code.")] = None,
    csv_path: Annotated[Path | None, typer.Option("--csv", help="Write the code findings as CSV here.")] = None,
    numerics: Annotated[bool, typer.Option("--numerics/--no-numerics", help="Probe fp16 ranges on CPU.")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --csv file.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Preflight: will CKPT and these scripts run on TARGET? PASS/WARN/FAIL per check, with the fix.

    Exit code 0 when nothing fails, 1 when a check fails, 2 on a usage error."""
    from crosschip.check.run import run_check
    from crosschip.fsio import atomic_write_bytes

    if csv_path is not None and not script:
        raise CrosschipError("--csv writes the code findings, but no --script was given", "add --script PATH")
    if csv_path is not None and csv_path.exists() and not overwrite:
        raise CrosschipError(f"--csv {csv_path} already exists", "pass --overwrite or choose another path")
    report = run_check(
        ckpt, target, devices=devices, batch=batch, context=context, scripts=script or (), numerics=numerics,
        stack=stack,
    )
    if csv_path is not None:
        from crosschip.check.code import findings_csv

        atomic_write_bytes(csv_path, findings_csv(report.findings).encode("utf-8"))
    if json_out:
        _print_json(report.to_dict())
    else:
        colors = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red"}
        table = Table("check", "status", show_lines=True)
        table.add_column("reason", overflow="fold")
        table.add_column("fix", overflow="fold")
        for row in report.checks:
            table.add_row(row.check, Text(row.status, style=colors[row.status]), Text(row.reason), Text(row.fix or ""))
        out.print(table)
        out.print(f"verdict: {report.verdict.upper()} ({report.target}, stack {report.stack}, {report.devices} "
                  f"device(s), batch {report.batch}, context {report.context}; {report.elapsed_s:.2f} s)",
                  highlight=False)
    raise typer.Exit(report.exit_code)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its corpus and run.")] = Path("runs/demo"),
    steps: Annotated[int | None, typer.Option(help="Training steps (default: fit the time budget).")] = None,
    minutes: Annotated[float, typer.Option(help="Training time budget in minutes.")] = 5.5,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing demo directory.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """The whole pipeline on embedded defaults: corpus, tokenizer, training, checkpoint, sample."""
    from crosschip.demo import run_demo

    summary = run_demo(workdir, steps=steps, minutes=minutes, console=err, overwrite=overwrite)
    if json_out:
        _print_json(summary)


def main() -> None:
    """Entry point: bad input is one line on stderr and a non-zero exit, never a traceback."""
    run_app(app)


if __name__ == "__main__":
    main()
