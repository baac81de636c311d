"""FileStream and StreamingReader: the bytes and sha256 of a plain read, in any order of reads."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from crosschip.convert.source_stream import FileStream
from crosschip.convert.stream import SourceReader, StreamingReader, scan_file
from crosschip.errors import CrosschipError

CHUNK = 64 * 1024  # small chunks: every test crosses many chunk edges


def make_file(directory: Path, size: int, seed: int = 0) -> tuple[Path, bytes]:
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    path = directory / "blob.bin"
    path.write_bytes(data.numpy().tobytes())
    return path, path.read_bytes()


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[list[Path]]:
    """A directory on the test filesystem (O_DIRECT where it allows) and one on tmpfs (never O_DIRECT)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield [tmp_path]
        return
    d = Path(tempfile.mkdtemp(prefix="crosschip-test-", dir=shm))
    try:
        yield [tmp_path, d]
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("size", [0, 1, 4095, CHUNK, 3 * CHUNK + 12345])
def test_digest_is_the_files_sha256_whatever_was_read(dirs: list[Path], size: int) -> None:
    for d in dirs:
        path, data = make_file(d, size)
        for reads in ([], [(0, min(size, 10))], [(size // 2, size - size // 2)]):
            stream = FileStream(path, chunk=CHUNK, depth=2)
            for start, n in reads:
                got = stream.read(start, n, memoryview(bytearray(n)))
                assert got is None or bytes(got) == data[start : start + n]
            assert stream.digest() == hashlib.sha256(data).hexdigest()


def test_reads_in_order_return_the_bytes_views_or_copies(dirs: list[Path]) -> None:
    for d in dirs:
        path, data = make_file(d, 5 * CHUNK + 777)
        stream = FileStream(path, chunk=CHUNK, depth=3)
        pos, gen = 0, torch.Generator().manual_seed(1)
        while pos < len(data):
            n = min(int(torch.randint(1, 2 * CHUNK, (1,), generator=gen)), len(data) - pos)  # some straddle chunks
            got = stream.read(pos, n, memoryview(bytearray(n)))
            assert got is not None and bytes(got) == data[pos : pos + n]
            pos += n
        assert stream.digest() == hashlib.sha256(data).hexdigest()


def test_a_read_behind_the_stream_is_refused_and_a_far_jump_does_not_hang(tmp_path: Path) -> None:
    path, data = make_file(tmp_path, 10 * CHUNK)
    stream = FileStream(path, chunk=CHUNK, depth=2)
    done = threading.Event()

    def jump() -> None:  # far past the 2 buffers: the chunks before it must be recycled while waiting
        start = 8 * CHUNK + 5
        assert bytes(stream.read(start, 100, memoryview(bytearray(100)))) == data[start : start + 100]
        done.set()

    worker = threading.Thread(target=jump)
    worker.start()
    worker.join(timeout=30)
    assert done.is_set(), "a read far ahead of the stream deadlocked"
    assert stream.read(0, 10, memoryview(bytearray(10))) is None  # gone: the caller reads it itself
    assert stream.digest() == hashlib.sha256(data).hexdigest()


def test_a_look_ahead_read_never_drops_bytes_still_to_come(tmp_path: Path) -> None:
    path, data = make_file(tmp_path, 6 * CHUNK)
    stream = FileStream(path, chunk=CHUNK, depth=4)
    assert bytes(stream.read(10, 20, memoryview(bytearray(20)))) == data[10:30]
    # a small read further on, served only if loaded, and never recycling what is before it
    ahead = stream.read(2 * CHUNK, 50, memoryview(bytearray(50)), recycle=False, copy=True)
    assert ahead is None or bytes(ahead) == data[2 * CHUNK : 2 * CHUNK + 50]
    assert bytes(stream.read(30, CHUNK, memoryview(bytearray(CHUNK)))) == data[30 : 30 + CHUNK]
    stream.close()


def test_a_file_that_shrank_is_an_error_not_a_hang(tmp_path: Path) -> None:
    path, _ = make_file(tmp_path, 4 * CHUNK)
    stream = FileStream(path, chunk=CHUNK, depth=1)
    os.truncate(path, CHUNK + 10)  # after the stream took the size, before it read that far
    with pytest.raises(CrosschipError, match="shrank|truncated"):
        stream.read(3 * CHUNK, 10, memoryview(bytearray(10)))
        stream.digest()
    stream.close()


def test_streaming_reader_matches_source_reader_in_any_order(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(int(torch.randint(1, 300, (1,), generator=gen)), 64, generator=gen)
               for i in range(12)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    infos = {i.name: i for i in scan_file(tmp_path, "model.safetensors")}
    plain = SourceReader(tmp_path, infos)
    in_order = sorted(infos, key=lambda n: infos[n].offset)
    for order in (in_order, in_order[::-1]):
        reader = StreamingReader(tmp_path, infos, ["model.safetensors"])
        reader._current = "model.safetensors"  # noqa: SLF001 - as after a first row read
        for name in order:
            rows = infos[name].shape[0]
            buf = torch.empty(rows * 64 * 4, dtype=torch.uint8)
            torch.testing.assert_close(reader.get_rows(name, 1, rows, buf), plain.get(name)[1:], rtol=0, atol=0)
            torch.testing.assert_close(reader.get(name), plain.get(name), rtol=0, atol=0)
        digest = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
        assert reader.digests() == {"model.safetensors": digest}
        reader.close()
    plain.close()


def test_an_unreadable_shard_is_a_one_line_error(tmp_path: Path) -> None:
    path, _ = make_file(tmp_path, CHUNK)
    with pytest.raises(CrosschipError, match="cannot open"):
        FileStream(tmp_path / "missing.bin")
    assert path.read_bytes()  # the input is untouched
