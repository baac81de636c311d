"""`crosschip convert` as a user runs it: a real subprocess per case, started together to save time.

A success prints its conversion record as JSON with `--json`; every bad input exits non-zero with
one `error: ... (fix: ...)` line on stderr, no traceback, and leaves its scratch directory exactly
as it was (nothing created, nothing changed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from convert_testkit import INDEX, Fp8Checkpoint, snapshot, write_overflowing

TIMEOUT_S = 180


@dataclass(frozen=True)
class Case:
    args: list[str]  # after `crosschip convert`
    scratch: Path  # must be unchanged afterwards for a bad input
    expect: str  # a fragment of the error line ("" for the success)


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str
    unchanged: bool


Results = dict[str, tuple[Case, Result]]


def run_case(case: Case) -> Result:
    before = snapshot(case.scratch)
    env = {**os.environ, "COLUMNS": "40"}  # narrow: a wrapped error line would show up as two
    proc = subprocess.run([sys.executable, "-m", "crosschip.cli", "convert", *case.args], capture_output=True,
                          text=True, env=env, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr, snapshot(case.scratch) == before)


def build_cases(root: Path, fp8: Fp8Checkpoint, llama_src: Path) -> dict[str, Case]:
    cases: dict[str, Case] = {}
    ok = root / "ok"
    ok.mkdir()
    args = [str(fp8.root), str(ok / "out"), "--target", "ascend-310p", "--to", "int8-w8a8-dynamic", "--json"]
    cases["success"] = Case(args, ok, "")

    exists = root / "exists"
    (exists / "out").mkdir(parents=True)
    (exists / "out" / "mine.txt").write_text("keep me")
    cases["exists"] = Case([str(fp8.root), str(exists / "out"), "--to", "bf16"], exists, "already exists")

    target = root / "target"
    target.mkdir()
    args = [str(fp8.root), str(target / "out"), "--target", "ascend-910b", "--to", "fp8-block"]
    cases["target"] = Case(args, target, "ascend-910b cannot run fp8-block")

    fp16 = root / "fp16"
    name = write_overflowing(llama_src, fp16 / "src")
    cases["overflow"] = Case([str(fp16 / "src"), str(fp16 / "out"), "--to", "fp16"], fp16, name)

    unsafe = root / "unsafe"
    src = Path(shutil.copytree(fp8.root, unsafe / "src"))
    index = json.loads((src / INDEX).read_text())
    index["weight_map"]["model.norm.weight"] = "../../etc/passwd"
    (src / INDEX).write_text(json.dumps(index))
    cases["unsafe"] = Case([str(src), str(unsafe / "out"), "--to", "bf16"], unsafe,
                           "unsafe path '../../etc/passwd'")

    # The tiny Llama's q_proj has 64 rows: vLLM's FP8 block rule (128) refuses its merged qkv_proj.
    shape = root / "fp8-shape"
    shape.mkdir()
    cases["fp8-shape"] = Case([str(llama_src), str(shape / "out"), "--to", "fp8-block"], shape,
                              "no engine can load this as fp8-block: model.layers.0.self_attn.q_proj.weight: "
                              "output partition 64 of model.layers.0.self_attn.qkv_proj at tp=1")
    forced = root / "fp8-forced"
    forced.mkdir()
    cases["fp8-forced"] = Case([str(llama_src), str(forced / "out"), "--to", "fp8-block", "--force", "--json"],
                               forced, "")
    return cases


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, fp8_deepseek: Fp8Checkpoint,
            llama_src: Path) -> Results:
    cases = build_cases(tmp_path_factory.mktemp("cli"), fp8_deepseek, llama_src)
    with ThreadPoolExecutor(max_workers=3) as pool:  # each run is mostly ~4 s of imports
        done = dict(zip(cases, pool.map(run_case, cases.values()), strict=True))
    return {k: (cases[k], done[k]) for k in cases}


def test_success_prints_the_record_as_json(results: Results) -> None:
    case, res = results["success"]
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    record: dict[str, Any] = json.loads(res.stdout)
    assert (record["from"], record["to"], record["layout"]) == ("fp8-block", "int8-w8a8-dynamic", "ascend")
    assert (record["target"], record["dtype"]) == ("ascend-310p", "float16")
    assert "tensors" not in record and record["summary"]["quantized"] > 0
    out = case.scratch / "out"
    assert (out / "quant_model_description.json").is_file() and (out / INDEX).is_file()
    manifest = json.loads((out / "crosschip.json").read_text())
    assert manifest["conversions"][-1]["summary"] == record["summary"]
    assert sorted(p.name for p in case.scratch.iterdir()) == ["out"]  # no temp directory left beside it


def test_force_writes_fp8_no_engine_loads_with_a_warning_and_records_it(results: Results) -> None:
    case, res = results["fp8-forced"]
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning: --force")]
    assert len(warnings) == 1 and "model.layers.0.self_attn.q_proj.weight" in warnings[0]
    record: dict[str, Any] = json.loads(res.stdout)
    assert record["to"] == "fp8-block" and record["forced"]
    assert all("validate_fp8_block_shape" in v for v in record["forced"])
    manifest = json.loads((case.scratch / "out" / "crosschip.json").read_text())
    assert manifest["conversions"][-1]["forced"] == record["forced"]


@pytest.mark.parametrize("name", ["exists", "target", "overflow", "unsafe", "fp8-shape"])
def test_bad_input_is_one_error_line_and_changes_nothing(results: Results, name: str) -> None:
    case, res = results[name]
    assert res.returncode != 0
    assert "Traceback" not in res.stderr and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "fix:" in lines[0]
    assert case.expect in lines[0]
    assert res.unchanged, f"{case.scratch} changed"
