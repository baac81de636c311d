"""`crosschip verify` end to end, as users run it: the real command in a subprocess on real checkpoints.

Covers the acceptance cases of the Verify issue that need the whole pipeline: identical sides pass
with KL ~ 0 (exit 0), fp32 vs bf16 passes the bf16 gates, a perturbed decoder layer fails (exit 1)
and is named, an fp16 overflow is named under `--emulate ascend-310p`, the report files and the
parity certificate are written, and bad input is one error line with exit 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from crosschip import checkpoint

TIMEOUT_S = 300


def crosschip_argv() -> list[str]:
    script = Path(sys.executable).parent / "crosschip"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "crosschip.cli"]


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*crosschip_argv(), "verify", *args], capture_output=True, text=True, timeout=TIMEOUT_S,
                          stdin=subprocess.DEVNULL, check=False, env={**os.environ, "COLUMNS": "200"})


def rewrite(src: Path, out: Path, edit: Callable[[Any], None]) -> Path:
    """A new checkpoint (own manifest) holding src's model after `edit(model)`."""
    model, _ = checkpoint.load_model(src)
    with torch.no_grad():
        edit(model)
    tok = checkpoint.load_tokenizer_if_present(src)
    return checkpoint.write_checkpoint(out, model, tok, provenance={"source": "tests/verify: edited copy"})


def perturb_layer_1(model: Any) -> None:
    mlp = model.model.layers[1].mlp
    gen = torch.Generator().manual_seed(1)
    for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        lin.weight += 0.1 * lin.weight.std() * torch.randn(lin.weight.shape, generator=gen)


def overflow_layer_1(model: Any) -> None:
    # Layer 1's MLP output grows ~1e6x: beyond fp16's 65504 while still finite in fp32.
    model.model.layers[1].mlp.down_proj.weight *= 1e6


@pytest.fixture(scope="module")
def runs(make_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every verify run of this module, started together (independent subprocesses)."""
    root = tmp_path_factory.mktemp("verify-cli")
    base = make_checkpoint("tiny", root / "base")
    perturbed = rewrite(base, root / "perturbed", perturb_layer_1)
    overflow = rewrite(base, root / "overflow", overflow_layer_1)
    fast = ["--max-new-tokens", "4", "--seq-len", "64"]
    cases = {
        "same": ["--ref", str(base), "--target", str(base), "--report", str(root / "r-same"), "--json", *fast],
        "bf16": ["--ref", str(base), "--target", f"{base}:bf16", "--json", "--no-certify", *fast],
        "perturbed": ["--ref", str(base), "--target", str(perturbed), "--report", str(root / "r-pert"), "--json",
                      *fast],
        "overflow": ["--ref", str(overflow), "--target", str(overflow), "--emulate", "ascend-310p", "--json",
                     "--no-certify", *fast],
        "bad_side": ["--ref", str(base), "--target", "ftp://x/v1"],
        "missing": ["--ref", str(root / "nope"), "--target", str(base)],
        "report_exists": ["--ref", str(base), "--target", str(base), "--report", str(base)],
        "bad_emulate": ["--ref", str(base), "--target", str(base), "--emulate", "ascend-999"],
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {k: pool.submit(run, v) for k, v in cases.items()}
        results = {k: f.result() for k, f in futures.items()}
    return {"root": root, "base": base, "perturbed_ckpt": perturbed, **results}


def report_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.stdout.strip(), proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_identical_sides_pass_with_zero_kl(runs: dict[str, Any]) -> None:
    proc = runs["same"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = report_of(proc)
    assert report["verdict"] == "pass" and report["distribution"]["kl_mean"] == pytest.approx(0.0, abs=1e-9)
    assert report["distribution"]["top1_agreement"] == 1.0
    assert all(p["passed"] for p in report["layers"]["points"])
    out = runs["root"] / "r-same"
    assert json.loads((out / "report.json").read_text())["schema_version"] == report["schema_version"]
    assert "<svg" in (out / "report.html").read_text()


def test_fp32_vs_bf16_passes_the_bf16_gates(runs: dict[str, Any]) -> None:
    proc = runs["bf16"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = report_of(proc)
    assert report["precision"] == "bf16" and report["verdict"] == "pass"
    assert report["distribution"]["kl_mean"] > 0


def test_perturbed_layer_fails_and_is_named(runs: dict[str, Any]) -> None:
    proc = runs["perturbed"]
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = report_of(proc)
    assert report["verdict"] == "fail"
    assert report["layers"]["first_failing"].startswith("layers.1")  # isolated: layer 1's own error
    assert report["layers"]["first_failing_accumulated"].startswith("layers.1")
    assert all(p["passed"] for p in report["layers"]["points"] if p["index"] == 0)


def test_certificate_is_appended_to_the_target(runs: dict[str, Any]) -> None:
    certs = checkpoint.read_manifest(runs["perturbed_ckpt"])["verifications"]
    assert certs[-1]["verdict"] == "fail" and certs[-1]["first_failing_layer"].startswith("layers.1")
    assert certs[-1]["prompts"]["sha256"] and certs[-1]["target"]["identity"]["sha256"]
    checkpoint.open_checkpoint(runs["perturbed_ckpt"])  # weight files untouched: the manifest still verifies


def test_fp16_overflow_is_named_under_310p_emulation(runs: dict[str, Any]) -> None:
    proc = runs["overflow"]
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = report_of(proc)
    assert report["emulated"] == "ascend-310p" and report["precision"] == "fp16"
    assert report["layers"]["first_failing"].startswith("layers.1")


@pytest.mark.parametrize("case, fragment", [
    ("bad_side", "http"), ("missing", "does not exist"), ("report_exists", "already exists"),
    ("bad_emulate", "ascend-999"),
])
def test_bad_input_is_one_error_line(runs: dict[str, Any], case: str, fragment: str) -> None:
    proc = runs[case]
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
