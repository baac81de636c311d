"""Atomic filesystem helpers: outputs appear whole (temp + fsync + rename) or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crosschip.errors import CrosschipError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode open()/mkdir() would give a new file/directory under the current umask (0644/0755 usually)."""
    return (0o777 if directory else 0o666) & ~_umask()


def normalize_modes(root: Path) -> None:
    """Give every file below root the default mode: some writers (transformers' safetensors shards,
    mkstemp) create 0600 files, which other users and serving processes then cannot read."""
    file_mode = default_mode()
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), file_mode)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below root (bottom-up)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so readers see the old content or the new, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes 0600 files; a checkpoint must be readable like any normally created file.
        os.chmod(tmp, default_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse an existing output unless the user asked to overwrite it."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CrosschipError(f"output {path} already exists", "pass --overwrite or choose another path")
    if path.exists() and not path.is_dir():
        raise CrosschipError(f"output {path} exists and is not a directory", "remove it or choose another path")


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside `final`; on success fsync it and rename it into place.

    The temp directory lives on the same filesystem (a sibling), so the rename is atomic.
    A crash at any point leaves `final` either absent, the old version, or the new one:
    never a half-written directory under the final name.
    """
    final = Path(final)
    check_output_dir(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    os.chmod(tmp, default_mode(directory=True))  # mkdtemp makes 0700 directories
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            # Move the old one aside first: rename() cannot replace a non-empty directory.
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
            os.rename(final, old / "x")
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
