"""Atomic outputs: whole or absent, normal permissions, nothing left behind on failure."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from crosschip.errors import CrosschipError
from crosschip.fsio import (
    HOST_TAG,
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    check_output_dir,
    default_mode,
    normalize_modes,
    reclaim_stale,
)


@pytest.fixture()
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class Boom(RuntimeError):
    pass


def test_atomic_write_bytes_creates_replaces_and_is_readable(tmp_path: Path, umask_022: None) -> None:
    target = tmp_path / "sub" / "dir" / "f.bin"
    atomic_write_bytes(target, b"one")
    assert target.read_bytes() == b"one"
    assert mode(target) == 0o644  # not mkstemp's 0600
    atomic_write_bytes(target, b"two, longer")
    assert target.read_bytes() == b"two, longer"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]


def test_atomic_write_bytes_follows_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic_write_bytes(tmp_path / "private", b"x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "private") == 0o600


def test_atomic_write_failure_keeps_old_content_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_atomic_write_json_round_trips(tmp_path: Path) -> None:
    obj = {"b": [1, 2.5, None], "a": "ü"}
    atomic_write_json(tmp_path / "x.json", obj)
    text = (tmp_path / "x.json").read_text()
    assert json.loads(text) == obj and text.endswith("\n")
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "x.json", {"not": object()})
    assert json.loads((tmp_path / "x.json").read_text()) == obj


def test_atomic_dir_publishes_whole_with_normal_modes(tmp_path: Path, umask_022: None) -> None:
    final = tmp_path / "out" / "ckpt"
    with atomic_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".ckpt.tmp-")
        assert not final.exists()  # nothing under the final name until the block succeeds
        (tmp / "a.txt").write_text("a")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "b.txt").write_text("b")
    assert (final / "a.txt").read_text() == "a" and (final / "nested" / "b.txt").read_text() == "b"
    assert mode(final) == 0o755  # not mkdtemp's 0700
    assert mode(final / "a.txt") == 0o644
    assert [p.name for p in final.parent.iterdir()] == ["ckpt"]


def test_atomic_dir_refuses_existing_without_overwrite(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "keep.txt").write_text("keep")
    with pytest.raises(CrosschipError, match="already exists") as e, atomic_dir(final):
        pytest.fail("the body must not run")
    assert "--overwrite" in (e.value.fix or "")
    assert (final / "keep.txt").read_text() == "keep"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_atomic_dir_overwrite_replaces_the_whole_directory(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").exists()  # the old version stays readable until the swap
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no .old-/.tmp- leftovers


@pytest.mark.parametrize("existing", [False, True])
def test_atomic_dir_exception_leaves_old_state_and_no_temp(tmp_path: Path, existing: bool) -> None:
    final = tmp_path / "ckpt"
    if existing:
        final.mkdir()
        (final / "old.txt").write_text("old")
    with pytest.raises(Boom), atomic_dir(final, overwrite=True) as tmp:
        (tmp / "half.txt").write_text("half")
        raise Boom
    if existing:
        assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
        assert (final / "old.txt").read_text() == "old"
    else:
        assert not final.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["ckpt"] if existing else [])


def test_atomic_dir_keyboard_interrupt_cleans_up(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "ckpt"):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_check_output_dir(tmp_path: Path) -> None:
    check_output_dir(tmp_path / "new", overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CrosschipError, match="already exists"):
        check_output_dir(tmp_path / "file", overwrite=False)
    with pytest.raises(CrosschipError, match="not a directory"):
        check_output_dir(tmp_path / "file", overwrite=True)
    check_output_dir(tmp_path, overwrite=True)


def test_normalize_modes(tmp_path: Path, umask_022: None) -> None:
    (tmp_path / "d").mkdir()
    for f in (tmp_path / "a", tmp_path / "d" / "b"):
        f.write_text("x")
        f.chmod(0o600)
    normalize_modes(tmp_path)
    assert mode(tmp_path / "a") == mode(tmp_path / "d" / "b") == 0o644
    assert default_mode() == 0o644 and default_mode(directory=True) == 0o755


# ------------------------------------------------------------------ stale temporaries of killed processes

_HOLDER = """
import sys, time
from pathlib import Path
from crosschip.fsio import atomic_dir, scratch_dir, temp_prefix
root = Path(sys.argv[1])
with atomic_dir(root / "out") as tmp, scratch_dir("scratch", parent=root):
    (tmp / "half.bin").write_bytes(b"x" * 300_000)  # an output written in part
    # a file writer's temporary, named as atomic_write_bytes names it, caught before its rename
    (root / (temp_prefix(root / "f.json") + "abc123")).write_bytes(b"{")
    print("ready", flush=True)
    time.sleep(120)
"""


def _hold_temporaries(root: Path) -> subprocess.Popen[str]:
    """A real process in the middle of crosschip's atomic writers (it prints `ready`, then waits)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _temporaries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_writers_reclaim_only_what_dead_processes_left(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """SIGKILL a writer mid-write; the next writer in that directory removes its temporaries and says so, while a
    live writer's, another host's and untagged files stay."""
    dead, live = _hold_temporaries(tmp_path), _hold_temporaries(tmp_path)
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    dead_names = [n for n in _temporaries(tmp_path) if f"-{dead.pid}-" in n]
    live_names = [n for n in _temporaries(tmp_path) if f"-{live.pid}-" in n]
    assert len(dead_names) == len(live_names) == 3  # .out.tmp- dir, .scratch.tmp- dir, .f.json.tmp- file
    other_host = f".x.tmp-{'0' * 8 if HOST_TAG != '0' * 8 else '1' * 8}-{dead.pid}-abc"
    for keep in (other_host, ".y.tmp-jvzb2b0k"):  # another machine's (shared disk); an untagged one
        (tmp_path / keep).mkdir()
    try:
        atomic_write_json(tmp_path / "report.json", {"ok": True})
        assert _temporaries(tmp_path) == sorted([*live_names, other_host, ".y.tmp-jvzb2b0k"])
        lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("removed stale temporary")]
        assert sorted(Path(ln.split()[3]).name for ln in lines) == sorted(dead_names)
        assert all(f"left by process {dead.pid}, which is gone" in ln for ln in lines)
        assert any("(0.3 MiB)" in ln for ln in lines)  # the size of what was reclaimed
    finally:
        live.kill()
        live.wait()


def test_a_reused_pid_does_not_protect_a_stale_temporary(tmp_path: Path) -> None:
    """The temporary's pid is running, but that process started after the temporary was last written."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".ckpt.tmp-{HOST_TAG}-{proc.pid}-abc"
        stale.mkdir()
        os.utime(stale, (1_000_000_000, 1_000_000_000))  # written in 2001, long before that process started
        assert reclaim_stale(tmp_path) == [stale] and not stale.exists()
    finally:
        proc.kill()
        proc.wait()
