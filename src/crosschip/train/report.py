"""Progress reporting for long work: a rich progress bar on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Reporter(Protocol):
    def start(self, total: int, completed: int) -> None: ...
    def update(self, step: int, row: dict[str, Any]) -> None: ...
    def log(self, message: str) -> None: ...
    def close(self) -> None: ...


class NullReporter:
    """For library use and tests: says nothing."""

    def start(self, total: int, completed: int) -> None:
        pass

    def update(self, step: int, row: dict[str, Any]) -> None:
        pass

    def log(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


def format_row(row: dict[str, Any]) -> str:
    text = f"loss {row['loss']:.4f}  {row['tokens_per_s']:,.0f} tok/s  lr {row['lr']:.2e}"
    if "val_loss" in row:
        text += f"  val {row['val_loss']:.4f} (ppl {row['val_ppl']:.1f})"
    return text


class ConsoleReporter:
    """Progress bar (step, loss, tokens/s, ETA) on a TTY; one line per logged step otherwise.

    Writes to stderr so `--json` output on stdout stays machine-readable.
    """

    def __init__(self, console: Console | None = None, quiet: bool = False) -> None:
        if console is None:
            from crosschip.cli_common import make_console

            console = make_console(stderr=True)
        self.console = console
        self.quiet = quiet
        self.progress: Progress | None = None
        self.task: Any = None

    def start(self, total: int, completed: int) -> None:
        if self.quiet or not self.console.is_terminal:
            return
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=completed, stats="")

    def update(self, step: int, row: dict[str, Any]) -> None:
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=step, stats=format_row(row))
            if "val_loss" in row:
                self.progress.console.print(f"step {step}: {format_row(row)}")
        else:
            print(f"step {step}: {format_row(row)}", file=sys.stderr, flush=True)

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@contextlib.contextmanager
def byte_progress(console: Console, label: str, quiet: bool = False) -> Iterator[Callable[[str, int, int], None]]:
    """A progress callback (item name, items done, bytes done) drawn as a bar on a terminal."""
    if quiet or not console.is_terminal:
        yield lambda name, done, nbytes: None
        return
    with Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.fields[count]} tensors"),
        TextColumn("{task.fields[gb]:.2f} GB"), TimeElapsedColumn(), console=console, transient=True,
    ) as progress:
        task = progress.add_task(label, total=None, count=0, gb=0.0)
        yield lambda name, done, nbytes: progress.update(task, count=done, gb=nbytes / 1e9)
