"""A tokenized dataset on disk, as `crosschip data tokenize` writes it and `crosschip train --data` reads it.

Layout of a dataset directory:
  * ``dataset.json``                  the manifest (below); its presence, with ``"format": "crosschip-tokens"``,
                                      is what marks a directory as a dataset (never file names);
  * ``train/NNNNN.ds``, ``val/NNNNN.ds``  datatrove's token files, one per task and split: raw little-endian
                                      uint16 (uint32 for vocabularies over 65,536) ids, every document packed as
                                      BOS + ids + EOS; beside each, datatrove's ``.ds.index`` (uint64 cumulative
                                      document ends, in tokens);
  * ``tokenizer/``                    the tokenizer the ids belong to, so the dataset is self-contained.
The manifest holds the dtype, vocab size, special ids, the tokenizer fingerprint, each split's files (in stream
order), document and token counts, the size and sha256 of every file, the split settings, the source corpus
fingerprint and, for an input written by `data curate`, the curation report's sha256 and settings.

A split is read as one stream: the concatenation of its files (`TokenStream`), memory-mapped, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from crosschip.errors import CrosschipError
from crosschip.fsio import sha256_file

FORMAT = "crosschip-tokens"
VERSION = 1
MANIFEST = "dataset.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
INDEX_SUFFIX = ".index"  # datatrove's document index beside each .ds file
_HASH_CHUNK = 1 << 22
_DTYPES = ("uint16", "uint32")


def token_dtype(vocab_size: int) -> np.dtype:
    """datatrove's choice (`PipelineStepWithTokenizer.token_size`): uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_val_document(doc_id: object, seed: int, val_fraction: float) -> bool:
    """Deterministic per-document split: a seeded hash of the document's id, uniform in [0, 1)."""
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < val_fraction


def index_path(token_file: Path) -> Path:
    return token_file.with_name(token_file.name + INDEX_SUFFIX)


class TokenStream:
    """Read-only view of several token files as one 1-D stream: ``len``, ``dtype``, ``[i]`` and ``[a:b]``.

    What `PackedBatches` and `eval_batches` need, without concatenating the files: a slice inside one file is a
    view of its memmap, a slice across files a fresh array of just those tokens.
    """

    ndim = 1

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = [p for p in parts if len(p)]
        if not self.parts:
            raise CrosschipError("a token stream needs at least one non-empty file", "re-create the dataset")
        self.dtype = self.parts[0].dtype
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])  # part i holds [starts[i], starts[i + 1])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def _part(self, position: int) -> int:
        return int(np.searchsorted(self.starts, position, side="right")) - 1

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("TokenStream slices take step 1")
            return self._range(start, stop)
        i = operator.index(key)
        i += len(self) if i < 0 else 0
        if not 0 <= i < len(self):
            raise IndexError(f"token {key} out of range for a stream of {len(self)}")
        part = self._part(i)
        return self.parts[part][i - self.starts[part]]

    def _range(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        first, last = self._part(start), self._part(stop - 1)
        if first == last:
            return self.parts[first][start - self.starts[first] : stop - self.starts[first]]
        pieces = [self.parts[first][start - self.starts[first] :], *self.parts[first + 1 : last],
                  self.parts[last][: stop - self.starts[last]]]
        return np.concatenate(pieces)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = np.asarray(self._range(0, len(self)))
        return whole.astype(dtype) if dtype is not None else whole


@dataclass
class TokenDataset:
    """An opened dataset: the train and val streams, the manifest and its sha256."""

    root: Path
    train: TokenStream
    val: TokenStream
    dtype: np.dtype
    vocab_size: int
    manifest_sha256: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / TOKENIZER_DIR

    def summary(self) -> dict[str, Any]:
        """The manifest without its file list, plus where it is and its sha256 (`data tokenize --json`)."""
        splits = {s: {**self.meta["splits"][s], "files": len(self.meta["splits"][s]["files"])} for s in SPLITS}
        keep = ("dtype", "vocab_size", "bos_token_id", "eos_token_id", "tokenizer_fingerprint", "val_fraction",
                "seed", "tasks", "source", "curation")
        return {"path": str(self.root), "manifest_sha256": self.manifest_sha256, **{k: self.meta.get(k) for k in keep},
                "splits": splits}

    def provenance(self) -> dict[str, Any]:
        """What a checkpoint records of the data that trained it (`crosschip.json` provenance)."""
        curation = self.meta.get("curation")
        return {
            "manifest_sha256": self.manifest_sha256,
            "path": str(self.root),
            "tokenizer_fingerprint": self.meta["tokenizer_fingerprint"],
            "splits": {s: {k: self.meta["splits"][s][k] for k in ("documents", "tokens")} for s in SPLITS},
            "source": self.meta.get("source"),
            "curation": {k: curation.get(k) for k in ("report_sha256", "config")} if curation else None,
        }


def is_dataset(path: Path) -> bool:
    """Whether `path` is meant as a tokenized dataset: a directory with a dataset.json (then open_dataset checks it)."""
    return (Path(path) / MANIFEST).is_file()


def member(root: Path, rel: object, manifest: str = MANIFEST, fix: str | None = None) -> Path:
    """`root / rel` for a path read from a manifest: relative, POSIX, no `..`, and staying inside root."""
    bad = CrosschipError(f"{root / manifest} names the path {rel!r}, which is not inside {root}",
                         fix or "re-create the dataset with crosschip data tokenize (the manifest was edited)")
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        raise bad
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or rel != pure.as_posix():
        raise bad
    path = root / pure
    if not os.path.realpath(path).startswith(os.path.realpath(root) + os.sep):  # a symlink out of the dataset
        raise bad
    return path


def _broken(root: Path, what: str) -> CrosschipError:
    return CrosschipError(f"dataset {root} is damaged: {what}",
                          "re-create it with crosschip data tokenize (or delete it: a training cache is rebuilt)")


def _read_manifest(root: Path) -> tuple[dict[str, Any], str]:
    path = root / MANIFEST
    try:
        raw = path.read_bytes()
        meta = json.loads(raw)
    except (OSError, ValueError) as e:
        raise CrosschipError(f"cannot read {path}: {e}", "re-create the dataset with crosschip data tokenize") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CrosschipError(f"{path} is not a crosschip token dataset manifest (format is not {FORMAT!r})",
                             "pass a directory written by crosschip data tokenize, or raw text")
    if meta.get("version") != VERSION:
        raise CrosschipError(f"{path} has format version {meta.get('version')!r}; this crosschip reads {VERSION}",
                             "re-create the dataset with this crosschip's data tokenize")
    return meta, hashlib.sha256(raw).hexdigest()


def check_files(root: Path, meta: dict[str, Any], verify: bool) -> None:
    """Every listed file exists with its recorded size; with `verify`, its sha256 too."""
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise _broken(root, "its manifest lists no files")
    for rel, record in files.items():
        path = member(root, rel)
        if not path.is_file():
            raise _broken(root, f"{rel} is missing")
        if path.stat().st_size != record.get("bytes"):
            raise _broken(root, f"{rel} has {path.stat().st_size} bytes, the manifest says {record.get('bytes')}")
        if verify and sha256_file(path) != record.get("sha256"):
            raise _broken(root, f"{rel} does not match its sha256")


def _open_split(root: Path, meta: dict[str, Any], split: str, dtype: np.dtype) -> TokenStream:
    info = meta["splits"][split]
    names = info["files"]
    if not isinstance(names, list) or not names:
        raise _broken(root, f"the {split} split lists no token files")
    parts, documents = [], 0
    for rel in names:
        path = member(root, rel)
        if rel not in meta["files"] or rel + INDEX_SUFFIX not in meta["files"]:
            raise _broken(root, f"{rel} or its index is not among the manifest's files")
        size = meta["files"][rel]["bytes"]
        if size % dtype.itemsize:
            raise _broken(root, f"{rel} is not a whole number of {dtype.name} tokens")
        parts.append(np.memmap(path, dtype=dtype, mode="r", shape=(size // dtype.itemsize,)))
        documents += meta["files"][rel + INDEX_SUFFIX]["bytes"] // 8
    stream = TokenStream(parts)
    if len(stream) != info["tokens"] or documents != info["documents"]:
        raise _broken(root, f"the {split} files hold {len(stream)} tokens / {documents} documents, the manifest "
                            f"says {info['tokens']} / {info['documents']}")
    return stream


def open_dataset(path: Path, verify: bool = False) -> TokenDataset:
    """Open the dataset at `path` (sizes always checked; every sha256 too with `verify`); CrosschipError if bad."""
    root = Path(path).resolve()
    meta, manifest_sha = _read_manifest(root)
    try:
        dtype = np.dtype(meta["dtype"])
        if meta["dtype"] not in _DTYPES or dtype != token_dtype(int(meta["vocab_size"])):
            raise _broken(root, f"dtype {meta['dtype']} does not fit vocab size {meta['vocab_size']}")
        check_files(root, meta, verify)
        train, val = (_open_split(root, meta, s, dtype) for s in SPLITS)
    except (KeyError, TypeError, ValueError) as e:
        raise _broken(root, f"its manifest is malformed ({type(e).__name__}: {e})") from e
    return TokenDataset(root, train, val, dtype, int(meta["vocab_size"]), manifest_sha, meta)
