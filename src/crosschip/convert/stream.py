"""Streaming safetensors I/O: read one tensor at a time, write shards whose headers are known upfront.

A safetensors file is `u64 header length | JSON header | raw tensor bytes`. Because every output
tensor's name, dtype and shape follow from the conversion plan before any data is read, each
output shard's header is written first and tensor bytes are appended as they are produced: memory
holds a few tensors, never a shard, and nothing is copied twice.
"""

from __future__ import annotations

import json
import math
import os
import queue
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from crosschip.checkpoint import safe_member
from crosschip.convert.source_stream import CHUNK as STREAM_CHUNK
from crosschip.convert.source_stream import FileStream
from crosschip.errors import CrosschipError
from crosschip.seqio import SequentialWriter

# safetensors dtype codes (https://github.com/huggingface/safetensors, `Dtype` in safetensors/src/tensor.rs)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # safetensors' own limit on header size
PART_BYTES = 16 * 2**20  # largest write queued at once: small next to tensors, large for the disk


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
    """Lazy reads of named tensors from a checkpoint's shards (handles opened once).

    Each tensor is read into a buffer of its own at the offset its header gives, not mapped: the
    pages of a mapped file that a process has touched count in its RSS until the map is closed, so
    reading through safetensors' mmap (`safe_open`) made peak RSS grow with the model's size.
    """

    def __init__(self, root: Path, infos: Mapping[str, TensorInfo]) -> None:
        self.root, self.infos = root, infos
        self._handles: dict[str, BinaryIO] = {}

    def get(self, name: str) -> torch.Tensor:
        return self._read(self._info(name))

    def get_rows(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [start, stop) of a tensor, read into `out` (a uint8 buffer at least that large)."""
        return self._read(self._rows_info(name, start, stop), out)

    def _rows_info(self, name: str, start: int, stop: int) -> TensorInfo:
        """Rows [start, stop) of a tensor, described as a tensor of their own."""
        info = self._info(name)
        row_bytes = info.nbytes // max(info.shape[0], 1)
        return TensorInfo(name, info.file, info.dtype, (stop - start, *info.shape[1:]), info.offset + start * row_bytes)

    def _info(self, name: str) -> TensorInfo:
        info = self.infos.get(name)
        if info is None:
            raise CrosschipError(f"tensor {name} is not in the checkpoint", "the checkpoint is incomplete")
        return info

    def _read(self, info: TensorInfo, out: torch.Tensor | None = None) -> torch.Tensor:
        try:
            return read_tensor(self._handle(info.file), info, out)
        except OSError as e:
            raise CrosschipError(f"cannot read tensor {info.name} from {info.file} ({e})", "re-copy the file") from e

    def _handle(self, file: str) -> BinaryIO:
        if file not in self._handles:
            path = safe_member(self.root, file, "model.safetensors.index.json")
            self._handles[file] = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        return self._handles[file]

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


class StreamingReader(SourceReader):
    """A SourceReader whose shards are each read once, in file order, by a hashing `FileStream`.

    Reads in file order are served from the stream (row blocks without a copy); any other read
    falls back to `SourceReader`'s positioned read, so only speed depends on the order.
    `digests()` gives every shard's sha256 for the conversion record.
    """

    def __init__(self, root: Path, infos: Mapping[str, TensorInfo], files: Iterable[str]) -> None:
        super().__init__(root, infos)
        self._files = list(files)
        self._streams: dict[str, FileStream] = {}
        self._current: str | None = None

    def get(self, name: str) -> torch.Tensor:
        info = self._info(name)
        # A small tensor may be read ahead of bytes still to come (an FP8 weight's scale): it is served
        # only if already loaded, so that it never makes the stream drop them.
        big = info.nbytes >= STREAM_CHUNK
        if not big and info.file != self._current:
            return super().get(name)  # a look-up in another shard: never start (or skip) its stream for it
        data = torch.empty(info.nbytes, dtype=torch.uint8)
        got = self._stream(info.file, advance=big).read(info.offset, info.nbytes, memoryview(data.numpy()),
                                                        recycle=big, copy=True)
        if got is None:
            return super().get(name)
        return data.view(info.dtype).reshape(info.shape)

    def get_rows(self, name: str, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """As SourceReader.get_rows, but the rows may be a view of the stream, valid until the next read."""
        rows = self._rows_info(name, start, stop)
        got = self._stream(rows.file).read(rows.offset, rows.nbytes, memoryview(out.numpy())[: rows.nbytes])
        if got is None:
            return self._read(rows, out)
        return torch.frombuffer(got, dtype=torch.uint8).view(rows.dtype).reshape(rows.shape)

    def digests(self) -> dict[str, str]:
        """sha256 of every shard (reading whatever the conversion did not)."""
        return {f: self._stream(f, advance=False).digest() for f in self._files}

    def close(self) -> None:
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()
        super().close()

    def _stream(self, file: str, advance: bool = True) -> FileStream:
        """The stream of `file`; `advance`: the conversion has moved on to it (not a look-up)."""
        if advance and file != self._current:
            if self._current is not None:
                self._streams[self._current].finish()  # moving on: its tail is hashed in the background
            self._current = file
        if file not in self._streams:
            self._streams[file] = FileStream(safe_member(self.root, file, "model.safetensors.index.json"))
            self._prefetch_small(file)
        return self._streams[file]

    def _prefetch_small(self, file: str) -> None:
        """Have the kernel fetch the shard's small tensors now (FP8 scales, norms): they are often read
        out of file order, through the page cache, which the O_DIRECT stream leaves cold. Without
        this, each was a random disk read on the converting thread (~0.8 s per 2.8 GB here)."""
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return
        fd = self._handle(file).fileno()
        for info in self.infos.values():
            if info.file == file and 0 < info.nbytes < STREAM_CHUNK:
                advise(fd, info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)


def read_tensor(f: BinaryIO, info: TensorInfo, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes from an open (unbuffered) shard straight into a new tensor, or into `out`.

    Reusing `out` (uint8) matters beyond memory: each first touch of fresh memory is a page fault,
    which on the 2-core VM these figures come from cost ~2 s per 2.8 GB read.
    """
    if out is not None and out.nbytes < info.nbytes:
        raise ValueError(f"a {out.nbytes}-byte buffer cannot hold {info.nbytes} bytes of {info.name}")  # a bug
    data = torch.empty(info.nbytes, dtype=torch.uint8) if out is None else out.view(-1)[: info.nbytes]
    view = memoryview(data.numpy())
    f.seek(info.offset)
    done = 0
    while done < info.nbytes:
        n = f.readinto(view[done:])
        if not n:
            raise CrosschipError(f"{info.file} is truncated: tensor {info.name} ends past the end of the file",
                                 "re-copy the file")
        done += n
    return data.view(info.dtype).reshape(info.shape)


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


class _ClosedEarly(RuntimeError):
    """The producer closed the writer before every planned tensor arrived (it failed, or a bug)."""


class ShardWriter:
    """Writes planned shards in a background thread (overlapping conversion), hashing as it writes.

    Tensors must come in the planned order, each checked against its spec: whole (`put`) or as
    consecutive row blocks (`begin` then `put_part`, so a tensor converted block by block never
    exists whole). The queue holds at most `depth` parts of at most PART_BYTES, so the producer
    runs at most that far ahead of the disk and memory stays about two tensors, not a shard.
    Parts of a whole tensor are views of it; a block-converted tensor's parts are ~2 MiB row blocks,
    so 8 of them cost ~16 MiB and absorb the writer's stalls (with 2 the producer waited ~0.9 s per
    2.8 GB FP8 conversion, with 8-16 ~0.3-0.7 s).
    """

    def __init__(self, out_dir: Path, shards: list[list[OutSpec]], names: list[str], depth: int = 8) -> None:
        self.out_dir, self.shards, self.names = out_dir, shards, names
        self.order = [(i, s) for i, shard in enumerate(shards) for s in shard]
        self.sha256: dict[str, str] = {}
        self._queue: queue.Queue[torch.Tensor | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._next = 0
        self._pending = 0  # bytes of the current tensor not yet put
        self._thread = threading.Thread(target=self._run, name="crosschip-writer", daemon=True)
        self._thread.start()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Queue a whole tensor (in parts of at most PART_BYTES)."""
        self.begin(name, tensor.dtype, tuple(tensor.shape))
        flat = tensor.contiguous().reshape(-1)
        for part in flat.split(max(1, PART_BYTES // flat.element_size())):
            self.put_part(part)

    def begin(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        """Start the next planned tensor; its bytes follow, in order, through `put_part`."""
        if self._error is not None:
            raise self._error
        if self._pending:
            raise RuntimeError(f"{self._pending} bytes of the previous tensor were never put")  # a crosschip bug
        shard, spec = self.order[self._next]
        if name != spec.name or dtype != spec.dtype or shape != spec.shape:
            raise RuntimeError(f"planned {spec}, got {name} {dtype} {list(shape)}")  # a crosschip bug
        self._next += 1
        self._pending = spec.nbytes

    def put_part(self, part: torch.Tensor) -> None:
        """Queue the next bytes of the tensor started by `begin` (any contiguous block of its elements)."""
        if self._error is not None:
            raise self._error
        _, spec = self.order[self._next - 1]
        if part.dtype != spec.dtype or part.nbytes > self._pending:
            raise RuntimeError(f"{spec.name}: part {part.dtype} of {part.nbytes} bytes does not fit")  # a bug
        self._pending -= part.nbytes
        if part.nbytes:
            self._queue.put(part.contiguous())

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._next != len(self.order) or self._pending:
            raise RuntimeError(f"wrote {self._next} of {len(self.order)} planned tensors, "
                               f"{self._pending} bytes short")

    def abort(self) -> None:
        """End the thread after the producer failed; raises nothing, so the producer's error is reported."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        try:
            for shard, name in zip(self.shards, self.names, strict=True):
                self._write_shard(shard, self.out_dir / name, name)
            self._queue.get()  # the closing None
        except _ClosedEarly as e:
            self._error = e  # the closing None is consumed: draining would wait forever
        except BaseException as e:  # noqa: BLE001 - handed to the producer thread, which re-raises it
            self._error = e
            while self._queue.get() is not None:  # drain so the producer never blocks forever
                pass

    def _write_shard(self, shard: list[OutSpec], path: Path, name: str) -> None:
        out = SequentialWriter(path)
        try:
            out.write(shard_header(shard))
            for spec in shard:
                left = spec.nbytes
                while left > 0:
                    part = self._queue.get()
                    if part is None:
                        raise _ClosedEarly("writer closed before all tensors arrived")
                    out.write(part.reshape(-1).view(torch.uint8).numpy())
                    left -= part.nbytes
        except BaseException:
            out.abort()
            raise
        self.sha256[name] = out.close()
