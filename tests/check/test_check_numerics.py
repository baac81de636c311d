"""Numerics check: a planted fp16 activation overflow is named on ascend-310p; weights beyond fp16 are named by
convert's range audit; bf16 targets need no probe; saturating targets warn that Inf/NaN checks see nothing."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from check_testkit import DEEPSEEK_V3, convert_to, write_config_dir

from crosschip.check.formats import load_inventory
from crosschip.check.numerics import activation_maxima, calibration_batches, check_numerics
from crosschip.checkpoint import write_checkpoint
from crosschip.formats.quant import FP16_MAX
from crosschip.targets import load_target

PLANTED = "model.layers.1.mlp.down_proj"


def _rows(rows: list[Any]) -> dict[str, Any]:
    return {r.check: r for r in rows}


@pytest.fixture(scope="module")
def planted(make_model: Callable[..., Any], tiny_tokenizer: Any, llama_fp32: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with layer 1's MLP scaled so its down_proj output exceeds 65504 while every weight stays
    inside fp16: up_proj and down_proj both x k scale that output by k^2 (the gate's activation is unchanged)."""
    model = make_model("tiny")
    batches, _ = calibration_batches(llama_fp32, model.config.vocab_size)
    base = {p.name: p.max_abs for p in activation_maxima(model, batches)}
    mlp = model.model.layers[1].mlp
    k = math.sqrt(4 * FP16_MAX / base[PLANTED])
    largest_weight = max(float(w.detach().abs().max()) for w in (mlp.up_proj.weight, mlp.down_proj.weight))
    assert k * largest_weight < FP16_MAX / 2
    assert k * base[f"{PLANTED}:input"] < FP16_MAX / 2  # the overflow starts at the output, not before
    with torch.no_grad():
        mlp.up_proj.weight *= k
        mlp.down_proj.weight *= k
    root = tmp_path_factory.mktemp("planted") / "ckpt"
    return write_checkpoint(root, model, tiny_tokenizer, {"source": "tests/check: planted fp16 overflow"})


def test_planted_overflow_is_named_on_ascend_310p(planted: Path) -> None:
    rows = _rows(check_numerics(load_inventory(planted), load_target("ascend-310p")))
    act = rows["numerics.activations"]
    assert act.status == "FAIL"
    assert act.details["over"][0] == PLANTED  # the first point over 65504 in execution order
    assert f"first: {PLANTED}" in act.reason and "decoder layers 1" in act.reason
    assert "model.layers.0" not in " ".join(act.details["over"])  # layer 0 is untouched and stays in range
    assert rows["numerics.weights"].status == "PASS"  # the weights themselves fit fp16
    assert rows["numerics.overflow"].status == "WARN"


def test_clean_model_passes_the_probe(llama_fp32: Path) -> None:
    rows = _rows(check_numerics(load_inventory(llama_fp32), load_target("ascend-310p")))
    act = rows["numerics.activations"]
    assert act.status == "PASS" and not act.details["over"]
    assert "shipped calibration texts" in act.details["calibration"]
    points = {p["point"] for p in act.details["points"]}
    assert {"model.layers.0", "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.mlp.down_proj",
            "model.layers.1.mlp.down_proj:input", "lm_head"} <= points
    assert rows["numerics.weights"].status == "PASS"


def test_bf16_targets_need_no_probe_but_fp16_checkpoints_do(planted: Path, tmp_path: Path) -> None:
    rows = check_numerics(load_inventory(planted), load_target("nvidia-h100"))
    assert [(r.check, r.status) for r in rows] == [("numerics", "PASS")]
    fp16 = convert_to(planted, tmp_path / "fp16", to="fp16")  # served in fp16 wherever fp16 runs
    act = _rows(check_numerics(load_inventory(fp16), load_target("ascend-910b")))["numerics.activations"]
    assert act.status == "FAIL" and act.details["over"][0] == PLANTED


def test_weights_beyond_fp16_are_named_with_the_clamp_fix(make_model: Callable[..., Any], tmp_path: Path) -> None:
    model = make_model("tiny")
    name = "model.layers.0.mlp.down_proj.weight"
    with torch.no_grad():
        model.get_parameter(name)[0, 0] = 1e5
    root = write_checkpoint(tmp_path / "big-weight", model, None, {"source": "tests/check"})
    rows = _rows(check_numerics(load_inventory(root), load_target("ascend-310p"), ckpt_arg=str(root)))
    weights = rows["numerics.weights"]
    assert weights.status == "FAIL" and name in weights.reason
    assert weights.details["overflowing"] == [{"tensor": name, "values": 1, "max_abs": 1e5}]
    assert "--target ascend-310p --clamp" in weights.fix
    assert "random token ids" in rows["numerics.activations"].details["calibration"]  # no tokenizer saved


def test_config_only_and_disabled_probes_warn(llama_fp32: Path, tmp_path: Path) -> None:
    config_only = load_inventory(write_config_dir(tmp_path / "dsv3", DEEPSEEK_V3))
    rows = check_numerics(config_only, load_target("ascend-310p"))
    assert [(r.check, r.status) for r in rows] == [("numerics", "WARN"), ("numerics.overflow", "WARN")]
    assert "not probed" in rows[0].reason
    assert [r.status for r in check_numerics(config_only, load_target("ascend-910b"))] == ["PASS"]
    skipped = check_numerics(load_inventory(llama_fp32), load_target("ascend-310p"), probe=False)
    assert skipped[0].status == "WARN" and "skipped" in skipped[0].reason


def test_only_saturating_targets_warn_about_inf_nan_checks(tmp_path: Path) -> None:
    from crosschip.targets import list_targets

    inv = load_inventory(write_config_dir(tmp_path / "dsv3", DEEPSEEK_V3))
    for name in list_targets():
        rows = _rows(check_numerics(inv, load_target(name)))
        assert ("numerics.overflow" in rows) == (name == "ascend-310p"), name
    warning = _rows(check_numerics(inv, load_target("ascend-310p")))["numerics.overflow"]
    assert warning.status == "WARN"
    assert "instead of Inf" in warning.reason and "dynamic loss scaling" in warning.reason
    assert "--emulate ascend-310p" in warning.fix


def test_probe_runs_through_mla_and_moe_layers_of_an_fp8_checkpoint(deepseek_fp8: Path) -> None:
    """The FP8 DeepSeek checkpoint is dequantized by load_model and probed on ascend-310p (fp16 serving)."""
    rows = _rows(check_numerics(load_inventory(deepseek_fp8), load_target("ascend-310p")))
    act = rows["numerics.activations"]
    assert act.status == "PASS", act.reason
    points = {p["point"] for p in act.details["points"]}
    assert {"model.layers.0.self_attn.kv_a_proj_with_mqa", "model.layers.1.mlp",
            "model.layers.1.mlp.shared_experts.down_proj"} <= points
    assert rows["numerics.weights"].status == "PASS"
