"""vLLM's FP8 block-shape rule on checkpoint tensors: which layers vLLM builds from them, and which partitions break.

Shapes come from real configs in closed form (crosschip.check.formats) and the tensors `convert --to fp8-block`
quantizes (crosschip.formats.layouts.make_plan), so nothing is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from check_testkit import DEEPSEEK_V3, LLAMA3_8B

from crosschip.check.formats import config_shapes
from crosschip.check.fp8_rules import VllmLayer, fp8_violations, layer_violations, vllm_layers
from crosschip.formats.layouts import make_plan

BLOCK = (128, 128)


def fp8_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The weights `crosschip convert --to fp8-block` would quantize, with their shapes."""
    shapes = config_shapes(Path("/nonexistent"), config)  # closed form: llama, qwen2, deepseek_v3
    return {n: shapes[n] for n in make_plan("fp8-block", None, shapes, config).quantized}


def llama(intermediate: int = 256, heads: int = 2, kv_heads: int = 2, hidden: int = 128) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": 2, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads}


def test_intermediate_688_breaks_the_merged_gate_up_at_every_tp_and_256_passes() -> None:
    bad = llama(688)
    for tp in (1, 2):
        violations, unclassified = fp8_violations(fp8_shapes(bad), bad, tp, BLOCK)
        assert not unclassified
        gate = [v for v in violations if v.tensor == "model.layers.0.mlp.gate_proj.weight"]
        assert gate and gate[0].dim == "output" and gate[0].size == 688 // tp and gate[0].multiple == 128
        assert gate[0].layer == "model.layers.0.mlp.gate_up_proj"
        message = gate[0].message()
        assert "model.layers.0.mlp.gate_proj.weight" in message and f"output partition {688 // tp}" in message
        assert "validate_fp8_block_shape" in message and f"tp={tp}" in message
    # at tp=1 the last sub-matrix of a merged layer may end mid-block: up_proj is not reported
    assert {v.tensor.split(".")[-2] for v in fp8_violations(fp8_shapes(bad), bad, 1, BLOCK)[0]} == {"gate_proj"}
    # under tp=2 the row-parallel down_proj's input partition 344 breaks too
    assert any(v.tensor.endswith("down_proj.weight") and v.dim == "input" and v.size == 344
               for v in fp8_violations(fp8_shapes(bad), bad, 2, BLOCK)[0])
    good = llama(256)
    assert fp8_violations(fp8_shapes(good), good, 1, BLOCK) == ([], [])


def test_qkv_partition_breaks_only_under_tensor_parallelism() -> None:
    config = llama(256, heads=4, kv_heads=2, hidden=256)  # head_dim 64: q 256, k = v = 128
    assert fp8_violations(fp8_shapes(config), config, 1, BLOCK)[0] == []
    violations = fp8_violations(fp8_shapes(config), config, 2, BLOCK)[0]
    assert {(v.tensor.split(".")[-2], v.size) for v in violations} == {("k_proj", 64), ("v_proj", 64)}
    assert all(v.layer.endswith("self_attn.qkv_proj") for v in violations)


def test_kv_heads_replicate_when_tp_exceeds_them() -> None:
    config = llama(1024, heads=8, kv_heads=2, hidden=1024)  # head_dim 128
    # tp=4 > 2 KV heads: one KV head per rank (replicated), 128 rows: lines up
    assert fp8_violations(fp8_shapes(config), config, 4, BLOCK)[0] == []
    bad_tp = fp8_violations(fp8_shapes(config), config, 3, BLOCK)[0]  # 8 heads do not split over 3 ranks
    heads = [v for v in bad_tp if v.dim == "attention heads"]
    assert heads and heads[0].multiple == 1 and "QKVParallelLinear" in heads[0].rule and heads[0].size == 8


def test_real_configs_load_where_they_are_served() -> None:
    # Llama-3-8B: intermediate 14336 = 112 blocks; at tp=32 each rank gets 448 rows.
    shapes = fp8_shapes(LLAMA3_8B)
    for tp in (1, 2, 4, 8, 16):
        assert fp8_violations(shapes, LLAMA3_8B, tp, BLOCK)[0] == [], tp
    assert {v.size for v in fp8_violations(shapes, LLAMA3_8B, 32, BLOCK)[0]} == {448}
    # DeepSeek-V3 (served with TP 8 and 16): 2048-wide experts split to 64 rows at tp=32 break the MoE rule.
    shapes = fp8_shapes(DEEPSEEK_V3)
    assert fp8_violations(shapes, DEEPSEEK_V3, 8, BLOCK) == ([], [])
    assert fp8_violations(shapes, DEEPSEEK_V3, 16, BLOCK)[0] == []
    moe = [v for v in fp8_violations(shapes, DEEPSEEK_V3, 32, BLOCK)[0] if "experts" in v.layer]
    assert moe and moe[0].size == 64 and "validate_fp8_block_shape_moe" in moe[0].rule
    assert moe[0].tensor == "model.layers.3.mlp.experts.0.gate_proj.weight"  # first MoE layer, named by expert 0


def test_layers_are_grouped_as_vllm_builds_them() -> None:
    layers, unclassified = vllm_layers(fp8_shapes(DEEPSEEK_V3))
    kinds = {layer.name.removeprefix("model.layers.3."): layer.kind for layer in layers
             if layer.name.startswith("model.layers.3.")}
    assert kinds == {"self_attn.fused_qkv_a_proj": "merged", "self_attn.q_b_proj": "column",
                     "self_attn.kv_b_proj": "column", "self_attn.o_proj": "row", "mlp.experts": "moe",
                     "mlp.shared_experts.gate_up_proj": "merged", "mlp.shared_experts.down_proj": "row"}
    assert not unclassified
    fused = next(x for x in layers if x.name == "model.layers.3.self_attn.fused_qkv_a_proj")
    assert fused.never_split and fused.out_sizes == (1536, 576)  # q_lora_rank, kv_lora_rank + rope
    llama_kinds = {x.name.removeprefix("model.layers.0."): x.kind for x in vllm_layers(fp8_shapes(llama()))[0]
                   if x.name.startswith("model.layers.0.")}
    assert llama_kinds == {"self_attn.qkv_proj": "qkv", "self_attn.o_proj": "row", "mlp.gate_up_proj": "merged",
                           "mlp.down_proj": "row"}
    _, odd = vllm_layers({"model.layers.0.attn.c_attn.weight": (384, 128)})
    assert odd == ["model.layers.0.attn.c_attn.weight"]  # not a vLLM Llama/DeepSeek name: no rule applied


@pytest.mark.parametrize(
    ("kind", "out_sizes", "tp", "broken"),
    [
        ("merged", (256, 100), 1, []),  # the last sub-matrix may end mid-block at tp=1
        ("merged", (100, 256), 1, [0]),
        ("merged", (256, 100), 2, [1]),  # split: every partition counts
        ("column", (100,), 1, []),  # one unsplit matrix: nothing to line up
        ("column", (384,), 2, [0]),  # 192 per rank
        ("replicated", (100,), 4, []),
        ("row", (128,), 1, []),  # row-parallel inputs count only when split
    ],
)
def test_vllm_partition_rules(kind: str, out_sizes: tuple[int, ...], tp: int, broken: list[int]) -> None:
    layer = VllmLayer("l", kind, tuple(f"m{i}" for i in range(len(out_sizes))), out_sizes, 384)
    assert [int(v.tensor[1:]) for v in layer_violations(layer, tp, BLOCK, {})] == broken
    row = VllmLayer("r", "row", ("m0",), (128,), 384)
    assert [v.size for v in layer_violations(row, 2, BLOCK, {})] == [192]
    assert layer_violations(VllmLayer("r", "row", ("m0",), (128,), 384), 3, BLOCK, {}) == []  # 128 per rank
