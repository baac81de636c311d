"""What every crosschip command line shares: consoles, `--json`, and the error-to-exit-code runner."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from crosschip.errors import CrosschipError

PIPE_WIDTH = 100_000  # columns when output is not a terminal: in effect, never wrap


def make_console(stderr: bool = False) -> Console:
    """A console for people: the terminal's width on a terminal; piped or redirected, full-width lines.

    rich otherwise renders for 80 columns when the stream is not a TTY, so tables wrap and split file paths across
    lines, and `crosschip check ... > out.txt` or `| grep` find half a path. Not a TTY: one line per row, no
    colour codes (rich's own detection), whatever COLUMNS says.
    """
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=PIPE_WIDTH, soft_wrap=True)


out = make_console()
err = make_console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def make_app(name: str, help: str) -> typer.Typer:  # noqa: A002 - typer's own parameter name
    """A Typer app with crosschip's settings: help when bare, no tracebacks, no completion install."""
    return typer.Typer(name=name, help=help, no_args_is_help=True, pretty_exceptions_enable=False,
                       add_completion=False)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _click_exceptions() -> tuple[type[Exception], ...]:
    """click's ClickException and that of the copy typer >= 0.2x vendors as typer._click (not a subclass)."""
    import click

    vendored = sys.modules.get("typer._click.exceptions") or sys.modules.get("typer._click")
    extra = getattr(vendored, "ClickException", None)
    return (click.ClickException, *((extra,) if isinstance(extra, type) else ()))


INTERNAL_EXIT = 3  # an unexpected exception: not the verdict (1) nor bad input (2)
TRACEBACK_ENV = "CROSSCHIP_TRACEBACK"  # set to 1 to see the traceback of an unexpected exception


def print_error(problem: str) -> None:
    """`error: <problem> (fix: ...)` as one line on stderr."""
    # A Text, not markup: messages quote user paths/values, and '[/x]' or ':smile:' in them must print
    # verbatim (markup would raise MarkupError). soft_wrap + joined lines: the error stays one line.
    message = " ".join(problem.splitlines())
    if os.environ.get("RANK", "0") != "0":  # a torchrun job: every rank exits non-zero, rank 0 says why
        message = f"[rank {os.environ['RANK']}] {message}"
    err.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)


def _peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank did: not a bug of this process."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or "WORLD_SIZE" not in os.environ:  # torchrun's workers only (the group is torn down by now)
        return False
    text = str(e)
    return isinstance(e, dist.DistError) or any(
        k in text for k in ("Connection closed by peer", "Connection reset by peer", "remote worker", "timed out"))


def unexpected_error(e: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for an exception no stage turned into a CrosschipError.

    OSError is the environment (disk full, permissions, a vanished file): exit 2 with the OS's words.
    Anything else is a crosschip bug: exit 3, and the traceback only when CROSSCHIP_TRACEBACK=1.
    """
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        text = str(CrosschipError(f"{e.strerror or e}{where}", "check the path, its permissions and free disk space"))
        return text, 2
    first = (str(e).strip().splitlines() or [""])[0]
    if _peer_failure(e):
        text = str(CrosschipError(f"the process group failed: {first[:300]}",
                                  "another rank died or timed out (see its log); under torchrun --max-restarts N "
                                  "the group restarts and resumes from the last complete save"))
        return text, 1
    problem = f"internal error: {type(e).__name__}{': ' + first if first else ''}"
    fix = f"this is a crosschip bug: rerun with {TRACEBACK_ENV}=1 for the traceback and report it"
    return str(CrosschipError(problem, fix)), INTERNAL_EXIT


def run_app(app: typer.Typer) -> None:
    """Run a typer app: bad input is one line on stderr and a non-zero exit, never a traceback."""
    try:
        rc = app(standalone_mode=False)  # returns the code of a typer.Exit
    except CrosschipError as e:
        print_error(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except typer.Abort:
        sys.exit(1)
    except Exception as e:  # click usage errors (missing argument, bad option): click's own message, exit 2
        if isinstance(e, _click_exceptions()):
            e.show()  # type: ignore[attr-defined]
            sys.exit(e.exit_code)  # type: ignore[attr-defined]
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        message, code = unexpected_error(e)
        print_error(message)
        sys.exit(code)
    sys.exit(rc if isinstance(rc, int) else 0)
