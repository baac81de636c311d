"""`crosschip check` with the serving stack's rules (--stack): formats and kernels per engine, attention head
sizes, and vLLM's FP8 block-shape rule under --devices tensor parallelism. Real checkpoints written by
crosschip (check_testkit fixtures), and config-only directories for sizes nobody needs to load."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from check_testkit import DEEPSEEK_V3, convert_to, write_config_dir

from crosschip.check.engine import convert_gate
from crosschip.check.run import CheckReport, CheckResult, run_check
from crosschip.errors import CrosschipError


def row(report: CheckReport, name: str) -> CheckResult:
    rows = [c for c in report.checks if c.check == name]
    assert len(rows) == 1, [c.check for c in report.checks]
    return rows[0]


def llama_config(intermediate: int, dtype: str = "bfloat16") -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 128,
            "intermediate_size": intermediate, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "max_position_embeddings": 256, "torch_dtype": dtype}


# ------------------------------------------------------------------------------------ FP8 blocks


def test_fp8_checkpoint_with_intermediate_688_fails_naming_tensor_dim_and_rule(llama_688_fp8: Path) -> None:
    report = run_check(llama_688_fp8, "nvidia-h100", numerics=False)
    fp8 = row(report, "fp8-blocks")
    assert report.verdict == "fail" and report.exit_code == 1 and fp8.status == "FAIL"
    assert row(report, "formats").status == "PASS"  # Hopper runs FP8: only the shape rule catches it
    assert "model.layers.0.mlp.gate_proj.weight: output partition 688 of model.layers.0.mlp.gate_up_proj" in fp8.reason
    assert "validate_fp8_block_shape" in fp8.reason and "vllm on nvidia-h100 at --devices 1" in fp8.reason
    assert "fp8_utils.py" in fp8.reason  # the source
    assert "no --devices value loads it" in fp8.fix and f"crosschip convert {llama_688_fp8}" in fp8.fix
    assert fp8.details["stack"] == "vllm" and fp8.details["passing_devices"] == []
    assert {v["tensor"] for v in fp8.details["violations"]} == {f"model.layers.{i}.mlp.gate_proj.weight"
                                                                 for i in range(2)}
    fp8_json = next(c for c in report.to_dict()["checks"] if c["check"] == "fp8-blocks")
    assert fp8_json["details"]["violations"][0] == {
        "tensor": "model.layers.0.mlp.gate_proj.weight", "layer": "model.layers.0.mlp.gate_up_proj", "dim": "output",
        "size": 688, "multiple": 128, "tp": 1, "rule": "vLLM validate_fp8_block_shape, quantization/utils/fp8_utils.py"}


def test_aligned_fp8_checkpoint_passes_at_one_device_and_fails_where_tp_splits_a_head(llama_256_fp8: Path) -> None:
    one = run_check(llama_256_fp8, "nvidia-h100", numerics=False)
    assert row(one, "fp8-blocks").status == "PASS" and one.verdict == "pass", [c.to_dict() for c in one.checks]
    two = row(run_check(llama_256_fp8, "nvidia-h100", devices=2, numerics=False), "fp8-blocks")
    assert two.status == "FAIL"  # head_dim 64: q, k and v give 64 rows per rank
    assert "model.layers.0.self_attn.q_proj.weight: output partition 64 of model.layers.0.self_attn.qkv_proj" \
        in two.reason and "tp=2" in two.reason
    assert two.fix.startswith("serve it on --devices 1;")


def test_deepseek_mla_and_moe_fp8_checkpoint_passes_when_aligned(deepseek_blocks_fp8: Path,
                                                                  deepseek_fp8: Path) -> None:
    report = run_check(deepseek_blocks_fp8, "nvidia-h100", numerics=False)
    assert row(report, "fp8-blocks").status == "PASS" and report.verdict == "pass", [c.to_dict() for c in report.checks]
    tiny = row(run_check(deepseek_fp8, "nvidia-h100", numerics=False), "fp8-blocks")  # 32-wide experts
    assert tiny.status == "FAIL" and "experts.0.gate_proj.weight: output partition 32" in tiny.reason
    assert "validate_fp8_block_shape_moe" in tiny.reason


def test_a_bf16_checkpoint_reports_what_convert_to_fp8_block_would_do(tmp_path: Path) -> None:
    bad = row(run_check(write_config_dir(tmp_path / "688", llama_config(688)), "nvidia-h100"), "fp8-blocks")
    assert bad.status == "PASS"  # the bf16 checkpoint itself loads
    assert "`crosschip convert --to fp8-block` refuses it: model.layers.0.mlp.gate_proj.weight" in bad.reason
    assert bad.details["applies_to"] == "convert --to fp8-block (planned)" and bad.details["violations"]
    good = row(run_check(write_config_dir(tmp_path / "256", llama_config(256)), "nvidia-h100"), "fp8-blocks")
    assert "would load on vllm on nvidia-h100 at --devices 1" in good.reason and not good.details["violations"]
    split = row(run_check(tmp_path / "256", "nvidia-h100", devices=2), "fp8-blocks")  # head_dim 64 per rank
    assert "a `crosschip convert --to fp8-block` output would not load on vllm on nvidia-h100 at --devices 2: " \
        in split.reason and "model.layers.0.self_attn.q_proj.weight: output partition 64" in split.reason


def test_convert_gate_refuses_unless_forced(tmp_path: Path) -> None:
    bad = write_config_dir(tmp_path / "688", llama_config(688))
    with pytest.raises(CrosschipError) as err:
        convert_gate(bad, force=False)
    assert "no engine can load this as fp8-block: model.layers.0.mlp.gate_proj.weight: output partition 688" \
        in err.value.problem and "(and 1 more)" in err.value.problem
    assert "--force" in err.value.fix
    forced = convert_gate(bad, force=True)
    assert len(forced) == 2 and all("validate_fp8_block_shape" in m for m in forced)
    assert convert_gate(write_config_dir(tmp_path / "256", llama_config(256)), force=False) == []


# ------------------------------------------------------------------------------------ formats per stack


def test_int8_w8a16_fails_on_cpu_vllm_and_passes_on_transformers(llama_256_fp8: Path) -> None:
    w8a16 = convert_to(llama_256_fp8.parent / "fp32", llama_256_fp8.parent / "w8a16", to="int8-w8a16")
    default = run_check(w8a16, "cpu", numerics=False)
    formats = row(default, "formats")
    assert default.stack == "vllm" and formats.status == "FAIL"
    assert "vllm on cpu does not run int8-w8a16 (compressed-tensors layout)" in formats.reason
    assert "kernels/linear/__init__.py" in formats.reason  # the source: no CPU W8A16 int8 kernel
    assert "--stack transformers" in formats.fix and "--to int8-w8a8-dynamic --layout compressed-tensors" in formats.fix
    other = run_check(w8a16, "cpu", stack="transformers", numerics=False)
    assert other.stack == "transformers" and row(other, "formats").status == "PASS"
    assert other.verdict == "pass", [c.to_dict() for c in other.checks]


def test_fp8_on_cpu_vllm_needs_amx_on_the_serving_host(llama_256_fp8: Path) -> None:
    no_amx = row(run_check(llama_256_fp8, "cpu", numerics=False, host_flags=["avx2", "avx512f"]), "formats")
    assert no_amx.status == "FAIL" and "only on CPUs with amx_tile; this host lacks amx_tile" in no_amx.reason
    assert "scaled_mm/cpu.py" in no_amx.reason and "--stack transformers" in no_amx.fix
    amx = run_check(llama_256_fp8, "cpu", numerics=False, host_flags=["avx512f", "amx_tile"])
    assert row(amx, "formats").status == "PASS" and row(amx, "fp8-blocks").status == "PASS"


def test_ascend_layout_fails_on_vllm_with_the_layout_fix(llama_256_fp8: Path) -> None:
    ascend = convert_to(llama_256_fp8.parent / "fp32", llama_256_fp8.parent / "w8a8-ascend", to="int8-w8a8-dynamic",
                        target="ascend-910b")
    formats = row(run_check(ascend, "nvidia-h100", numerics=False), "formats")
    assert formats.status == "FAIL" and "vllm on nvidia-h100 does not run int8-w8a8-dynamic (ascend layout)" \
        in formats.reason
    assert "--to int8-w8a8-dynamic --layout compressed-tensors" in formats.fix
    assert row(run_check(ascend, "ascend-910b", numerics=False), "formats").status == "PASS"


def test_fp8_on_ascend_910b_names_the_chip_and_the_stack_with_sources(deepseek_fp8: Path) -> None:
    formats = row(run_check(deepseek_fp8, "ascend-910b", numerics=False), "formats")
    assert formats.status == "FAIL" and "ascend-910b cannot run fp8-block" in formats.reason
    assert "vllm-ascend on ascend-910b does not run fp8-block" in formats.reason and "fp8_config.py" in formats.reason
    assert formats.details["stack"] == "vllm-ascend"


def test_fp32_is_unverified_on_vllm_ascend_and_refused_by_mindie(llama_fp32: Path) -> None:
    asc = row(run_check(llama_fp32, "ascend-910b", numerics=False), "formats")
    assert asc.status == "WARN" and "vllm-ascend on ascend-910b runs fp32 (hf layout) on related hardware" in asc.reason
    mindie = row(run_check(llama_fp32, "ascend-910b", stack="mindie", numerics=False), "formats")
    assert mindie.status == "FAIL" and "mindie on ascend-910b does not run fp32" in mindie.reason
    assert "mindie_llm0001.html" in mindie.reason and "--to bf16" in mindie.fix


# ------------------------------------------------------------------------------------ attention


def test_head_dim_16_fails_on_cpu_vllm_and_not_on_transformers(llama_fp32: Path) -> None:
    report = run_check(llama_fp32, "cpu", numerics=False)
    attention = row(report, "attention")
    assert attention.status == "FAIL" and "this model's is 16" in attention.reason
    assert "cpu_attn.py" in attention.reason and attention.fix == "serve it with --stack transformers"
    assert 16 not in attention.details["supported"] and 64 in attention.details["supported"]
    other = run_check(llama_fp32, "cpu", stack="transformers", numerics=False)
    assert "attention" not in [c.check for c in other.checks] and other.verdict == "pass"


def test_mla_fails_on_310p_vllm_ascend(tmp_path: Path) -> None:
    config = copy.deepcopy(DEEPSEEK_V3)
    del config["quantization_config"]
    config["torch_dtype"] = "float16"
    report = run_check(write_config_dir(tmp_path / "ds", config), "ascend-310p", devices=16, numerics=False)
    attention = row(report, "attention")
    assert attention.status == "FAIL" and "vllm-ascend on ascend-310p has no multi-head latent attention" \
        in attention.reason and "platform.py" in attention.reason
    assert attention.fix == "serve it with --stack mindie"


def test_mla_latent_576_passes_the_cpu_vllm_kernels(tmp_path: Path) -> None:
    config = copy.deepcopy(DEEPSEEK_V3)
    del config["quantization_config"]
    attention = row(run_check(write_config_dir(tmp_path / "ds", config), "cpu", numerics=False), "attention")
    assert attention.status == "PASS" and attention.details["size"] == 576


# ------------------------------------------------------------------------------------ --stack


def test_unknown_stack_is_a_usage_error_before_reading_the_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CrosschipError) as err:
        run_check(tmp_path / "absent", "ascend-910b", stack="vllm")
    assert "ascend-910b has no serving stack 'vllm'" in err.value.problem
    assert err.value.fix == "use --stack vllm-ascend or mindie"


def test_json_names_the_stack_and_each_rules_outcome(llama_256_fp8: Path) -> None:
    data = run_check(llama_256_fp8, "nvidia-h100", numerics=False).to_dict()
    assert data["stack"] == "vllm"
    checks = {c["check"]: c for c in data["checks"]}
    assert list(checks) == ["formats", "memory", "architecture", "load", "fp8-blocks", "numerics"]
    assert checks["fp8-blocks"]["details"]["rule"] == "fp8_block"
    assert checks["architecture"]["details"]["rule"] == "architectures"
    assert all(src.startswith("https://") for src in checks["fp8-blocks"]["details"]["sources"])
