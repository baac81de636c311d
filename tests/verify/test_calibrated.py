"""Gates measured against the golden (the reference converted into the target's format): planted faults fail
and are named at their layer, correct conversions (also by another method) pass, MoE re-routing is its own
metric, the tokenizer is checked, and a checkpoint from another tool can be verified.

Each fault test also runs the same target with `golden=False` (the old precision-class constants) where those
passed it: the false PASS the golden exists to remove.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from crosschip import checkpoint
from crosschip.convert.pipeline import convert, resolve_options
from crosschip.verify.faults import Fault, alternative, plant
from crosschip.verify.run import VerifyOptions, run_verify


def _verify(ref: Path, target: Path, **kw: Any) -> dict[str, Any]:
    opts = VerifyOptions(ref=ref, target=target, certify=False, max_new_tokens=4, seq_len=64, bootstrap=200, **kw)
    return run_verify(opts)


def _failed(report: dict[str, Any]) -> set[str]:
    return {f"{g['group']}:{g['name']}" for g in report["gates"] if g["passed"] is False}


@pytest.fixture(scope="module")
def llama(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("calibrated")
    ref = make_checkpoint("tiny", root / "ref")
    out = {"root": root, "ref": ref}
    for fmt in ("int8-w8a8-dynamic", "fp8-block"):
        out[fmt] = root / fmt
        convert(ref, out[fmt], resolve_options(fmt, None, None, None))
    return out


def test_w8a8_scaled_down_proj_fails_and_is_named(llama: dict[str, Path]) -> None:
    bad = plant(llama["int8-w8a8-dynamic"], llama["root"] / "w8a8-x1.3",
                Fault("x1.3", "scale", "model.layers.1.mlp.down_proj", 1.3))
    report = _verify(llama["ref"], bad)
    assert report["verdict"] == "fail" and report["noise_floor"]["gate_basis"] == "measured"
    assert report["layers"]["first_failing"] == "layers.1.mlp"
    assert report["noise_floor"]["golden"]["converted"] is True
    # The int8 class constants let exactly this through (the false PASS).
    assert _verify(llama["ref"], bad, golden=False, layers=False)["verdict"] == "pass"


def test_fp8_mlp_scale_fault_is_localized(llama: dict[str, Path]) -> None:
    bad = plant(llama["fp8-block"], llama["root"] / "fp8-x1.5",
                Fault("x1.5", "scale", "model.layers.0.mlp.down_proj", 1.5))
    report = _verify(llama["ref"], bad)
    assert report["verdict"] == "fail" and report["layers"]["first_failing"] == "layers.0.mlp"
    old = _verify(llama["ref"], bad, golden=False)
    assert old["layers"]["first_failing"] is None  # the fp8 unit-roundoff gate (~3.6 rel. RMSE) passed every layer


@pytest.mark.parametrize("fmt, method", [("int8-w8a8-dynamic", None), ("fp8-block", None),
                                         ("int8-w8a8-dynamic", "int8-mse-clip"), ("fp8-block", "fp8-pow2-scale")])
def test_correct_conversions_pass(llama: dict[str, Path], fmt: str, method: str | None) -> None:
    target = llama[fmt]
    if method is not None:
        target = alternative(llama[fmt], llama["ref"], llama["root"] / f"{fmt}-{method}", method)
    report = _verify(llama["ref"], target)
    assert report["verdict"] == "pass", [g for g in report["gates"] if g["passed"] is False]
    assert report["layers"]["first_failing"] is None and report["noise_floor"]["gate_basis"] == "measured"


def test_zeroed_block_and_swapped_rows_fail_at_their_layer(llama: dict[str, Path]) -> None:
    zero = plant(llama["int8-w8a8-dynamic"], llama["root"] / "w8a8-zero",
                 Fault("zero", "zero-block", "model.layers.1.self_attn.o_proj"))
    swap = plant(llama["fp8-block"], llama["root"] / "fp8-swap",
                 Fault("swap", "swap-rows", "model.layers.0.mlp.up_proj"))
    assert _verify(llama["ref"], zero)["layers"]["first_failing"] == "layers.1.self_attn"
    assert _verify(llama["ref"], swap)["layers"]["first_failing"] == "layers.0.mlp"


def test_tokenizer_without_bos_fails_by_name(llama: dict[str, Path]) -> None:
    # A reference trained by crosschip (its provenance says so): its packer put BOS before every document.
    trained = llama["root"] / "ref-trained"
    shutil.copytree(llama["ref"], trained)
    old = checkpoint.read_manifest(trained)
    provenance = {**old["provenance"], "train_config": {}, "data_fingerprint": "test"}
    manifest = {**checkpoint.build_manifest(trained, provenance, old["model"]), "conversions": [], "verifications": []}
    (trained / "crosschip.json").write_text(json.dumps(manifest))
    # The same weights with a tokenizer that does not add BOS: another distribution for every text request.
    target = plant(trained, llama["root"] / "no-bos", Fault("no-bos", "no-bos"))
    report = _verify(trained, target, layers=False)
    tok = report["tokenization"]
    assert report["verdict"] == "fail" and "tokenization:tokenization" in _failed(report)
    assert tok["mismatched"] == tok["checked"] > 0 and "does not add BOS" in tok["reason"]
    assert report["distribution"]["kl_mean"] == 0.0  # the weights are the reference's: only tokenization differs


def test_plain_hf_checkpoint_is_verified_without_a_certificate(llama: dict[str, Path], capsys: Any) -> None:
    plain = llama["root"] / "plain-hf"
    shutil.copytree(llama["fp8-block"], plain)
    (plain / "crosschip.json").unlink()
    messages: list[str] = []
    opts = VerifyOptions(ref=llama["ref"], target=plain, max_new_tokens=4, seq_len=64, bootstrap=200,
                         report_dir=llama["root"] / "plain-report")
    report = run_verify(opts, log=messages.append)
    assert report["verdict"] == "pass" and report["certified"] is False
    assert (llama["root"] / "plain-report" / "report.json").is_file()
    assert any("not certified" in m and "no crosschip.json" in m for m in messages)
    assert report["noise_floor"]["golden"]["spec"]["basis"] == "config.json"
    assert not (plain / "crosschip.json").exists()


def test_moe_reroutes_are_reported_per_layer(make_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    ref = make_checkpoint("deepseek-tiny", tmp_path / "ds")
    fp16 = tmp_path / "ds-fp16"
    convert(ref, fp16, resolve_options(None, "ascend-310p", None, None))
    report = _verify(ref, fp16, emulate="ascend-310p")
    assert report["verdict"] == "pass", [g for g in report["gates"] if g["passed"] is False]
    routing = report["routing"]
    assert routing and all({"layer", "tokens", "flipped", "golden_flipped"} <= set(r) for r in routing)
    assert checkpoint.read_manifest(fp16)["verifications"] == []


def test_broken_router_fails_the_routing_gate_by_layer(make_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    # Isolated replays follow the reference's routing (a near-tie flip is not a layer's own error), so a broken
    # router is invisible to them: the routing gate is what names it.
    ref = make_checkpoint("deepseek-tiny", tmp_path / "ds")
    fp16 = tmp_path / "ds-fp16"
    convert(ref, fp16, resolve_options("fp16", None, None, None))
    bad = plant(fp16, tmp_path / "ds-router", Fault("router", "swap-rows", "model.layers.1.mlp.gate"))
    report = _verify(ref, bad)
    gate = next(g for g in report["gates"] if g["name"] == "router_flips")
    assert report["verdict"] == "fail" and gate["passed"] is False and "MoE layer 1" in gate["note"]
    row = next(r for r in report["routing"] if r["layer"] == 1)
    assert row["flipped"] > 0.05 and row["golden_flipped"] < 0.05


def test_moe_fp8_release_to_bf16_passes(make_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    # The false FAIL: an FP8 MoE release dequantized to bf16 is near-lossless, but rounding flips a few
    # near-tie routes on random routers; measured against the golden (the same dequantization), it passes.
    ref = make_checkpoint("deepseek-tiny", tmp_path / "ds")
    fp8 = tmp_path / "ds-fp8"
    convert(ref, fp8, resolve_options("fp8-block", None, None, None))
    bf16 = tmp_path / "ds-bf16"
    convert(fp8, bf16, resolve_options("bf16", None, None, None))
    report = _verify(fp8, bf16)
    assert report["verdict"] == "pass", [g for g in report["gates"] if g["passed"] is False]
    assert report["noise_floor"]["gate_basis"] == "measured"
