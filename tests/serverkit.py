"""A real `crosschip serve` process for tests: start it, wait until it is ready, read /metrics, stop it.

Shared by tests/serve and tests/verify (pytest puts tests/ on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from crosschip.serve.metrics import parse_text

READY = re.compile(r"serving (\S+) at (http://\S+/v1)")
START_TIMEOUT_S = 120.0


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    url: str  # http://127.0.0.1:PORT/v1
    model: str
    log: list[str]

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def metrics(self) -> dict[str, float]:
        return parse_text(httpx.get(self.root + "/metrics", timeout=10).text)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (graceful); SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _read_log(proc: subprocess.Popen[str], log: list[str], ready: threading.Event, found: list[str]) -> None:
    """Collect the server's output; flag the ready line (`serving MODEL at URL`)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        log.append(line)
        match = READY.search(line)
        if match and not ready.is_set():
            found.extend(match.groups())
            ready.set()
    ready.set()  # the process ended: stop waiting


def start_server(ckpt: Path, *args: str) -> ServerProcess:
    """`python -m crosschip.serve.api CKPT --port 0 ...`; waits for the ready line and /health."""
    cmd = [sys.executable, "-m", "crosschip.serve.api", str(ckpt), "--device", "cpu", "--port", "0", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log: list[str] = []
    found: list[str] = []
    ready = threading.Event()
    threading.Thread(target=_read_log, args=(proc, log, ready, found), daemon=True).start()
    if not ready.wait(START_TIMEOUT_S) or not found:
        proc.kill()
        proc.wait()
        pytest.fail("the server did not start:\n" + "".join(log))
    server = ServerProcess(proc, found[1], found[0], log)
    assert httpx.get(server.root + "/health", timeout=10).status_code == 200
    return server
