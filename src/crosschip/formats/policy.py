"""Which checkpoint tensors a quantized format quantizes, and which stay in high precision.

The rule follows the checkpoints real servers load:
  - DeepSeek-V3's released FP8 checkpoint (https://github.com/deepseek-ai/DeepSeek-V3
    `inference/model.py`): every `Linear` inside a decoder layer is FP8 when `dtype == "fp8"` --
    wq / wq_a / wq_b, wkv_a (HF `kv_a_proj_with_mqa`), wkv_b (`kv_b_proj`), wo, the dense MLP, every
    routed `Expert` and the `shared_experts` MLP -- while the embedding (`ParallelEmbedding`), the
    head (`ColumnParallelLinear(..., dtype=torch.get_default_dtype())`), every `RMSNorm` and the
    MoE `Gate` weight/bias are created in the default bf16. The release's tensor table agrees:
    `kv_a_proj_with_mqa.weight` F8_E4M3 [576, 7168] with `weight_scale_inv` [5, 56], shared experts
    F8_E4M3, `mlp.gate.weight` BF16, `gate.e_score_correction_bias` F32, `eh_proj` BF16.
  - transformers' FineGrainedFP8 loader converts every `nn.Linear` except the output embedding
    (`quantizers/base.py` `get_keys_to_not_convert`: lm_head); DeepSeek's router is not an
    nn.Linear (`DeepseekV3TopkRouter`), and `_keep_in_fp32_modules_strict` =
    ["e_score_correction_bias", "gate.weight"] (`models/deepseek_v3/modeling_deepseek_v3.py`).
  - vllm-ascend / msModelSlim descriptions mark embeddings, norms, lm_head and the MoE gate
    `FLOAT` (vllm-ascend docs: `"model.layers.0.mlp.gate.weight": "FLOAT"`; msModelSlim advice:
    "for MoE models the router gate is usually not quantized, exclude '*.gate'"). msModelSlim's
    DeepSeek recipe also leaves `kv_b_proj` unquantized (/work/shared/reference notes), so the
    ascend layout passes keep_float={"kv_b_proj"}.
  - Multi-token-prediction layers (index >= num_hidden_layers): DeepSeek-V3 ships layer 61 with
    FP8 experts/attention but BF16 `eh_proj`, `enorm`/`hnorm`, `embed_tokens`, `shared_head`;
    vllm-ascend says the MTP layer "on the NPU is not quantized ... set the value to FLOAT"
    (`vllm_ascend/quantization/modelslim_config.py`). So MTP layers are quantized only for FP8.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# Modules inside a decoder layer that are 2-D but not Linear layers served in low precision.
_NEVER_QUANTIZED = ("embed_tokens", "shared_head", "eh_proj")
_FP32_SUFFIXES = (".e_score_correction_bias",)


def layer_index(name: str) -> int | None:
    """The decoder-layer index of a parameter name (`model.layers.N.*`), else None."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def module_name(name: str) -> str:
    """The module a parameter belongs to: `a.b.weight` -> `a.b`."""
    return name.rsplit(".", 1)[0] if "." in name else name


def is_router(name: str) -> bool:
    """The MoE router weight (`mlp.gate.weight`), not the `gate_proj` of an MLP."""
    return name.endswith(".mlp.gate.weight")


def is_linear_weight(name: str, shape: Sequence[int]) -> bool:
    """A 2-D `.weight` of a Linear-like module: not an embedding and not a norm.

    This includes lm_head and the MoE router, which are Linear-like for servers (compressed-tensors
    lists them in `ignore`) but stay in high precision.
    """
    if not name.endswith(".weight") or len(shape) != 2:
        return False
    module = module_name(name).rsplit(".", 1)[-1]
    return "norm" not in module and "embed" not in module


def is_mtp_layer(name: str, config: Mapping[str, Any]) -> bool:
    """A DeepSeek multi-token-prediction layer: index >= num_hidden_layers."""
    index = layer_index(name)
    layers = config.get("num_hidden_layers")
    return index is not None and isinstance(layers, int) and index >= layers


def quantizable(
    name: str,
    shape: Sequence[int],
    config: Mapping[str, Any],
    *,
    include_mtp: bool = False,
    keep_float: Collection[str] = (),
) -> bool:
    """Whether a quantized format stores this tensor quantized (see module docstring for sources).

    True only for 2-D Linear weights inside `model.layers.N` (attention projections, dense MLP,
    routed experts `experts.N.*`, `shared_experts.*`), never for the router, norms, embeddings,
    lm_head, biases or 1-D tensors. MTP layers count only with `include_mtp`; a module whose last
    name part is in `keep_float` (e.g. "kv_b_proj") stays in high precision.
    """
    if layer_index(name) is None or not is_linear_weight(name, shape) or is_router(name):
        return False
    parts = module_name(name).split(".")
    if any(part in _NEVER_QUANTIZED for part in parts) or parts[-1] in keep_float:
        return False
    return include_mtp or not is_mtp_layer(name, config)


def keep_fp32(name: str) -> bool:
    """Tensors every format keeps in float32 (DeepSeek-V3 ships e_score_correction_bias as F32)."""
    return name.endswith(_FP32_SUFFIXES)
