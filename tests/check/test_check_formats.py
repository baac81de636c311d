"""Formats check on real checkpoints: FP8 blocks fail on ascend-910b and pass on nvidia-h100; bf16 fails on
ascend-310p and its fp16 conversion passes; the inventory matches the files and convert's own plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from check_testkit import convert_to

from crosschip.check.formats import (
    Inventory,
    check_formats,
    config_inventory,
    load_inventory,
    stored_specs,
)
from crosschip.check.run import run_check
from crosschip.convert.pipeline import output_specs
from crosschip.formats import layouts
from crosschip.targets import load_target


def _row(report, name: str):  # noqa: ANN001, ANN202 - small lookup helper
    return next(c for c in report.checks if c.check == name)


def test_inventory_reads_dtypes_and_bytes_from_the_headers(deepseek_fp8: Path) -> None:
    from safetensors import safe_open

    inv = load_inventory(deepseek_fp8)
    assert (inv.fmt, inv.layout, inv.config_only) == ("fp8-block", "deepseek-v3", False)
    index = json.loads((deepseek_fp8 / "model.safetensors.index.json").read_text())["weight_map"]
    expected = {}
    for file in set(index.values()):
        with safe_open(deepseek_fp8 / file, "pt") as f:
            for key in f.keys():  # noqa: SIM118
                t = f.get_tensor(key)
                expected[key] = (t.dtype, t.numel() * t.element_size())
    names = {torch.float8_e4m3fn: "fp8_e4m3", torch.float32: "fp32", torch.bfloat16: "bf16"}
    assert {t.name: (t.dtype, t.nbytes) for t in inv.tensors} == {k: (names[d], b) for k, (d, b) in expected.items()}


def test_fp8_block_fails_on_ascend_910b_with_the_convert_fix(deepseek_fp8: Path) -> None:
    row = check_formats(load_inventory(deepseek_fp8), load_target("ascend-910b"), str(deepseek_fp8))
    assert row.status == "FAIL"
    assert "fp8_e4m3 tensors" in row.reason and "ascend-910b cannot run fp8-block" in row.reason
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in row.reason or "e.g. model.layers.0" in row.reason
    assert f"crosschip convert {deepseek_fp8} {deepseek_fp8}-ascend-910b --target ascend-910b" in row.fix
    assert "--to int8-w8a8-dynamic --layout ascend" in row.fix
    assert row.details["dtypes"]["fp8_e4m3"]["tensors"] > 0


def test_fp8_block_passes_on_nvidia_h100(deepseek_fp8: Path, deepseek_blocks_fp8: Path) -> None:
    # the formats row passes any FP8 block checkpoint on Hopper; the whole check only one whose blocks line up
    assert _row(run_check(deepseek_fp8, "nvidia-h100"), "formats").status == "PASS"
    report = run_check(deepseek_blocks_fp8, "nvidia-h100")
    assert _row(report, "formats").status == "PASS"
    assert report.verdict == "pass", [c.to_dict() for c in report.checks]
    assert report.exit_code == 0


def test_fail_convert_pass_on_ascend_910b(deepseek_fp8: Path, tmp_path: Path) -> None:
    """The fix the FAIL row names, applied, turns the check into a pass (the demo's FAIL -> convert -> PASS)."""
    before = run_check(deepseek_fp8, "ascend-910b")
    assert before.verdict == "fail" and before.exit_code == 1
    converted = convert_to(deepseek_fp8, tmp_path / "ds-910b", target="ascend-910b")
    after = run_check(converted, "ascend-910b")
    assert after.verdict == "pass", [c.to_dict() for c in after.checks]
    int8 = convert_to(deepseek_fp8, tmp_path / "ds-910b-int8", to="int8-w8a8-dynamic", target="ascend-910b")
    assert _row(run_check(int8, "ascend-910b"), "formats").status == "PASS"


def test_bf16_fails_on_ascend_310p_and_its_fp16_conversion_passes(llama_bf16: Path, tmp_path: Path) -> None:
    report = run_check(llama_bf16, "ascend-310p")
    formats = _row(report, "formats")
    assert formats.status == "FAIL" and "bf16 tensors" in formats.reason
    assert "ascend-310p has no bf16 compute" in formats.reason
    assert "--target ascend-310p` (fp16)" in formats.fix and "fp16 range" in formats.fix
    assert report.exit_code == 1
    fp16 = convert_to(llama_bf16, tmp_path / "fp16", target="ascend-310p")
    after = run_check(fp16, "ascend-310p")
    assert _row(after, "formats").status == "PASS"
    assert after.exit_code == 0, [c.to_dict() for c in after.checks if c.status == "FAIL"]


def test_fp32_weights_warn_on_a_bf16_target_and_pass_on_cpu(llama_fp32: Path) -> None:
    inv = load_inventory(llama_fp32)
    warn = check_formats(inv, load_target("nvidia-h100"), str(llama_fp32))
    assert warn.status == "WARN" and "2x the memory" in warn.reason and "--to bf16" in warn.fix
    assert check_formats(inv, load_target("cpu"), str(llama_fp32)).status == "PASS"
    assert check_formats(inv, load_target("ascend-310p"), str(llama_fp32)).status == "FAIL"


@pytest.mark.parametrize(
    ("fmt", "layout"),
    [("bf16", None), ("fp16", None), ("fp32", None), ("fp8-block", None), ("int8-w8a16", None),
     ("int8-w8a8-dynamic", "compressed-tensors"), ("int8-w8a8-dynamic", "ascend")],
)
def test_stored_specs_match_converts_output_specs(fmt: str, layout: str | None, deepseek_fp8: Path) -> None:
    config = json.loads((deepseek_fp8 / "config.json").read_text())
    inv = load_inventory(deepseek_fp8)
    shapes = {name: shape for name, shape in _logical_shapes(inv, deepseek_fp8).items()}
    plan = layouts.make_plan(fmt, layout, shapes, config)
    dtype = layouts.resolve_dtype(fmt, torch.float16 if fmt.startswith("int8") else None)
    for name, shape in shapes.items():
        ours = stored_specs(plan, name, shape, dtype)
        theirs = [(s.name, s.dtype, tuple(s.shape)) for s in output_specs(plan, name, shape, dtype, dtype)]
        assert ours == theirs, name


def _logical_shapes(inv: Inventory, root: Path) -> dict[str, tuple[int, ...]]:
    from crosschip.convert.pipeline import open_source
    from crosschip.convert.stream import SourceReader

    src = open_source(root)
    reader = SourceReader(src.root, src.infos)
    try:
        return {name: src.logical_shape(name, reader) for name in src.groups}
    finally:
        reader.close()


def test_config_only_inventory_equals_the_converted_checkpoint(deepseek_fp8: Path, tmp_path: Path) -> None:
    """Sizing a config-only directory gives the same tensors (names, dtypes, bytes) as the real FP8 files."""
    (tmp_path / "config.json").write_bytes((deepseek_fp8 / "config.json").read_bytes())
    sized = config_inventory(tmp_path, json.loads((tmp_path / "config.json").read_text()))
    real = load_inventory(deepseek_fp8)
    assert sized.config_only and sized.fmt == real.fmt
    assert sorted((t.name, t.dtype, t.nbytes) for t in sized.tensors) == sorted(
        (t.name, t.dtype, t.nbytes) for t in real.tensors
    )
