"""One source shard read once, in order, by a background thread that hashes it and lends its chunks.

Reading a 2.8 GB FP8 checkpoint through the page cache cost ~2.7 s of kernel CPU on the 2-core
VM the benchmarks run on (page allocation and copies; `cat` of the files: 3.5 s wall, 2.75 s
sys), and the conversion read every byte twice: once to hash the shard for the record, once to
convert it. Here each shard is read once with `O_DIRECT` (the device writes straight into our
buffers: 0.1 s sys for the same bytes), hashed, and lent to the converting thread: a read that
falls inside one loaded chunk is a view of it, without a copy.

Reads must come roughly in file order for the stream to serve them (tensors are converted in file
order); anything else returns None and the caller falls back to its own positioned read, so results
never depend on the order, only the speed does.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import queue
import threading
from pathlib import Path

from crosschip.errors import CrosschipError

CHUNK = 8 * 2**20  # bytes per read: a multiple of the block size, large enough for the disk's speed
DEPTH = 4  # chunks in flight: the stream runs at most DEPTH * CHUNK bytes ahead of the consumer
_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the platform has no O_DIRECT

Chunk = tuple[int, mmap.mmap, int]  # (file offset, buffer, bytes in it)


class FileStream:
    """Reads and sha256-hashes one file in CHUNK pieces in a background thread.

    The consumer calls `read` with (mostly) non-decreasing offsets. Chunks wholly before a read
    are recycled, so memory stays DEPTH * CHUNK. `digest()` reads the rest and returns the file's
    sha256, whatever the consumer skipped.
    """

    def __init__(self, path: Path, chunk: int = CHUNK, depth: int = DEPTH) -> None:
        self.path = Path(path)
        try:
            self._fd = _open_direct(self.path)
        except OSError as e:
            raise CrosschipError(f"cannot open {self.path} ({e})", "check the file's permissions, or re-copy it") from e
        self._size = os.fstat(self._fd).st_size
        self._free: queue.Queue[mmap.mmap | None] = queue.Queue()
        for _ in range(depth):
            self._free.put(mmap.mmap(-1, chunk))  # anonymous maps are page-aligned, as O_DIRECT needs
        self._ready: collections.deque[Chunk] = collections.deque()
        self._base = 0  # bytes before this offset have left the stream
        self._cond = threading.Condition()
        self._hashed = 0  # bytes before this offset are hashed: only those chunks may be recycled
        self._drain = False  # the consumer is done: recycle each chunk once hashed
        self._stop = False  # closed: read no further
        self._done = False  # the reader thread has ended
        self._error: BaseException | None = None
        self._hash = hashlib.sha256()
        # Two threads, so that the disk reads chunk k+1 while chunk k is hashed.
        self._threads = [threading.Thread(target=self._run, name="crosschip-source", daemon=True),
                         threading.Thread(target=self._run_hash, name="crosschip-source-hash", daemon=True)]
        for thread in self._threads:
            thread.start()

    def read(self, start: int, nbytes: int, into: memoryview, recycle: bool = True,
             copy: bool = False) -> memoryview | None:
        """Bytes [start, start + nbytes), or None when the stream cannot serve them.

        Inside one chunk and without `copy`: a view of it, valid until the next `read`. Otherwise
        they are copied into `into`, streaming through chunks. `recycle=False` (a look-ahead read)
        keeps every chunk and serves only bytes already loaded.
        """
        end = start + nbytes
        with self._cond:
            if nbytes == 0 or self._drain:
                return None
            if recycle:
                self._recycle_before(start)
            if start < self._base or (not recycle and not self._loaded(end)):
                return None
            chunk = self._wait_for(start, recycle)
            if chunk is None:
                return None
            offset, buf, n = chunk
            if end <= offset + n and not copy:
                return memoryview(buf)[start - offset : end - offset]
            pos = start
            while pos < end:
                if chunk is None:
                    raise RuntimeError(f"{self.path}: byte {pos} left the stream during a read")  # a bug
                offset, buf, n = chunk
                take = min(end, offset + n) - pos
                into[pos - start : pos - start + take] = memoryview(buf)[pos - offset : pos - offset + take]
                pos += take
                chunk = self._wait_for(pos, recycle) if pos < end else None
            return into[:nbytes]

    def finish(self) -> None:
        """The consumer is done with this file: the thread reads and hashes the rest on its own."""
        with self._cond:
            self._drain = True
            self._recycle_before(self._size + 1)

    def digest(self) -> str:
        """Read and hash whatever is left; the file's sha256 hex digest."""
        self.finish()
        self._join()
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()

    def close(self) -> None:
        """Stop the thread without a digest (after an error elsewhere)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self.finish()
        self._free.put(None)
        self._join()

    def _join(self) -> None:
        for thread in self._threads:
            thread.join()
        while not self._free.empty():  # unused buffers go now; lent ones with their last view
            self._free.get_nowait()

    def _loaded(self, end: int) -> bool:
        return bool(self._ready) and self._ready[-1][0] + self._ready[-1][2] >= end

    def _wait_for(self, pos: int, recycle: bool) -> Chunk | None:
        """The loaded chunk holding byte `pos`, waiting for the thread to load it; None if it is gone.

        With `recycle`, chunks before `pos` are handed back while waiting: a read far ahead would
        otherwise fill every buffer with bytes before it and wait forever. Call with the lock held.
        """
        while True:
            if recycle:
                self._recycle_before(pos)
            if pos < self._base:
                return None
            for chunk in self._ready:
                if chunk[0] <= pos < chunk[0] + chunk[2]:
                    return chunk
            if self._error is not None:
                raise self._error
            if self._done:
                raise CrosschipError(f"{self.path} is truncated: byte {pos} is past its end", "re-copy the file")
            self._cond.wait()

    def _recycle_before(self, pos: int) -> None:
        """Hand back every hashed chunk that ends at or before `pos`. Call with the lock held."""
        pos = min(pos, self._hashed)
        while self._ready and self._ready[0][0] + self._ready[0][2] <= pos:
            offset, buf, n = self._ready.popleft()
            self._base = offset + n
            if not self._done:  # else nothing reads into it again: let it go with its last view
                self._free.put(buf)

    def _run(self) -> None:
        try:
            offset = 0
            while offset < self._size:
                buf = self._free.get()
                if buf is None or self._stop:
                    return
                n = self._fill(buf, offset)
                with self._cond:
                    self._ready.append((offset, buf, n))
                    self._cond.notify_all()
                offset += n
        except OSError as e:  # a disk or filesystem error: the consumer reports it in one line
            self._error = CrosschipError(f"cannot read {self.path} ({e})", "check the disk, or re-copy the file")
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._error = e
        finally:
            os.close(self._fd)
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _run_hash(self) -> None:
        """Hash the loaded chunks in file order, as the reader thread publishes them."""
        while self._hashed < self._size:
            with self._cond:
                chunk = self._next_to_hash()
                while chunk is None and not (self._stop or self._error is not None or self._done):
                    self._cond.wait()
                    chunk = self._next_to_hash()
                if chunk is None:
                    return  # stopped, failed, or the file ended early (the reader reports it)
            offset, buf, n = chunk
            self._hash.update(memoryview(buf)[:n])  # hashlib releases the GIL
            with self._cond:
                self._hashed = offset + n
                if self._drain:
                    self._recycle_before(self._size + 1)
                self._cond.notify_all()

    def _next_to_hash(self) -> Chunk | None:
        return next((c for c in self._ready if c[0] == self._hashed), None)

    def _fill(self, buf: mmap.mmap, offset: int) -> int:
        """Read buf's worth (less at the end of the file) from `offset`; the bytes read."""
        view, n = memoryview(buf), 0
        want = min(len(buf), self._size - offset)
        while n < want:
            try:
                # O_DIRECT wants whole blocks: ask for the full chunk; the file's end shortens it.
                got = os.preadv(self._fd, [view[n:]], offset + n)
            except OSError as e:
                if e.errno != errno.EINVAL or not _DIRECT:
                    raise
                _buffered(self._fd)  # the filesystem took the flag at open but refuses direct reads
                continue
            if not got:
                raise CrosschipError(f"{self.path} shrank while it was read", "re-copy the file")
            n += got
            if n < want and n % 4096:
                _buffered(self._fd)  # a short unaligned read: the rest goes through the page cache
        return min(n, want)


def _open_direct(path: Path) -> int:
    """Open path for reading, with O_DIRECT where the filesystem accepts it."""
    if _DIRECT:
        with contextlib.suppress(OSError):  # EINVAL: tmpfs and others refuse the flag at open
            return os.open(path, os.O_RDONLY | _DIRECT)
    return os.open(path, os.O_RDONLY)


def _buffered(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_DIRECT)
