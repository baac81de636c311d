"""`crosschip check`: run every preflight check for one checkpoint on one target; result types and JSON schema.

The JSON report (`CheckReport.to_dict`) is versioned by `SCHEMA_VERSION` and described by
`REPORT_SCHEMA` (JSON Schema, draft 2020-12); a change that removes or retypes a field bumps the version.
Exit codes: 0 when no check fails (warnings allowed), 1 when one does, 2 on a usage error.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crosschip.check.result import STATUSES, CheckResult
from crosschip.errors import CrosschipError

SCHEMA_VERSION = 1
VERDICTS = ("pass", "warn", "fail")
DEFAULT_BATCH = 1
DEFAULT_DEVICES = 1

_CHECK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["check", "status", "reason", "fix", "details"],
    "properties": {
        "check": {"type": "string"},
        "status": {"enum": list(STATUSES)},
        "reason": {"type": "string"},
        "fix": {"type": ["string", "null"]},
        "details": {"type": "object"},
    },
}
REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "crosschip check report",
    "type": "object",
    "required": ["schema_version", "checkpoint", "target", "stack", "devices", "batch", "context", "checks",
                 "verdict"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "checkpoint": {"type": "string"},
        "target": {"type": "string"},
        "stack": {"type": "string"},
        "devices": {"type": "integer", "minimum": 1},
        "batch": {"type": "integer", "minimum": 1},
        "context": {"type": "integer", "minimum": 1},
        "checks": {"type": "array", "items": _CHECK_SCHEMA},
        "verdict": {"enum": list(VERDICTS)},
        "elapsed_s": {"type": "number"},
    },
}


@dataclass
class CheckReport:
    """Every check of one checkpoint on one target, and the verdict."""

    checkpoint: str
    target: str
    stack: str  # the serving stack whose rules were applied
    devices: int
    batch: int
    context: int
    checks: list[CheckResult]
    elapsed_s: float = 0.0
    findings: list[Any] = field(default_factory=list)  # the code scan's raw findings (for --csv); not in to_dict

    @property
    def verdict(self) -> str:
        """'fail' if any check fails, 'warn' if any warns, else 'pass'."""
        statuses = {c.status for c in self.checks}
        return "fail" if "FAIL" in statuses else "warn" if "WARN" in statuses else "pass"

    @property
    def exit_code(self) -> int:
        return 1 if self.verdict == "fail" else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "checkpoint": self.checkpoint,
            "target": self.target,
            "stack": self.stack,
            "devices": self.devices,
            "batch": self.batch,
            "context": self.context,
            "checks": [c.to_dict() for c in self.checks],
            "verdict": self.verdict,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise CrosschipError(f"--{name} must be at least 1, got {value}", f"pass a positive --{name}")


def check_scripts(scripts: Sequence[Path]) -> tuple[list[CheckResult], list[Any]]:
    """Scan scripts for CUDA-only usage (crosschip.check.code): one row per finding, or one PASS row."""
    from crosschip.check.code import scan_paths

    paths = [Path(s) for s in scripts]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise CrosschipError(f"--script {missing[0]} does not exist", "pass existing .py files or directories")
    findings = list(scan_paths(paths))
    rows = [
        CheckResult(
            "code", f.severity, f"{f.file}:{f.line}: {f.message} [{f.pattern}]", f.fix,
            {"file": f.file, "line": f.line, "pattern": f.pattern},
        )
        for f in findings
    ]
    if not rows:
        names = ", ".join(str(p) for p in paths)
        rows = [CheckResult("code", "PASS", f"no CUDA-only usage found in {names}", None, {"scanned": len(paths)})]
    return rows, findings


def run_check(
    ckpt: Path,
    target: str,
    *,
    devices: int = DEFAULT_DEVICES,
    batch: int = DEFAULT_BATCH,
    context: int | None = None,
    scripts: Sequence[Path] = (),
    numerics: bool = True,
    stack: str | None = None,
    host_flags: Sequence[str] | None = None,
) -> CheckReport:
    """Run every check of CKPT (a checkpoint dir, or a dir with only config.json) on TARGET.

    `context` None: the config's max_position_embeddings, capped at memory.DEFAULT_CONTEXT_CAP.
    `numerics` False skips the CPU activation probe and weight audit (they read the weights); the
    overflow-mode warning of a saturating target is reported either way. `stack`: the serving stack
    whose rules apply (None: the profile's first). `host_flags`: CPU ISA flags of the serving host for a
    cpu target's format rules (None: this machine's, crosschip.devices.cpu_isa_flags).
    """
    from crosschip.check import arch, engine, formats, memory
    from crosschip.check import numerics as numerics_check
    from crosschip.devices import cpu_isa_flags
    from crosschip.targets import load_target

    started = time.perf_counter()
    for name, value in (("devices", devices), ("batch", batch), ("context", context)):
        _positive(name, value)
    profile = load_target(target)
    chosen = profile.stack(stack)  # an unknown --stack is a usage error before any file is read
    flags = cpu_isa_flags() if host_flags is None else list(host_flags)
    inventory = formats.load_inventory(Path(ckpt))
    context = context or memory.default_context(inventory.config)
    checks = [
        formats.check_formats(inventory, profile, str(ckpt), chosen, flags),
        memory.check_memory(inventory, profile, devices=devices, batch=batch, context=context),
        arch.check_architecture(inventory.config, profile, chosen),
        arch.check_loadable(inventory.root),
    ]
    checks += [row for row in (engine.check_attention(inventory.config, profile, chosen),
                               engine.check_fp8_blocks(inventory, profile, chosen, devices, str(ckpt))) if row]
    checks += numerics_check.check_numerics(inventory, profile, probe=numerics, ckpt_arg=str(ckpt))
    findings: list[Any] = []
    if scripts:
        rows, findings = check_scripts(scripts)
        checks += rows
    report = CheckReport(str(ckpt), profile.name, chosen.name, devices, batch, context, checks, findings=findings)
    report.elapsed_s = time.perf_counter() - started
    return report
