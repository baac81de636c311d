"""Memory check against hand computations for real Llama-3-8B and DeepSeek-V3 configs (config-only, no weights),
the closed-form sizing against transformers' meta-device model, and the 600B-parameter check end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from check_testkit import DEEPSEEK_V3, LLAMA3_8B, write_config_dir

from crosschip.check.formats import CLOSED_FORM, config_shapes, load_inventory, meta_shapes
from crosschip.check.memory import (
    RESERVE_FRACTION,
    RUNTIME_RESERVE_GIB,
    check_memory,
    kv_layout,
    plan_memory,
)
from crosschip.check.run import run_check
from crosschip.targets import load_target

GIB = 2**30


def _usable(memory_gib: float) -> int:
    device = int(memory_gib * GIB)
    return device - int(RESERVE_FRACTION * device + RUNTIME_RESERVE_GIB * GIB)


# ------------------------------------------------------------------------------------ hand computations


def llama3_8b_bytes() -> int:
    """bf16 bytes of Llama-3-8B, parameter by parameter."""
    v, h, i, layers, kv = 128256, 4096, 14336, 32, 8 * 128
    per_layer = h * h + kv * h + kv * h + h * h + 3 * i * h + 2 * h  # q k v o, gate up down, 2 norms
    params = v * h + layers * per_layer + h + v * h  # embed, layers, final norm, lm_head
    assert params == 8_030_261_248  # the published parameter count
    return 2 * params


def deepseek_v3_fp8_bytes() -> int:
    """Bytes of DeepSeek-V3 as released in FP8: every Linear in a decoder layer 1 byte per weight plus one
    fp32 scale per 128x128 block; embeddings, lm_head, norms and router bf16; router bias fp32; no MTP layer."""
    h, heads, layers, dense = 7168, 128, 61, 3
    attention = [(1536, h), (heads * 192, 1536), (512 + 64, h), (heads * 256, 512), (h, heads * 128)]
    dense_mlp = [(18432, h), (18432, h), (h, 18432)]
    expert = [(2048, h), (2048, h), (h, 2048)]
    linears = layers * attention + dense * dense_mlp + (layers - dense) * (256 + 1) * expert  # + 1 shared
    fp8 = sum(r * c for r, c in linears)
    scales = 4 * sum(math.ceil(r / 128) * math.ceil(c / 128) for r, c in linears)
    norms = layers * (2 * h + 1536 + 512) + h
    bf16 = 2 * (2 * 129280 * h + norms + (layers - dense) * 256 * h)  # embed + lm_head, norms, routers
    fp32 = 4 * (layers - dense) * 256  # e_score_correction_bias
    params = fp8 + norms + 2 * 129280 * h + (layers - dense) * 256 * h
    assert params == 671_026_404_352  # DeepSeek-V3 without its MTP layer (671B)
    return fp8 + scales + bf16 + fp32


def test_llama3_8b_memory_matches_hand_computation(tmp_path: Path) -> None:
    inv = load_inventory(write_config_dir(tmp_path / "llama3-8b", LLAMA3_8B))
    weights = llama3_8b_bytes()
    assert inv.config_only and inv.weight_bytes() == weights
    kv_per_token = 2 * 32 * 8 * 128 * 2  # K and V, layers, KV heads, head_dim, bf16
    assert kv_per_token == 131072
    row = check_memory(inv, load_target("nvidia-h100"), devices=1, batch=1, context=8192)
    d = row.details
    assert row.status == "PASS"
    assert (d["weights_bytes"], d["kv_bytes_per_token"], d["kv_bytes"]) == (weights, kv_per_token, 8192 * kv_per_token)
    assert d["usable_per_device"] == _usable(80)
    assert d["need_per_device"] == weights + 8192 * kv_per_token
    assert d["max_context"] == (_usable(80) - weights) // kv_per_token
    assert d["min_devices"] == 1


def test_llama3_8b_batch_that_needs_two_devices(tmp_path: Path) -> None:
    inv = load_inventory(write_config_dir(tmp_path / "llama3-8b", LLAMA3_8B))
    weights, context, batch = llama3_8b_bytes(), 8192, 64
    one = weights + batch * context * (2 * 32 * 8 * 128 * 2)
    two = math.ceil(weights / 2) + batch * context * (2 * 32 * 4 * 128 * 2)  # 4 of the 8 KV heads per device
    assert one > _usable(64) >= two  # the hand computation says: 1 device is too few, 2 suffice
    row = check_memory(inv, load_target("ascend-910b"), devices=1, batch=batch, context=context)
    assert row.status == "FAIL" and row.details["min_devices"] == 2
    assert "--devices 2" in row.fix and f"--context {row.details['max_context']}" in row.fix
    assert check_memory(inv, load_target("ascend-910b"), devices=2, batch=batch, context=context).status == "PASS"


def test_deepseek_v3_fp8_memory_matches_hand_computation(tmp_path: Path) -> None:
    inv = load_inventory(write_config_dir(tmp_path / "dsv3", DEEPSEEK_V3))
    weights = deepseek_v3_fp8_bytes()
    assert (inv.fmt, inv.weight_bytes()) == ("fp8-block", weights)
    kv_per_token = 61 * (512 + 64) * 2  # MLA: the compressed latent + the RoPE key, one "head", bf16
    assert kv_per_token == 70272
    context, usable = 32768, _usable(80)
    expected_min = next(n for n in range(1, 100) if math.ceil(weights / n) + context * kv_per_token <= usable)
    row = check_memory(inv, load_target("nvidia-h100"), devices=8, batch=1, context=context)
    d = row.details
    assert d["kv_bytes_per_token"] == kv_per_token  # replicated on every device, not split
    assert d["need_per_device"] == math.ceil(weights / 8) + context * kv_per_token
    assert d["min_devices"] == expected_min == 10
    assert row.status == "FAIL" and "needs at least 10 devices" in row.reason
    ok = check_memory(inv, load_target("nvidia-h100"), devices=16, batch=1, context=context)
    assert ok.status == "PASS"
    assert ok.details["max_context"] == (usable - math.ceil(weights / 16)) // kv_per_token


def test_weights_are_sized_as_converted_where_the_stored_format_cannot_run(tmp_path: Path) -> None:
    """On ascend-910b the FP8 release must become bf16 first: the memory check sizes that, 2 bytes a weight."""
    inv = load_inventory(write_config_dir(tmp_path / "dsv3", DEEPSEEK_V3))
    row = check_memory(inv, load_target("ascend-910b"), devices=32, batch=1, context=4096)
    assert row.details["weights_bytes"] == 2 * 671_026_404_352 + 4 * 58 * 256  # bf16 + the fp32 router bias
    assert "as converted to bf16" in row.reason


def test_kv_heads_replicate_when_devices_exceed_them() -> None:
    gqa = kv_layout(LLAMA3_8B)
    assert [gqa.bytes_per_token(2, n) for n in (1, 2, 8, 16)] == [131072, 65536, 16384, 16384]
    mla = kv_layout(DEEPSEEK_V3)
    assert {mla.bytes_per_token(2, n) for n in (1, 8, 64)} == {70272}


def test_plan_min_devices_and_max_context_are_tight() -> None:
    layout = kv_layout(LLAMA3_8B)
    plan = plan_memory(100 * GIB, layout, 2, 80 * GIB, 1, 4, 8192)
    assert plan.min_devices is not None and plan.min_devices > 1
    below = plan_memory(100 * GIB, layout, 2, 80 * GIB, plan.min_devices - 1, 4, 8192)
    at = plan_memory(100 * GIB, layout, 2, 80 * GIB, plan.min_devices, 4, 8192)
    assert not below.fits and at.fits
    longest = plan_memory(100 * GIB, layout, 2, 80 * GIB, at.devices, 4, at.max_context)
    assert longest.fits and not plan_memory(100 * GIB, layout, 2, 80 * GIB, at.devices, 4, at.max_context + 1).fits


# ------------------------------------------------------------------------------------ closed form = meta model


SMALL_LLAMA = {**LLAMA3_8B, "vocab_size": 300, "bos_token_id": 0, "eos_token_id": 1, "hidden_size": 64,
               "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
SMALL_CONFIGS = {
    "llama": SMALL_LLAMA,
    "llama-biased-tied": {**SMALL_LLAMA, "num_key_value_heads": 1, "head_dim": 32, "attention_bias": True,
                          "mlp_bias": True, "tie_word_embeddings": True},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 300, "hidden_size": 64,
              "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "tie_word_embeddings": False},
    "deepseek-no-q-lora": {**DEEPSEEK_V3, "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
                           "moe_intermediate_size": 32, "num_hidden_layers": 3, "first_k_dense_replace": 1,
                           "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
                           "num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": None,
                           "kv_lora_rank": 16, "attention_bias": True},
    "deepseek-v3": DEEPSEEK_V3,
}


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_closed_form_shapes_equal_the_meta_device_model(name: str, tmp_path: Path) -> None:
    config = SMALL_CONFIGS[name]
    assert config["model_type"] in CLOSED_FORM
    root = write_config_dir(tmp_path / name, config)
    assert config_shapes(root, config) == meta_shapes(root)


def test_unknown_model_types_are_sized_on_the_meta_device(tmp_path: Path) -> None:
    config = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 300, "hidden_size": 64,
              "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "torch_dtype": "bfloat16"}
    inv = load_inventory(write_config_dir(tmp_path / "mistral", config))
    params = 300 * 64 * 2 + 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 96 * 64 + 2 * 64) + 64
    assert inv.weight_bytes() == 2 * params


# ------------------------------------------------------------------------------------ the 600B check


def test_600b_config_check_runs_and_reports_its_time(tmp_path: Path) -> None:
    """`crosschip check` on DeepSeek-V3's config (671B parameters) as a fresh process; the time is printed."""
    root = write_config_dir(tmp_path / "DeepSeek-V3", DEEPSEEK_V3)
    script = Path(sys.executable).parent / "crosschip"
    argv = [str(script)] if script.is_file() else [sys.executable, "-m", "crosschip.cli"]
    started = time.perf_counter()
    proc = subprocess.run([*argv, "check", str(root), "--target", "nvidia-h100", "--devices", "16", "--json"],
                          capture_output=True, text=True, timeout=300, check=False)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    print(f"\n600B config check: {wall:.2f} s wall (process), {report['elapsed_s']:.2f} s in run_check")
    memory = next(c for c in report["checks"] if c["check"] == "memory")
    assert memory["details"]["weights_bytes"] == deepseek_v3_fp8_bytes()
    assert report["verdict"] == "pass"
    in_process = run_check(root, "ascend-910b", devices=16)
    assert in_process.verdict == "fail"
    assert [c.check for c in in_process.checks if c.status == "FAIL"] == ["formats", "memory"]
