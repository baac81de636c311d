"""Shared fixtures: an offline, isolated environment and small real inputs (corpus, tokenizer, checkpoints)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Before anything imports transformers / huggingface_hub: tests never reach the network, and the
# shard cache goes to a throwaway directory instead of ~/.cache. Subprocesses inherit all three.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
_SESSION_CACHE = tempfile.TemporaryDirectory(prefix="crosschip-test-cache-")
os.environ["CROSSCHIP_CACHE"] = _SESSION_CACHE.name

TINY_VOCAB = 400
CORPUS_JSONL_DOCS = 26
CORPUS_TXT_DOCS = 4


@pytest.fixture(scope="session", autouse=True)
def _cleanup_session_cache() -> Iterator[None]:
    yield
    _SESSION_CACHE.cleanup()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of ~30 short English documents (stdlib docstrings): one .jsonl plus a few .txt files."""
    from crosschip.data.corpus import stdlib_docstring_corpus

    root = tmp_path_factory.mktemp("tiny_corpus")
    # Built outside `root` so the corpus directory holds only the documents chosen below.
    source = stdlib_docstring_corpus(tmp_path_factory.mktemp("stdlib") / "docs.jsonl", max_bytes=16_000)
    docs = [json.loads(line)["text"] for line in source.read_text(encoding="utf-8").splitlines()]
    assert len(docs) >= CORPUS_JSONL_DOCS + CORPUS_TXT_DOCS, "stdlib corpus unexpectedly small"
    jsonl = "".join(json.dumps({"text": d}) + "\n" for d in docs[:CORPUS_JSONL_DOCS])
    (root / "docs.jsonl").write_text(jsonl, encoding="utf-8")
    for i, doc in enumerate(docs[CORPUS_JSONL_DOCS : CORPUS_JSONL_DOCS + CORPUS_TXT_DOCS]):
        (root / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A byte-level BPE tokenizer (vocab 400) trained on `tiny_corpus`."""
    from crosschip.data.corpus import iter_documents
    from crosschip.data.tokenizer import train_tokenizer

    return train_tokenizer(iter_documents(tiny_corpus), TINY_VOCAB, tmp_path_factory.mktemp("tiny_tokenizer"))


def build_preset_model(preset: str, tokenizer: Any, seed: int = 0) -> Any:
    """A freshly initialised fp32 model of a preset, sized to the tokenizer."""
    from crosschip import models

    special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    config = models.get_preset(preset).build_config(len(tokenizer), *special)
    return models.build_model(config, seed=seed)


MakeModel = Callable[..., Any]
MakeCheckpoint = Callable[..., Path]


@pytest.fixture(scope="session")
def make_model(tiny_tokenizer: Any) -> MakeModel:
    """Factory: `make_model(preset, seed=0)`, a fresh fp32 preset model sized to `tiny_tokenizer`."""

    def make(preset: str, seed: int = 0) -> Any:
        return build_preset_model(preset, tiny_tokenizer, seed)

    return make


@pytest.fixture(scope="session")
def make_checkpoint(tiny_tokenizer: Any) -> MakeCheckpoint:
    """Factory: `make_checkpoint(preset, out, **write_kwargs) -> out`, a checkpoint of a seed-0 preset model.

    write_kwargs go to `checkpoint.write_checkpoint` (shard_size, overwrite, extra).
    """
    from crosschip import checkpoint

    def make(preset: str, out: Path, **write_kwargs: Any) -> Path:
        model = build_preset_model(preset, tiny_tokenizer)
        provenance = {"preset": preset, "seed": 0, "source": "tests/conftest.py"}
        return checkpoint.write_checkpoint(Path(out), model, tiny_tokenizer, provenance=provenance, **write_kwargs)

    return make
