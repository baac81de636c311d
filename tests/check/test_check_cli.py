"""`crosschip check` as a subprocess: exit codes 0 / 1 / 2, the versioned --json schema, --script and --csv."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from crosschip.check.run import REPORT_SCHEMA, SCHEMA_VERSION

CUDA_SCRIPT = """\
import torch

model = torch.nn.Linear(4, 4).cuda()
torch.cuda.synchronize()
"""
PORTABLE_SCRIPT = """\
import torch

def pick() -> torch.device:
    return torch.device("cpu")
"""


def _argv() -> list[str]:
    script = Path(sys.executable).parent / "crosschip"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "crosschip.cli"]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*_argv(), "check", *args], capture_output=True, text=True, env=env, timeout=300,
                          stdin=subprocess.DEVNULL, check=False)


def validate(value: Any, schema: dict[str, Any], where: str = "$") -> None:
    """The subset of JSON Schema REPORT_SCHEMA uses: type, const, enum, minimum, required, properties, items."""
    types = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "null": type(None)}
    if "type" in schema:
        allowed = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        assert any(isinstance(value, types[t]) and not isinstance(value, bool) for t in allowed), where
    if "const" in schema:
        assert value == schema["const"], where
    if "enum" in schema:
        assert value in schema["enum"], where
    if "minimum" in schema:
        assert value >= schema["minimum"], where
    for key in schema.get("required", []):
        assert key in value, f"{where}.{key} missing"
    for key, sub in schema.get("properties", {}).items():
        if key in value:
            validate(value[key], sub, f"{where}.{key}")
    if "items" in schema:
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{where}[{i}]")


@pytest.fixture(scope="module")
def runs(deepseek_fp8: Path, deepseek_blocks_fp8: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("check-cli")
    (root / "cuda_train.py").write_text(CUDA_SCRIPT, encoding="utf-8")
    (root / "portable.py").write_text(PORTABLE_SCRIPT, encoding="utf-8")
    (root / "existing.csv").write_text("keep me\n", encoding="utf-8")
    ckpt = str(deepseek_blocks_fp8)  # FP8 that vLLM loads on Hopper (every partition a multiple of 128)
    cases = {
        "h100-json": [ckpt, "--target", "nvidia-h100", "--json"],
        "910b-table": [str(deepseek_fp8), "--target", "ascend-910b", "--devices", "2"],
        "bad-stack": [ckpt, "--target", "nvidia-h100", "--stack", "sglang"],
        "bad-target": [ckpt, "--target", "tpu-v9"],
        "bad-context": [ckpt, "--target", "nvidia-h100", "--context", "0"],
        "csv-no-script": [ckpt, "--target", "nvidia-h100", "--csv", str(root / "x.csv")],
        "missing-ckpt": [str(root / "nope"), "--target", "nvidia-h100"],
        "csv-exists": [ckpt, "--target", "nvidia-h100", "--script", str(root / "portable.py"),
                       "--csv", str(root / "existing.csv")],
        "scripts": [ckpt, "--target", "nvidia-h100", "--script", str(root / "cuda_train.py"),
                    "--script", str(root / "portable.py"), "--csv", str(root / "findings.csv"), "--json"],
        "portable": [ckpt, "--target", "nvidia-h100", "--script", str(root / "portable.py"), "--json"],
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, args) for name, args in cases.items()}
        return {"root": root, **{name: f.result() for name, f in futures.items()}}


def test_pass_exits_0_with_a_schema_valid_json_report(runs: dict[str, Any]) -> None:
    run = runs["h100-json"]
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    validate(report, REPORT_SCHEMA)
    assert report["schema_version"] == SCHEMA_VERSION == 1
    assert report["verdict"] == "pass" and report["target"] == "nvidia-h100" and report["stack"] == "vllm"
    assert (report["devices"], report["batch"], report["context"]) == (1, 1, 512)  # the model's max position
    checks = [c["check"] for c in report["checks"]]
    assert checks == ["formats", "memory", "architecture", "load", "fp8-blocks", "numerics"]


def test_fail_exits_1_with_a_table_naming_the_fix(runs: dict[str, Any], deepseek_fp8: Path) -> None:
    run = runs["910b-table"]
    assert run.returncode == 1, run.stderr
    assert "FAIL" in run.stdout and "verdict: FAIL (ascend-910b, stack vllm-ascend," in run.stdout
    assert "ascend-910b cannot run fp8-block" in run.stdout
    assert f"crosschip convert {deepseek_fp8}" in run.stdout


@pytest.mark.parametrize(
    ("name", "expect"),
    [("bad-target", "unknown target 'tpu-v9'"), ("bad-context", "--context must be at least 1"),
     ("bad-stack", "nvidia-h100 has no serving stack 'sglang' (fix: use --stack vllm)"),
     ("csv-no-script", "no --script was given"), ("missing-ckpt", "does not exist"),
     ("csv-exists", "already exists")],
)
def test_usage_errors_exit_2_with_one_line(runs: dict[str, Any], name: str, expect: str) -> None:
    run = runs[name]
    assert run.returncode == 2, run.stderr + run.stdout
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], run.stderr
    assert "Traceback" not in run.stderr


def test_scripts_are_reported_line_by_line_and_as_csv(runs: dict[str, Any]) -> None:
    run = runs["scripts"]
    assert run.returncode == 1, run.stderr
    report = json.loads(run.stdout)
    validate(report, REPORT_SCHEMA)
    code = [c for c in report["checks"] if c["check"] == "code"]
    assert {c["details"]["line"] for c in code} >= {3, 4}
    assert all(c["details"]["file"].endswith("cuda_train.py") for c in code)
    assert all(c["fix"] for c in code)
    rows = list(csv.DictReader(io.StringIO((runs["root"] / "findings.csv").read_text(encoding="utf-8"))))
    assert {int(r["line"]) for r in rows} == {c["details"]["line"] for c in code}


def test_a_portable_script_passes(runs: dict[str, Any]) -> None:
    run = runs["portable"]
    assert run.returncode == 0, run.stderr
    code = [c for c in json.loads(run.stdout)["checks"] if c["check"] == "code"]
    assert [c["status"] for c in code] == ["PASS"]


def test_an_existing_csv_is_kept_without_overwrite(runs: dict[str, Any]) -> None:
    assert runs["csv-exists"].returncode == 2
    assert (runs["root"] / "existing.csv").read_text(encoding="utf-8") == "keep me\n"
