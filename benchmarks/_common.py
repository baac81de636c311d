"""Helpers shared by the benchmark scripts (run them as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from crosschip import devices
from crosschip.checkpoint import write_checkpoint
from crosschip.data import iter_documents, load_tokenizer, stdlib_docstring_corpus, train_tokenizer
from crosschip.errors import CrosschipError
from crosschip.models import build_model, count_parameters, get_preset

CORPUS_NAME = "corpus.jsonl"
TOKENIZER_NAME = "tokenizer"


def log(message: str) -> None:
    """Progress goes to stderr so that `--json` output on stdout stays machine-readable."""
    print(message, file=sys.stderr, flush=True)


def prepare_corpus(workdir: Path, max_bytes: int) -> Path:
    """The stdlib docstring corpus in `workdir` (reused if present). Needs no network: it is the
    running interpreter's own standard library docstrings."""
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / CORPUS_NAME
    if not corpus.is_file():
        log(f"writing stdlib docstring corpus ({max_bytes:,} bytes max) to {corpus}")
        stdlib_docstring_corpus(corpus, max_bytes=max_bytes)
    return corpus


def prepare_data(workdir: Path, max_bytes: int, vocab_size: int) -> tuple[Path, Path]:
    """The stdlib docstring corpus and a tokenizer trained on it, in `workdir` (both reused if present)."""
    corpus = prepare_corpus(workdir, max_bytes)
    tok_dir = workdir / TOKENIZER_NAME
    if not (tok_dir / "tokenizer.json").is_file():
        log(f"training a {vocab_size}-token BPE tokenizer into {tok_dir}")
        train_tokenizer(iter_documents(corpus), vocab_size, tok_dir)
    return corpus, tok_dir


def build_checkpoint(workdir: Path, preset: str, tok_dir: Path, seed: int) -> Path:
    """A random-init checkpoint of `preset` with the benchmark tokenizer (reused if present)."""
    out = workdir / f"ckpt-{preset}"
    if (out / "config.json").is_file():
        return out
    tok = load_tokenizer(tok_dir)
    config = get_preset(preset).build_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    model = build_model(config, seed)
    log(f"writing random-init {preset} checkpoint ({count_parameters(model) / 1e6:.1f}M params) to {out}")
    write_checkpoint(out, model, tok, {"source": "benchmarks", "init": "random"})
    return out


def first_documents(corpus: Path, count: int, min_chars: int = 200) -> list[str]:
    """The first `count` documents of at least `min_chars` characters (deterministic)."""
    docs = [d for d in iter_documents(corpus) if len(d) >= min_chars]
    return docs[:count]


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first index where two equally long token lists differ, or None."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on, for the printed header and the JSON record."""
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": devices.device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cpu":
        info["isa_flags"] = devices.cpu_isa_flags()
    return info


def print_json(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, indent=2, sort_keys=False))


def run_and_print(args: Any, produce: Callable[[], dict[str, Any]],
                  print_table: Callable[[dict[str, Any]], None]) -> dict[str, Any] | None:
    """Run `produce` and print its summary (--json or a table); None, after a one-line error, on bad input."""
    try:
        summary = produce()
    except CrosschipError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    if args.json:
        print_json(summary)
    else:
        print_table(summary)
    return summary


def run_benchmark(args: Any, run_all: Callable[[Any, Path], dict[str, Any]],
                  print_table: Callable[[dict[str, Any]], None]) -> int:
    """The shared main of the training benchmarks: threads, a kept or temporary workdir, table or --json."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    def produce() -> dict[str, Any]:
        if args.workdir is not None:
            return run_all(args, args.workdir)
        with tempfile.TemporaryDirectory(prefix="crosschip-bench-") as tmp:
            return run_all(args, Path(tmp))

    return 0 if run_and_print(args, produce, print_table) is not None else CrosschipError.exit_code
