"""Streaming safetensors I/O: read one tensor at a time, write shards whose headers are known upfront.

A safetensors file is `u64 header length | JSON header | raw tensor bytes`. Because every output
tensor's name, dtype and shape follow from the conversion plan before any data is read, each
output shard's header is written first and tensor bytes are appended as they are produced: memory
holds a few tensors, never a shard, and nothing is copied twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch

from crosschip.checkpoint import safe_member
from crosschip.errors import CrosschipError

# safetensors dtype codes (https://github.com/huggingface/safetensors, `Dtype` in safetensors/src/tensor.rs)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # safetensors' own limit on header size


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # start of the data inside the file (for reading in file order)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and validate a safetensors header; return (entries, data start). Names the file on error."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CrosschipError(f"{path} is truncated (no safetensors header)", "re-copy the file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise CrosschipError(f"{path} is not a valid safetensors file (header length {n})", "re-copy the file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CrosschipError(f"{path} has a corrupt safetensors header ({e})", "re-copy the file") from e
    if not isinstance(header, dict):
        raise CrosschipError(f"{path} has a corrupt safetensors header", "re-copy the file")
    header.pop("__metadata__", None)
    return header, 8 + n


def scan_file(root: Path, file: str) -> list[TensorInfo]:
    """Every tensor of one shard, validated against the file's size (truncation is caught here)."""
    path = safe_member(root, file, "model.safetensors.index.json")
    header, start = read_header(path)
    size, infos = path.stat().st_size, []
    for name, meta in header.items():
        code = meta.get("dtype") if isinstance(meta, dict) else meta
        dtype = DTYPES.get(code) if isinstance(code, str) else None
        if dtype is None:
            raise CrosschipError(
                f"tensor {name} in {file} has unsupported dtype {code!r}",
                f"crosschip reads {', '.join(DTYPES)}",
            )
        shape, (begin, end) = tuple(int(s) for s in meta["shape"]), meta["data_offsets"]
        info = TensorInfo(name, file, dtype, shape, start + begin)
        if end - begin != info.nbytes:
            raise CrosschipError(f"tensor {name} in {file}: shape {list(shape)} does not match its byte size",
                                 "re-export the checkpoint")
        if start + end > size:
            raise CrosschipError(f"{file} is truncated: tensor {name} ends past the end of the file",
                                 "re-copy the file")
        infos.append(info)
    return infos


class SourceReader:
    """Lazy reads of named tensors from a checkpoint's shards (handles opened once, mmap-backed)."""

    def __init__(self, root: Path, infos: Mapping[str, TensorInfo]) -> None:
        self.root, self.infos = root, infos
        self._handles: dict[str, Any] = {}

    def get(self, name: str) -> torch.Tensor:
        info = self.infos.get(name)
        if info is None:
            raise CrosschipError(f"tensor {name} is not in the checkpoint", "the checkpoint is incomplete")
        if info.file not in self._handles:
            path = safe_member(self.root, info.file, "model.safetensors.index.json")
            self._handles[info.file] = safetensors.safe_open(path, "pt")
        try:
            return self._handles[info.file].get_tensor(name)
        except (safetensors.SafetensorError, OSError) as e:
            raise CrosschipError(f"cannot read tensor {name} from {info.file} ({e})", "re-copy the file") from e

    def close(self) -> None:
        self._handles.clear()


@dataclass(frozen=True)
class OutSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def assign_shards(specs: Iterable[OutSpec], max_bytes: int) -> list[list[OutSpec]]:
    """Split specs, in order, into shards of at most max_bytes (a larger tensor gets its own)."""
    shards: list[list[OutSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return [s for s in shards if s]


def shard_header(specs: list[OutSpec]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": CODES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors itself writes
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes planned shards in a background thread (overlapping conversion), hashing as it writes.

    `put(spec, tensor)` must follow the planned order; each tensor is checked against its spec.
    A bounded queue keeps at most `depth` tensors in flight, so memory stays a few tensors.
    """

    def __init__(self, out_dir: Path, shards: list[list[OutSpec]], names: list[str], depth: int = 2) -> None:
        self.out_dir, self.shards, self.names = out_dir, shards, names
        self.order = [(i, s) for i, shard in enumerate(shards) for s in shard]
        self.sha256: dict[str, str] = {}
        self._queue: queue.Queue[torch.Tensor | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._next = 0
        self._thread = threading.Thread(target=self._run, name="crosschip-writer", daemon=True)
        self._thread.start()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        shard, spec = self.order[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"planned {spec}, got {name} {tensor.dtype} {list(tensor.shape)}")  # a crosschip bug
        self._next += 1
        self._queue.put(tensor.contiguous())

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._next != len(self.order):
            raise RuntimeError(f"wrote {self._next} of {len(self.order)} planned tensors")

    def _run(self) -> None:
        try:
            for shard, name in zip(self.shards, self.names, strict=True):
                self._write_shard(shard, self.out_dir / name, name)
            self._queue.get()  # the closing None
        except BaseException as e:  # noqa: BLE001 - handed to the producer thread, which re-raises it
            self._error = e
            while self._queue.get() is not None:  # drain so the producer never blocks forever
                pass

    def _write_shard(self, shard: list[OutSpec], path: Path, name: str) -> None:
        digest = hashlib.sha256()
        with open(path, "wb") as f:
            header = shard_header(shard)
            f.write(header)
            digest.update(header)
            for _ in shard:
                tensor = self._queue.get()
                if tensor is None:
                    raise RuntimeError("writer closed before all tensors arrived")
                data = tensor.view(torch.uint8).numpy() if tensor.numel() else b""
                f.write(data)
                digest.update(data)
        self.sha256[name] = digest.hexdigest()


def hash_files(paths: Mapping[str, Path], result: dict[str, str]) -> threading.Thread:
    """sha256 the given files (name -> path) in a background thread; hashlib releases the GIL."""

    def run() -> None:
        for name, path in paths.items():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(16 * 2**20):
                    h.update(block)
            result[name] = h.hexdigest()

    thread = threading.Thread(target=run, name="crosschip-hash", daemon=True)
    thread.start()
    return thread
