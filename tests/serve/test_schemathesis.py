"""schemathesis (every check, a bounded number of examples) against a real `crosschip serve` process (issue 14).

The server listens on loopback only; schemathesis reads its /openapi.json and sends what it generates from it, so
the API must accept every request its schema allows and refuse every one it excludes, answer with the content
types it documents (Prometheus text on /metrics, server-sent events when streaming), and never answer 5xx.
The one rule JSON Schema cannot state (prompt + max_tokens within the context) is kept by `st_hooks.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

MAX_EXAMPLES = 30  # per operation and phase: ~450 requests, 15-40 s here (the shared machine's load)
CONTEXT = 256


def schemathesis_argv() -> list[str]:
    script = Path(sys.executable).parent / "schemathesis"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "schemathesis.cli"]


def test_schemathesis_all_checks_pass(serve_ckpt: Path, launch: Callable[..., Any], tmp_path: Path) -> None:
    pytest.importorskip("schemathesis")
    server = launch(serve_ckpt, "--max-context", str(CONTEXT), "--max-batch", "4", "--request-timeout", "60")
    assert server.url.startswith("http://127.0.0.1:")
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "st_hooks", "CROSSCHIP_ST_CONTEXT": str(CONTEXT),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    args = [*schemathesis_argv(), "run", f"{server.root}/openapi.json", "--checks", "all",
            "--max-examples", str(MAX_EXAMPLES), "--seed", "0", "--workers", "1",
            "--suppress-health-check", "filter_too_much,too_slow"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and "generated" in proc.stdout, report
