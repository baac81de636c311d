"""Progress of a running stage, read from files the workers write (works for forked workers and local Ray alike)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from crosschip.data.executors import completed_tasks


def _count(folder: Path) -> int:
    total = 0
    if folder.is_dir():
        for f in folder.iterdir():
            if not f.name.endswith(".tmp"):
                with contextlib.suppress(OSError, ValueError):
                    total += int(f.read_text() or 0)
    return total


@contextlib.contextmanager
def stage_progress(stream: IO[str], label: str, logging_dir: Path, tasks: int, docs_total: int | None,
                   enabled: bool) -> Iterator[None]:
    """A bar over documents (when the stage reads documents and their number is known) or over tasks."""
    if not enabled:
        yield
        return
    console = Console(file=stream, stderr=False)
    unit = "docs" if docs_total else "tasks"
    total = docs_total or tasks
    columns = (TextColumn(f"{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn())
    stop = threading.Event()
    with Progress(*columns, console=console, transient=True, redirect_stdout=False, redirect_stderr=False) as bar:
        task = bar.add_task(label, total=total)

        def poll() -> None:
            while not stop.wait(0.5):
                done = _count(logging_dir / "progress") if docs_total else completed_tasks(logging_dir)
                bar.update(task, completed=min(done, total))

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
