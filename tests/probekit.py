"""Shared by the probe tests: the probe CLI driven in-process."""

from __future__ import annotations

import sys

import pytest

from crosschip.probe.cli import main


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """crosschip.probe.cli.main() in-process with argv; (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["crosschip-probe", *args])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    return int(exc.value.code or 0), captured.out, captured.err
