"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations


class CrosschipError(Exception):
    """Bad input or environment. The CLI prints it as one line and exits non-zero (no traceback)."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.problem} (fix: {self.fix})" if self.fix else self.problem
