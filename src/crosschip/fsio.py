"""Atomic filesystem helpers: outputs appear whole (temp + fsync + rename) or not at all.

Every temporary is a hidden sibling named `.<final>.tmp-<host>-<pid>-<random>` (`.old-` for a replaced
directory on its way out): the host is a hash of this machine's name and the pid the writing process. A process
killed mid-write (SIGKILL, OOM, power) cannot clean up, so every atomic writer first reclaims the temporaries in
its directory whose owner is gone: same host, and the pid is not running (or now belongs to a process started
after the temporary was last written). Each removal is reported on stderr. Live writers, other hosts on a shared
filesystem and untagged files are never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from crosschip.errors import CrosschipError

HOST_TAG = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()
_TAGGED = re.compile(r"^\..+\.(?:tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[a-z0-9_]+$")
_CLOCK_SLACK_S = 2.0  # process start times are rounded; a temporary is never older than its writer by more



def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_records(root: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {bytes, sha256}} of every file below root, sorted (a manifest's file table)."""
    records = {}
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        records[path.relative_to(root).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return records

def _report_reclaimed(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def temp_prefix(final: Path, kind: str = "tmp") -> str:
    """`.<name>.<kind>-<host>-<pid>-`: the owner-tagged prefix of a temporary beside `final`."""
    return f".{Path(final).name}.{kind}-{HOST_TAG}-{os.getpid()}-"


def _owner_alive(pid: int, written: float) -> bool:
    """Whether the process that wrote a temporary (last modified at `written`) may still be writing it."""
    if pid == os.getpid():
        return True
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        # A pid reused by a process that started after the temporary was written is not its owner.
        return proc.create_time() <= written + _CLOCK_SLACK_S
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # e.g. AccessDenied: someone else's live process; leave its files alone
        return True


def _tree_bytes(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if not f.is_dir() or f.is_symlink())


def reclaim_stale(directory: Path) -> list[Path]:
    """Remove the temporaries in `directory` left by dead crosschip processes on this host; return them."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed: list[Path] = []
    for entry in entries:
        match = _TAGGED.match(entry.name)
        if match is None or match["host"] != HOST_TAG:
            continue
        path = Path(entry.path)
        try:
            if _owner_alive(int(match["pid"]), path.lstat().st_mtime):
                continue
            size = _tree_bytes(path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:  # reclaimed by another writer first, or not ours to remove (another user's, in /tmp)
            continue
        removed.append(path)
        _report_reclaimed(f"removed stale temporary {path} ({size / 2**20:.1f} MiB) "
                          f"left by process {match['pid']}, which is gone")
    return removed


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
    reclaim_stale(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path))
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
    reclaim_stale(final.parent)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=temp_prefix(final)))
    os.chmod(tmp, default_mode(directory=True))  # mkdtemp makes 0700 directories
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            # Move the old one aside first: rename() cannot replace a non-empty directory.
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=temp_prefix(final, "old")))
            os.rename(final, old / "x")
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def scratch_dir(name: str, parent: Path | None = None) -> Iterator[Path]:
    """A private temporary directory (in `parent`, default $TMPDIR), removed on exit and owner-tagged, so that
    the next run reclaims the one a killed process left (a tokenizer, a golden conversion: model-sized)."""
    root = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    reclaim_stale(root)
    path = Path(tempfile.mkdtemp(dir=root, prefix=temp_prefix(root / name)))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
