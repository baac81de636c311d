"""Tokenize a corpus once into packed train/val token streams, cached on disk by content hash.

Layout of a cache entry ``cache_dir/<key>/``:
  * ``train.bin``, ``val.bin``  raw little-endian arrays of token ids (uint16 or uint32), each document
    packed as BOS + ids + EOS and concatenated. The ids are encoded without special tokens, so BOS is
    never doubled whatever the tokenizer adds; with crosschip's tokenizer a packed document is exactly
    ``tokenizer(text)`` + EOS;
  * ``index.json``              dtype, per-split token/document counts, fingerprints, split settings.
Documents go to validation by a seeded hash of their index (`is_val_document`). A single ``.txt`` file is split
into documents on blank lines (`corpus.split_paragraphs`); when it holds one unbroken text, that text is split by
position as nanoGPT does: the first (1 - val_fraction) trains, the rest validates (`corpus.split_by_position`).
The key hashes the data fingerprint, the split rule, tokenizer fingerprint, val_fraction, seed and format version, so
any change to the inputs gets a new entry and an unchanged input is never tokenized twice. Entries are
published with ``atomic_dir``: a crash mid-build leaves no directory under the key.

Literal special-token strings inside documents (e.g. "<|eos|>") are encoded as those special tokens,
exactly as ``tokenizer(text)`` does at inference, so chat-formatted corpora round-trip.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from crosschip.data.corpus import (
    data_fingerprint,
    is_single_text,
    iter_file_documents,
    list_data_files,
    split_by_position,
)
from crosschip.data.tokenizer import tokenizer_fingerprint
from crosschip.errors import CrosschipError
from crosschip.fsio import atomic_dir, atomic_write_json

FORMAT_VERSION = 1
_BATCH_DOCS = 512
_BATCH_CHARS = 4_000_000  # bounds memory per tokenization batch regardless of corpus size
SPLITS = ("train", "val")

# progress(documents_done, tokens_done); called after each tokenized batch.
ProgressFn = Callable[[int, int], None]


@dataclass
class TokenShards:
    """The tokenized corpus on disk: read-only memmaps of the packed train and val streams."""

    root: Path
    train: np.memmap
    val: np.memmap
    dtype: np.dtype
    vocab_size: int
    meta: dict[str, Any] = field(default_factory=dict)


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype for the ids: uint16 halves disk and page-cache use for small vocabs."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def is_val_document(index: int, seed: int, val_fraction: float) -> bool:
    """Deterministic per-document split: a seeded hash of the document index, uniform in [0, 1)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < val_fraction


def shard_key(data_fp: str, tok_fp: str, val_fraction: float, seed: int, rule: str = "documents") -> str:
    """The cache key; `rule` names how documents were cut, so one file read two ways gets two entries."""
    fields: list[Any] = [data_fp, tok_fp, float(val_fraction), int(seed), FORMAT_VERSION]
    payload = json.dumps(fields if rule == "documents" else [*fields, rule])  # old keys stay valid
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _split_documents(files: list[Path], single_text: bool, val_fraction: float) -> Iterator[tuple[str, str | None]]:
    """(document, forced split or None) in order; None lets the seeded hash pick the split."""
    if not single_text:
        yield from ((doc, None) for doc in iter_file_documents(files))
        return
    docs = list(iter_file_documents(files, paragraphs=True))  # one file: its size is bounded by memory anyway
    if len(docs) == 1 and len(docs[0]) >= 2:
        train, val = split_by_position(docs[0], val_fraction)
        yield from ((train, "train"), (val, "val"))
        return
    yield from ((doc, None) for doc in docs)


class _SplitWriter:
    """Appends packed documents to one split file, remembering the last one (to move it if needed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed explicitly in close()
        self.tokens = 0
        self.documents = 0
        self.last: np.ndarray | None = None

    def write(self, packed: np.ndarray) -> None:
        self.file.write(packed.tobytes())
        self.tokens += int(packed.size)
        self.documents += 1
        self.last = packed

    def pop_last(self) -> np.ndarray:
        """Remove the most recently written document from the file and return it."""
        assert self.last is not None
        last, self.last = self.last, None
        self.file.flush()
        self.tokens -= int(last.size)
        self.documents -= 1
        self.file.truncate(self.tokens * last.itemsize)
        self.file.seek(self.tokens * last.itemsize)
        return last

    def close(self) -> None:
        self.file.close()


def _special_id(tokenizer: Any, name: str) -> int:
    value = getattr(tokenizer, f"{name}_token_id", None)
    if value is None:
        raise CrosschipError(f"tokenizer has no {name} token", f"use a tokenizer with a {name}_token set")
    return int(value)


def _plain_backend(tokenizer: Any) -> Any:
    """A private copy of the Rust tokenizer without truncation/padding, which would silently cut documents."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CrosschipError(f"{type(tokenizer).__name__} is not a fast tokenizer", "use a tokenizers-backed one")
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def _balance_splits(writers: dict[str, _SplitWriter]) -> None:
    """Guarantee both splits hold a document (tiny corpora) by moving the last one across."""
    total = writers["train"].documents + writers["val"].documents
    if total == 0:
        raise CrosschipError("the corpus has no non-empty documents", "pass data that contains text")
    if total == 1:
        raise CrosschipError(
            "need at least 2 documents to split into train and validation",
            "add documents (one per .txt file, JSONL line or parquet row; blank lines separate them in one .txt)",
        )
    if writers["val"].documents == 0:
        writers["val"].write(writers["train"].pop_last())
    elif writers["train"].documents == 0:
        writers["train"].write(writers["val"].pop_last())


def _tokenize_into(
    out: Path,
    files: list[Path],
    tokenizer: Any,
    vocab_size: int,
    *,
    val_fraction: float,
    seed: int,
    progress: ProgressFn | None,
    single_text: bool = False,
) -> dict[str, dict[str, int]]:
    """Stream all documents through the tokenizer into out/{train,val}.bin; return per-split counts."""
    dtype = token_dtype(vocab_size)
    bos, eos = _special_id(tokenizer, "bos"), _special_id(tokenizer, "eos")
    backend = _plain_backend(tokenizer)
    writers = {s: _SplitWriter(out / f"{s}.bin") for s in SPLITS}
    doc_index = 0

    def flush(batch: list[tuple[str, str | None]]) -> None:
        nonlocal doc_index
        encoded = backend.encode_batch([d for d, _ in batch], add_special_tokens=False)
        for enc, (_, forced) in zip(encoded, batch, strict=True):
            ids = np.asarray(enc.ids, dtype=np.int64)
            if ids.size and int(ids.max()) >= vocab_size:
                raise CrosschipError(f"tokenizer produced id {int(ids.max())} >= vocab size {vocab_size}")
            packed = np.empty(ids.size + 2, dtype=dtype)
            packed[0], packed[1:-1], packed[-1] = bos, ids, eos
            split = forced or ("val" if is_val_document(doc_index, seed, val_fraction) else "train")
            writers[split].write(packed)
            doc_index += 1
        if progress is not None:
            progress(doc_index, sum(w.tokens for w in writers.values()))

    try:
        batch: list[tuple[str, str | None]] = []
        chars = 0
        for doc, forced in _split_documents(files, single_text, val_fraction):
            batch.append((doc, forced))
            chars += len(doc)
            if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
                flush(batch)
                batch, chars = [], 0
        if batch:
            flush(batch)
        _balance_splits(writers)
    finally:
        for w in writers.values():
            w.close()
    return {s: {"tokens": w.tokens, "documents": w.documents} for s, w in writers.items()}


def _open(root: Path, meta: dict[str, Any]) -> TokenShards:
    dtype = np.dtype(meta["dtype"])
    arrays = {
        s: np.memmap(root / f"{s}.bin", dtype=dtype, mode="r", shape=(meta["splits"][s]["tokens"],)) for s in SPLITS
    }
    return TokenShards(root, arrays["train"], arrays["val"], dtype, int(meta["vocab_size"]), meta)


def _open_cached(root: Path) -> TokenShards | None:
    """The cache entry at root if it is complete and of this format, else None (it will be rebuilt)."""
    try:
        meta = json.loads((root / "index.json").read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for s in SPLITS:
            if (root / f"{s}.bin").stat().st_size != meta["splits"][s]["tokens"] * itemsize:
                return None
        return _open(root, meta)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def build_shards(
    data_path: Path,
    tokenizer: Any,
    cache_dir: Path,
    val_fraction: float = 0.05,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> TokenShards:
    """Tokenize `data_path` into cached train/val shards (or return the cached ones for identical inputs)."""
    if not 0.0 < val_fraction < 1.0:
        raise CrosschipError(f"val_fraction must be in (0, 1), got {val_fraction}", "pass e.g. --val-fraction 0.05")
    files = list_data_files(Path(data_path))
    single_text = is_single_text(Path(data_path))
    data_fp, tok_fp = data_fingerprint(files), tokenizer_fingerprint(tokenizer)
    rule = "txt-paragraphs" if single_text else "documents"
    root = Path(cache_dir) / shard_key(data_fp, tok_fp, val_fraction, seed, rule)
    cached = _open_cached(root)
    if cached is not None:
        return cached
    vocab_size = len(tokenizer)
    # overwrite=True only replaces an incomplete/stale entry: a complete one returned above.
    with atomic_dir(root, overwrite=True) as tmp:
        splits = _tokenize_into(
            tmp, files, tokenizer, vocab_size, val_fraction=val_fraction, seed=seed, progress=progress,
            single_text=single_text,
        )
        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": token_dtype(vocab_size).name,
            "vocab_size": vocab_size,
            "bos_token_id": _special_id(tokenizer, "bos"),
            "eos_token_id": _special_id(tokenizer, "eos"),
            "splits": splits,
            "num_files": len(files),
            "data_fingerprint": data_fp,
            "tokenizer_fingerprint": tok_fp,
            "val_fraction": val_fraction,
            "seed": seed,
            "split_rule": rule,
        }
        atomic_write_json(tmp / "index.json", meta)
    return _open(root, meta)
