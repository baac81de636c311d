"""One row of a `crosschip check` report. Its own module: every sub-check builds rows, and `run.py`, which runs the
sub-checks, imports them, so the row type cannot live in `run.py` without an import circle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STATUSES = ("PASS", "WARN", "FAIL")


@dataclass(frozen=True)
class CheckResult:
    """One row of the report: which check, PASS/WARN/FAIL, why, and how to fix it (a command where one exists)."""

    check: str
    status: str
    reason: str
    fix: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")  # a bug, not user input

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "status": self.status, "reason": self.reason, "fix": self.fix,
                "details": self.details}
