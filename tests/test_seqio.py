"""SequentialWriter: the file it writes is exactly the bytes given, whatever the chunking or filesystem."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from crosschip.seqio import ALIGN, SequentialWriter

SHM = Path("/dev/shm")  # tmpfs: refuses O_DIRECT at open, so the buffered path runs


def targets(tmp_path: Path) -> list[Path]:
    out = [tmp_path]
    if SHM.is_dir() and os.access(SHM, os.W_OK):
        out.append(SHM)
    return out


@pytest.mark.parametrize("sizes", [[0], [1], [ALIGN], [ALIGN + 3, 5], [3 * ALIGN - 1, 7 * ALIGN + 11, 1, 0, 99_999]])
def test_bytes_and_sha256_are_exact(tmp_path: Path, sizes: list[int]) -> None:
    rng = np.random.default_rng(len(sizes))
    parts = [rng.integers(0, 256, size=n, dtype=np.uint8) for n in sizes]
    expected = b"".join(p.tobytes() for p in parts)
    for root in targets(tmp_path):
        path = root / f"crosschip-seqio-{os.getpid()}.bin"
        try:
            out = SequentialWriter(path, chunk=2 * ALIGN, depth=2)  # tiny chunks: many full ones and a tail
            for p in parts:
                out.write(p)
            assert out.close() == hashlib.sha256(expected).hexdigest()
            assert path.read_bytes() == expected, root  # the alignment padding is truncated away
        finally:
            path.unlink(missing_ok=True)


def test_a_write_error_reaches_the_caller(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    out = SequentialWriter(path, chunk=ALIGN, depth=2)
    os.close(out._fd)  # the background writes now fail with EBADF
    out._fd = os.open(os.devnull, os.O_RDONLY)  # still a descriptor for close() to close: read-only
    try:
        for _ in range(4):  # the second full chunk waits for the first to fail, then raises here
            out.write(b"x" * ALIGN)
    except OSError:
        out.abort()
    else:
        with pytest.raises(OSError):
            out.close()


def test_chunk_must_be_aligned(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple"):
        SequentialWriter(tmp_path / "f.bin", chunk=ALIGN + 1)
