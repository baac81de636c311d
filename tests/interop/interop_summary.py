"""The interop run's summary: one row per checkpoint served by vLLM, and the README's compatibility table from it.

    python tests/interop/interop_summary.py runs/interop/summary.json     # `make interop` prints this after the tests

The tests write the JSON (CROSSCHIP_INTEROP_SUMMARY names the file); this prints it as a Markdown table.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_SUMMARY = "CROSSCHIP_INTEROP_SUMMARY"


@dataclass
class Verified:
    """One `crosschip verify` run against a vLLM server."""

    report: dict[str, Any]
    row: dict[str, Any]  # the summary row (also appended to the session's summary)
    probe: Any  # what the test's `while_serving` callback returned


def failed_gates(report: dict[str, Any]) -> list[str]:
    """The failed gates as `group.name` (conversion, served, fidelity, ...); a gate named as its group (tokenization)
    by its name alone."""
    names = []
    for gate in report.get("gates") or []:
        if gate.get("passed") is False:
            group = gate.get("group")
            names.append(gate["name"] if not group or group == gate["name"] else f"{group}.{gate['name']}")
    return names


def report_row(report: dict[str, Any]) -> dict[str, Any]:
    """What the compatibility table shows of one verify report (`crosschip verify --json`)."""
    dist = report.get("distribution") or {}
    fidelity = (report.get("fidelity") or {}).get("distribution") or {}
    return {
        "verdict": str(report.get("verdict", "")).upper(),
        "kl_vs_original": dist.get("kl_mean"),
        "kl_method": dist.get("kl_method"),
        "top1_vs_original": dist.get("top1_agreement"),
        "kl_vs_crosschip_load": fidelity.get("kl_mean"),
        "failed_gates": failed_gates(report),
        "first_failing_layer": (report.get("layers") or {}).get("first_failing"),
        "seconds_verify": report.get("seconds"),
    }


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _reason(row: dict[str, Any]) -> str:
    if row.get("loads") is False:
        return row.get("note", "did not load")
    parts = [f"failed: {', '.join(row['failed_gates'])}"] if row.get("failed_gates") else []
    if row.get("first_failing_layer"):
        parts.append(f"first failing layer {row['first_failing_layer']}")
    return "; ".join(parts) or "-"


def format_table(summary: dict[str, Any]) -> str:
    """The compatibility table (Markdown) of a summary written by the interop tests."""
    lines = [
        f"{summary.get('engine', '?')} on this machine, {summary.get('created', '?')}",
        "",
        "| format | planted fault | loads | computes in | verdict (expected) | KL vs original | KL vs crosschip's load "
        "| reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary.get("rows", []):
        loads = {True: "yes", False: "**no**", None: "-"}[row.get("loads")]
        verdict = row.get("verdict") or "-"
        mark = "" if verdict == row["expected"] else " **unexpected**"
        lines.append(
            f"| {row['format']} | {row.get('fault') or '-'} | {loads} | {row.get('dtype') or '-'} "
            f"| {verdict} ({row['expected']}){mark} "
            f"| {_num(row.get('kl_vs_original'))} | {_num(row.get('kl_vs_crosschip_load'))} | {_reason(row)} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/interop/interop_summary.py SUMMARY.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    if not path.is_file():
        print(f"error: {path} does not exist (fix: run `make interop`, which writes it)", file=sys.stderr)
        return 2
    print(format_table(json.loads(path.read_text(encoding="utf-8"))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
