"""What every crosschip command line shares: consoles, `--json`, and the error-to-exit-code runner."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from crosschip.errors import CrosschipError

out = Console()
err = Console(stderr=True)

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


def run_app(app: typer.Typer) -> None:
    """Run a typer app: bad input is one line on stderr and a non-zero exit, never a traceback."""
    try:
        rc = app(standalone_mode=False)  # returns the code of a typer.Exit
    except CrosschipError as e:
        # A Text, not markup: messages quote user paths/values, and '[/x]' or ':smile:' in them must print
        # verbatim (markup would raise MarkupError). soft_wrap + joined lines: the error stays one line.
        message = " ".join(str(e).splitlines())
        err.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
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
        raise
    sys.exit(rc if isinstance(rc, int) else 0)
