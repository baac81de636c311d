"""Serve throughput: `crosschip serve` against vLLM's CPU build, on the same checkpoints, in one run.

Compared, per cell (checkpoint x concurrency):
  crosschip  `python -m crosschip.serve.api CKPT --port 0 --max-batch 16`, with its default `--dtype auto`
             (on a CPU without bf16 units: bf16 weights upcast to fp32; `--serve-dtype` forces one)
  vLLM       vLLM's CPU build, `python -m vllm.entrypoints.openai.api_server --model CKPT --max-num-seqs 16
             --no-enable-prefix-caching` (tests/interop/vllmkit.py; interpreter from `--vllm-python`, default
             .venv-vllm/bin/python), dtype vLLM's own choice (`--vllm-dtype` to force one), read from its log
Checkpoints are made as a user would: random-init fp32 presets (`_common.build_checkpoint`), then the real
`crosschip convert SRC DST --to bf16|int8-w8a8-dynamic --target cpu` (W8A8: compressed-tensors layout).
Cells: `small` and `base` in bf16 and W8A8 at 1 and 16 concurrent; `deepseek-serve` (DeepSeek-V3 MLA + MoE)
in bf16 at 16. Each round starts one engine on the checkpoint (one server alive at a time), warms it up, runs
every concurrency of the checkpoint and stops it; rounds alternate between the engines and the fastest round
of each is compared. Load: N streamed /v1/completions per cell, all sent at once under the concurrency cap,
fixed prompt length (token ids from the stdlib docstring corpus), fixed output length (`ignore_eos`), greedy.
Metrics are vLLM benchmark_serving's (benchmarks/serve_load.py). Targets: crosschip >= 1.0x vLLM on `base`
bf16 and W8A8 at 16 concurrent.

Also: batch-1 decode of crosschip's runner (fp32 random-init `small` and `base`, driven step by step through
`paged.build_step` + `runner.forward`, as the engine drives it) against the memory-bandwidth bound measured
here by `crosschip.perf` (target >= 80% on `base`), and, as a cheap extra row, `transformers` generate
serving the fp32 source checkpoint one request after another.

    python benchmarks/serve_throughput.py [--models small,base,deepseek-serve] [--formats bf16,w8a8]
        [--concurrency 1,16] [--rounds 2] [--requests N] [--prompt-len 64] [--max-tokens 128]
        [--vllm-python PY] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from _common import build_checkpoint, log, machine, prepare_data, print_json
from crosschip.data import iter_documents, load_tokenizer
from crosschip.models import PRESETS, build_model, count_parameters, get_preset
from crosschip.perf import measure_memory_bandwidth
from crosschip.serve.paged import BlockAllocator, Chunk, build_step
from crosschip.serve.runner import make_runner
from serve_load import (
    ROOT,
    LoadError,
    crosschip_server,
    run_load,
    step_counters,
    step_split,
    summarize,
    vllm_reason,
    vllm_server,
    warm_up,
)

CORPUS_BYTES = 1_000_000
VOCAB_SIZE = 8192  # puts `base` above 30M parameters (embedding + untied lm_head)
FORMATS = {"bf16": "bf16", "w8a8": "int8-w8a8-dynamic"}  # --formats name -> `crosschip convert --to`
MOE_PRESETS = {"deepseek-serve"}  # bf16 only, and only at the concurrencies above 1
TARGET_RATIO = 1.0  # crosschip / vLLM output tokens/s at 16 concurrent, on these cells:
TARGET_CELLS = (("base", "bf16", 16), ("base", "w8a8", 16))
TARGET_BOUND = 0.8  # batch-1 decode >= 80% of the bandwidth bound on `base`
MAX_MODEL_LEN = 512  # vllmkit starts vLLM with --max-model-len 512
ENGINES = {"crosschip": "crosschip", "vllm": "vLLM"}


# ------------------------------------------------------------------------------ checkpoints and prompts


def convert_checkpoint(src: Path, fmt: str) -> Path:
    """`crosschip convert SRC DST --to FMT --target cpu` as a subprocess (the real CLI); reused if present."""
    dst = src.with_name(f"{src.name}-{fmt}")
    if (dst / "config.json").is_file():
        return dst
    cmd = [sys.executable, "-m", "crosschip.cli", "convert", str(src), str(dst), "--to", FORMATS[fmt],
           "--target", "cpu"]
    log(f"$ crosschip {shlex.join(cmd[3:])}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"error: crosschip convert failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return dst


def checkpoint_dtype(ckpt: Path) -> str:
    """The checkpoint's float dtype as a crosschip precision name (W8A8: that of its unquantized tensors)."""
    config = json.loads((ckpt / "config.json").read_text())
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)


def prompt_ids(corpus: Path, tok_dir: Path, count: int, length: int) -> list[list[int]]:
    """`count` prompts of exactly `length` tokens (BOS + the start of a corpus document)."""
    tok = load_tokenizer(tok_dir)
    prompts: list[list[int]] = []
    for doc in iter_documents(corpus):
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= length - 1:
            prompts.append([tok.bos_token_id, *ids[: length - 1]])
        if len(prompts) == count:
            return prompts
    raise SystemExit(f"the corpus has fewer than {count} documents of {length} tokens")


def plan_cells(args: argparse.Namespace) -> list[tuple[str, str, list[int]]]:
    """(preset, format, concurrencies) per checkpoint, in run order."""
    plan = []
    for preset in args.models:
        for fmt in args.formats:
            if preset in MOE_PRESETS:
                if fmt != "bf16":
                    continue
                plan.append((preset, fmt, [c for c in args.concurrency if c > 1] or args.concurrency))
            else:
                plan.append((preset, fmt, list(args.concurrency)))
    return plan


def requests_for(args: argparse.Namespace, concurrency: int) -> int:
    return args.requests or (8 if concurrency == 1 else 2 * concurrency)


# ------------------------------------------------------------------------------ the matrix


def run_checkpoint(args: argparse.Namespace, ckpt: Path, preset: str, fmt: str, concs: list[int],
                   prompts: list[list[int]], workdir: Path) -> dict[str, Any]:
    """Every round: crosschip on `ckpt` (all of `concs`), stopped, then vLLM on it, stopped. An engine that
    cannot serve the checkpoint gets its one-line reason recorded and is not started again."""
    serve_dtype = checkpoint_dtype(ckpt) if args.serve_dtype == "match" else args.serve_dtype
    engines = ["crosschip", *(["vllm"] if args.vllm_python else [])]
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {e: {c: [] for c in concs} for e in engines}
    info: dict[str, Any] = {e: None for e in engines}
    errors: dict[str, str | None] = {e: None for e in engines}
    start_s: dict[str, list[float]] = {e: [] for e in engines}
    for i in range(args.rounds):
        for engine in engines:
            if errors[engine]:
                continue
            log_path = workdir / "logs" / f"vllm-{ckpt.name}-round{i + 1}.log"
            if engine == "crosschip":
                server_cm = crosschip_server(ckpt, args.max_batch, None if serve_dtype == "default" else serve_dtype)
            else:
                server_cm = vllm_server(args.vllm_python, ckpt, log_path, args.max_batch, args.vllm_dtype,
                                        shlex.split(args.vllm_args), args.vllm_eager)
            log(f"{preset} {fmt}, round {i + 1}: starting {ENGINES[engine]}")
            try:
                with server_cm as server:
                    info[engine] = info[engine] or server.info
                    start_s[engine].append(server.info["start_s"])
                    log(f"  ready in {server.info['start_s']:.0f} s; warm-up")
                    warm_up(server.url, server.model, prompts, args.max_tokens, max(concs))
                    for c in concs:
                        n = requests_for(args, c)
                        before = step_counters(server.url) if engine == "crosschip" else None
                        r = run_load(server.url, server.model, prompts[:n], args.max_tokens, c,
                                     f"{ENGINES[engine]}, {c} concurrent")
                        if before is not None:
                            r["engine_steps"] = step_split(before, step_counters(server.url))
                        log(f"  {c} concurrent: {r['output_tok_s']:.1f} output tok/s")
                        runs[engine][c].append(r)
            except LoadError as e:
                reason = vllm_reason(log_path, str(e)) if engine == "vllm" else str(e)
                errors[engine] = reason
                log(f"  {ENGINES[engine]} cannot serve {ckpt.name}: {reason}")
    for e in engines:
        if info[e]:
            info[e]["start_s"] = start_s[e]
    cells = []
    for c in concs:
        best = {e: max(runs[e][c], key=lambda r: r["output_tok_s"]) if runs[e][c] else None for e in engines}
        x, v = best["crosschip"], best.get("vllm")
        cells.append({
            "model": preset, "format": fmt, "checkpoint": ckpt.name, "concurrency": c,
            "requests": requests_for(args, c), "crosschip": x, "vllm": v,
            "ratio": x["output_tok_s"] / v["output_tok_s"] if x and v else None,
            "rounds_tok_s": {e: [r["output_tok_s"] for r in runs[e][c]] for e in engines},
        })
    return {"checkpoint": ckpt.name, "model": preset, "format": fmt, "serve_dtype": serve_dtype,
            "engines": info, "errors": errors, "cells": cells}


def check_targets(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target cell: met / not met / not measured (the cell was not selected or an engine failed)."""
    out = []
    for model, fmt, conc in TARGET_CELLS:
        cell = next((c for c in cells if (c["model"], c["format"], c["concurrency"]) == (model, fmt, conc)), None)
        ratio = cell["ratio"] if cell else None
        verdict = "not measured" if ratio is None else "met" if ratio >= TARGET_RATIO else "NOT met"
        out.append({"cell": f"{model} {fmt} @{conc}", "ratio": ratio, "target": TARGET_RATIO, "verdict": verdict})
    return out


# ------------------------------------------------------------------------------ transformers baseline


class _TokenClock(BaseStreamer):
    """Time of every `put` from `generate`: the first is the prompt, each later one a new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_generate(model: torch.nn.Module, ids: list[int], new_tokens: int) -> tuple[_TokenClock, float, int]:
    """One greedy `generate` of exactly `new_tokens` tokens: its token clock, start time and output length."""
    clock, inputs = _TokenClock(), torch.tensor([ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, streamer=clock, pad_token_id=0)
    return clock, start, out.shape[1] - len(ids)


def run_baseline(ckpt: Path, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """`AutoModelForCausalLM.from_pretrained(ckpt)` (fp32) generating for each prompt, one after another."""
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    hf_generate(model, prompts[0], 4)  # warm-up
    records, begin = [], time.perf_counter()
    for ids in prompts:
        clock, start, tokens = hf_generate(model, ids, max_tokens)
        records.append({"ttft": clock.times[1] - start, "latency": time.perf_counter() - start, "tokens": tokens})
    mode = f"transformers generate, {ckpt.name} fp32, one after another"
    return summarize(mode, records, time.perf_counter() - begin)


# ------------------------------------------------------------------------------ batch-1 decode vs bound


def bytes_per_token(model: torch.nn.Module, kv_bytes_per_token: int, context: float) -> float:
    """Weights read by one decode step (the embedding table only contributes one row) + the KV cache."""
    embed = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)
    return weights + embed.shape[1] * embed.element_size() + kv_bytes_per_token * context


def decode_round(runner: Any, prompt: int, steps: int) -> float:
    """Batch-1 decode tokens/s of one crosschip runner over `steps` steps after a `prompt`-token prefill.

    Driven as the engine drives it: blocks from a `BlockAllocator`, one `build_step` of one `Chunk` per step
    (host-side step building is counted, as the engine pays it), `runner.forward`, greedy argmax."""
    blocks = BlockAllocator(runner.num_blocks, runner.block_size)
    device = runner.embed.device
    table: list[int] = []
    blocks.grow(table, prompt + steps)
    ids = torch.randint(0, runner.vocab_size, (prompt,)).tolist()
    step = build_step([Chunk(0, ids, 0, table, "last")], runner.block_size, device)
    token = int(runner.forward(step)[0].argmax())
    start = time.perf_counter()
    for pos in range(prompt, prompt + steps):
        step = build_step([Chunk(0, [token], pos, table, "last")], runner.block_size, device)
        token = int(runner.forward(step)[0].argmax())
    return steps / (time.perf_counter() - start)


def hf_decode_rate(model: torch.nn.Module, prompt: int, steps: int) -> float:
    """Batch-1 decode tokens/s of HF generate, from the first to the last new token (prefill excluded)."""
    ids = torch.randint(0, model.config.vocab_size, (prompt,)).tolist()
    best = 0.0
    for _ in range(2):
        clock, _, _ = hf_generate(model, ids, steps + 1)
        best = max(best, steps / (clock.times[-1] - clock.times[1]))
    return best


def decode_vs_bound(preset: str, vocab: int, prompt: int, steps: int, rounds: int) -> dict[str, Any]:
    """crosschip's runner (CPU decode kernel, and its torch ops) and HF generate against the bandwidth bound.

    The copy bandwidth and the runners' rates are measured in alternating rounds and the best of each
    counts, so that a burst of load elsewhere on the machine cannot favour either side of the ratio."""
    config = get_preset(preset).build_config(vocab, 1, 2, 0)
    model = build_model(config, 0).eval()
    hf_rate = hf_decode_rate(model, prompt, steps)  # first: the runners rebind the model's weights to fused views
    runners = {kernel: make_runner(model, 1, 1024, kernel=kernel) for kernel in ("auto", "torch")}
    kernel_used = runners["auto"].decode_kernel is not None
    bandwidth, rates = 0.0, dict.fromkeys(runners, 0.0)
    for _ in range(rounds):
        bandwidth = max(bandwidth, measure_memory_bandwidth(torch.device("cpu"), cached=False))
        for kernel, runner in runners.items():
            rates[kernel] = max(rates[kernel], decode_round(runner, prompt, steps))
    per_token = bytes_per_token(model, runners["auto"].kv_bytes_per_token, prompt + steps / 2)  # mean context
    bound = bandwidth / per_token
    return {
        "preset": preset,
        "runner": type(runners["auto"]).__name__ + (" + CPU decode kernel" if kernel_used else ", torch ops"),
        "params_M": count_parameters(model) / 1e6,
        "bandwidth_GB_s": bandwidth / 1e9,
        "bytes_per_token_MB": per_token / 1e6,
        "bound_tok_s": bound,
        "crosschip_tok_s": rates["auto"],
        "crosschip_of_bound": rates["auto"] / bound,
        "torch_ops_tok_s": rates["torch"],
        "torch_ops_of_bound": rates["torch"] / bound,
        "hf_generate_tok_s": hf_rate,
        "hf_of_bound": hf_rate / bound,
    }


# ------------------------------------------------------------------------------ report


def _num(value: float | None, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"


def _latency(r: dict[str, Any] | None) -> str:
    if r is None:
        return f"{'-':>9}{'-':>9}{'-':>9}"
    return f"{r['ttft_ms']['p50']:>9.0f}{r['ttft_ms']['p99']:>9.0f}{r['tpot_ms']['p50']:>9.1f}"


def print_serving(result: dict[str, Any]) -> None:
    a = result["settings"]
    print(f"\nserving: random-init checkpoints converted by `crosschip convert --target cpu`; {a['prompt_len']} "
          f"prompt + {a['max_tokens']} output tokens per request (ignore_eos, greedy, streamed), "
          f"--max-batch {a['max_batch']}, fastest of {a['rounds']} alternating rounds per engine")
    print(f"{'':<33}{'output tok/s':^27}{'crosschip (ms)':^27}{'vLLM (ms)':^27}")
    print(f"{'cell':<33}{'crosschip':>10}{'vLLM':>8}{'ratio':>9}" + f"{'TTFT p50':>9}{'p99':>9}{'TPOT p50':>9}" * 2)
    for ck in result["checkpoints"]:
        for c in ck["cells"]:
            x, v = c["crosschip"], c["vllm"]
            name = f"{c['model']} {c['format']} @{c['concurrency']} ({c['requests']} req)"
            print(f"{name:<33}{_num(x and x['output_tok_s'], '.1f', 9)}{_num(v and v['output_tok_s'], '.1f', 9)}"
                  f"{'-' if c['ratio'] is None else format(c['ratio'], '.2f') + 'x':>9}{_latency(x)}{_latency(v)}")
    if result.get("baseline"):
        b = result["baseline"]
        print(f"{'HF generate, one at a time':<33}{b['output_tok_s']:>9.1f}{'':>18}{_latency(b)}   ({b['mode']})")
    for t in result["targets"]:
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}x"
        print(f"target: crosschip / vLLM on {t['cell']} >= {t['target']:.1f}x: {ratio}, {t['verdict']}")
    print("\nrounds (output tok/s) and engine settings per checkpoint:")
    for ck in result["checkpoints"]:
        print(f"  {ck['checkpoint']}:")
        for c in ck["cells"]:
            rounds = "; ".join(f"{ENGINES[e]} {' '.join(f'{x:.0f}' for x in v) or '-'}"
                               for e, v in c["rounds_tok_s"].items())
            print(f"    @{c['concurrency']}: {rounds}")
            split = (c["crosschip"] or {}).get("engine_steps")
            if split:
                print(f"      crosschip per step (fastest round): schedule + build {split['schedule_ms']:.2f} ms, "
                      f"forward {split['forward_ms']:.2f} ms, sample + emit {split['sample_ms']:.2f} ms; "
                      f"host share {split['host_share']:.1%} over {split['steps']:.0f} steps")
        x = ck["engines"].get("crosschip")
        if x:
            print(f"    crosschip: --dtype {ck['serve_dtype']}; {x['loaded']}; ready in "
                  f"{'/'.join(f'{s:.0f}' for s in x['start_s'])} s")
        v = ck["engines"].get("vllm")
        if v:
            kernels = f"; kernels: {', '.join(v['kernels'])}" if v["kernels"] else ""
            print(f"    vLLM: {v['engine']}, --dtype {v['dtype_flag']} -> {v['dtype']}, worker on cores "
                  f"{v['worker_cores']}, {'--enforce-eager' if v['enforce_eager'] else 'compiled'}, ready in "
                  f"{'/'.join(f'{s:.0f}' for s in v['start_s'])} s{kernels}")
        for e, reason in ck["errors"].items():
            if reason:
                print(f"    {ENGINES[e]} could not serve it: {reason}")
    if result.get("vllm_skipped"):
        print(f"vLLM skipped: {result['vllm_skipped']}")


def print_report(result: dict[str, Any]) -> None:
    m, a = result["machine"], result["settings"]
    print(f"{m['device_name']}, torch {m['torch']}, {m['cpu_threads']} threads, {m['date_utc']}")
    print(f"load average at start {result['loadavg_start']}, at end {result['loadavg_end']} (1/5/15 min)")
    if result.get("checkpoints") is not None:
        print_serving(result)
    if result.get("decode"):
        print(f"\nbatch-1 decode, prompt {a['decode_prompt']} + {a['decode_steps']} steps, fp32, random init; bound = "
              f"copy bandwidth (read + write) / bytes per token; best of {a['decode_rounds']} alternating rounds")
        print(f"{'preset':<8}{'params':>8}{'GB/s':>6}{'MB/token':>10}{'bound':>8}{'crosschip':>11}{'of bound':>10}"
              f"{'torch ops':>11}{'of bound':>10}{'HF gen':>8}{'of bound':>10}   (tok/s)")
        for d in result["decode"]:
            print(f"{d['preset']:<8}{d['params_M']:>7.1f}M{d['bandwidth_GB_s']:>6.1f}{d['bytes_per_token_MB']:>10.1f}"
                  f"{d['bound_tok_s']:>8.1f}{d['crosschip_tok_s']:>11.1f}{d['crosschip_of_bound']:>10.0%}"
                  f"{d['torch_ops_tok_s']:>11.1f}{d['torch_ops_of_bound']:>10.0%}{d['hf_generate_tok_s']:>8.1f}"
                  f"{d['hf_of_bound']:>10.0%}   ({d['runner']})")
        t = result["decode_target"]
        share = "-" if t["of_bound"] is None else f"{t['of_bound']:.0%}"
        print(f"target: base batch-1 decode >= {TARGET_BOUND:.0%} of the bound: {share}, {t['verdict']}")


# ------------------------------------------------------------------------------ main


def vllm_python(given: Path | None) -> str | None:
    """The vLLM interpreter: --vllm-python, else the repository's .venv-vllm when `make vllm-venv` made it."""
    if given is not None:
        if not given.is_file():
            raise SystemExit(f"error: --vllm-python {given} does not exist "
                             "(fix: run `make vllm-venv`, or pass the interpreter of a vLLM CPU build)")
        return str(given)
    default = ROOT / ".venv-vllm" / "bin" / "python"
    return str(default) if default.is_file() else None


def _list(text: str, kind: type = str) -> list:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="small,base,deepseek-serve", help="presets (deepseek-serve: bf16 only)")
    p.add_argument("--formats", default="bf16,w8a8", help=f"of {', '.join(FORMATS)}")
    p.add_argument("--concurrency", default="1,16", help="concurrent requests per cell (deepseek-serve: > 1 only)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per engine; the fastest counts")
    p.add_argument("--requests", type=int, default=None, help="per cell (default: 8 at 1 concurrent, else 2x)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (ignore_eos)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--serve-dtype", default="default",
                   help="crosschip serve --dtype: default (auto), match (the checkpoint's float dtype), or a name")
    p.add_argument("--vllm-python", type=Path, default=None,
                   help="interpreter of a vLLM CPU build (default: .venv-vllm/bin/python, made by `make vllm-venv`)")
    p.add_argument("--vllm-dtype", default=None, help="vLLM --dtype (default: not passed, vLLM's own choice)")
    p.add_argument("--vllm-eager", action="store_true", help="start vLLM with --enforce-eager (no torch.compile)")
    p.add_argument("--vllm-args", default="", help="more vLLM server flags, e.g. '--max-num-batched-tokens 1024'")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument("--skip-baseline", action="store_true", help="no transformers generate row")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--decode-presets", default="small,base")
    p.add_argument("--decode-prompt", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--decode-rounds", type=int, default=5, help="alternating bandwidth/decode rounds; best counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep and reuse corpus, tokenizer, checkpoints")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.models, args.formats = _list(args.models), _list(args.formats)
    args.concurrency = _list(args.concurrency, int)
    for fmt in args.formats:
        if fmt not in FORMATS:
            p.error(f"--formats: unknown {fmt!r} (use {', '.join(FORMATS)})")
    for preset in {*args.models, *_list(args.decode_presets)}:
        if preset not in PRESETS:
            p.error(f"unknown preset {preset!r} (use {', '.join(PRESETS)})")
    if args.prompt_len + args.max_tokens > MAX_MODEL_LEN:
        p.error(f"--prompt-len + --max-tokens must be <= {MAX_MODEL_LEN} (vLLM's --max-model-len here)")
    if not args.concurrency or min(args.concurrency) < 1 or args.rounds < 1:
        p.error("--concurrency and --rounds need values >= 1")
    args.vllm_python = None if args.skip_vllm else vllm_python(args.vllm_python)
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    corpus, tok_dir = prepare_data(workdir, CORPUS_BYTES, VOCAB_SIZE)
    result: dict[str, Any] = {
        "machine": machine(torch.device("cpu")),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"},
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    if not args.skip_serve:
        plan = plan_cells(args)
        count = max([requests_for(args, c) for _, _, concs in plan for c in concs] + [max(args.concurrency)])
        prompts = prompt_ids(corpus, tok_dir, count, args.prompt_len)
        sources = {p: build_checkpoint(workdir, p, tok_dir, args.seed) for p in dict.fromkeys(p for p, _, _ in plan)}
        ckpts = {(p, f): convert_checkpoint(sources[p], f) for p, f, _ in plan}  # all converted before any timing
        if not args.vllm_python:
            result["vllm_skipped"] = "--skip-vllm" if args.skip_vllm else (
                "no .venv-vllm/bin/python: create it with `make vllm-venv` or pass --vllm-python")
        result["checkpoints"] = [run_checkpoint(args, ckpts[p, f], p, f, concs, prompts, workdir)
                                 for p, f, concs in plan]
        result["targets"] = check_targets([c for ck in result["checkpoints"] for c in ck["cells"]])
        if not args.skip_baseline and plan:
            log(f"baseline: transformers generate on {sources[plan[0][0]].name}, one request after another")
            n = requests_for(args, 1)
            result["baseline"] = run_baseline(sources[plan[0][0]], prompts[:n], args.max_tokens)
    if not args.skip_decode:
        result["decode"] = []
        for preset in _list(args.decode_presets):
            log(f"batch-1 decode: {preset}")
            result["decode"].append(decode_vs_bound(preset, VOCAB_SIZE, args.decode_prompt, args.decode_steps,
                                                    args.decode_rounds))
        base = next((d["crosschip_of_bound"] for d in result["decode"] if d["preset"] == "base"), None)
        verdict = "not measured" if base is None else "met" if base >= TARGET_BOUND else "NOT met"
        result["decode_target"] = {"preset": "base", "of_bound": base, "target": TARGET_BOUND, "verdict": verdict}
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir is not None:
        result = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
            result = run(args, Path(tmp))
    if args.json:
        print_json(result)
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
