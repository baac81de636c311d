"""Model presets: named, typed, in a registry. A preset is never guessed from a path.

Every preset builds a stock Hugging Face `transformers` class, so any checkpoint crosschip
writes loads with `AutoModelForCausalLM.from_pretrained` and with every serving stack that
knows the architecture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from crosschip.errors import CrosschipError


@dataclass(frozen=True)
class LlamaPreset:
    """A dense decoder (LlamaForCausalLM): RMSNorm, RoPE, SwiGLU, GQA."""

    name: str
    description: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position: int = 2048
    rope_theta: float = 10000.0

    arch = "llama"

    def build_config(self, vocab_size: int, bos_id: int, eos_id: int, pad_id: int | None) -> PretrainedConfig:
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_position,
            rope_theta=self.rope_theta,
            tie_word_embeddings=False,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )


@dataclass(frozen=True)
class DeepseekV3Preset:
    """DeepSeek-V3 style (DeepseekV3ForCausalLM): multi-head latent attention + mixture of experts.

    The first `first_dense` layers are dense MLPs, the rest MoE with shared experts and
    group-limited top-k routing, as in DeepSeek-V3 (scaled down).
    """

    name: str
    description: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int  # dense-layer MLP width
    moe_intermediate_size: int  # per-expert MLP width
    n_routed_experts: int
    experts_per_token: int
    n_shared_experts: int
    first_dense: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    n_group: int = 1
    topk_group: int = 1
    max_position: int = 2048

    arch = "deepseek_v3"

    def build_config(self, vocab_size: int, bos_id: int, eos_id: int, pad_id: int | None) -> PretrainedConfig:
        return DeepseekV3Config(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            moe_intermediate_size=self.moe_intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            n_routed_experts=self.n_routed_experts,
            num_experts_per_tok=self.experts_per_token,
            n_shared_experts=self.n_shared_experts,
            first_k_dense_replace=self.first_dense,
            kv_lora_rank=self.kv_lora_rank,
            q_lora_rank=self.q_lora_rank,
            qk_rope_head_dim=self.qk_rope_head_dim,
            qk_nope_head_dim=self.qk_nope_head_dim,
            v_head_dim=self.v_head_dim,
            n_group=self.n_group,
            topk_group=self.topk_group,
            max_position_embeddings=self.max_position,
            # MTP layers are not trained here; declaring none keeps the checkpoint self-consistent.
            num_nextn_predict_layers=0,
            # What transformers' DeepseekV3 computes (sigmoid scores, bias-corrected group top-k), stated the way
            # DeepSeek-V3's own config.json does: vLLM reads these, and without them routes by softmax and
            # has no e_score_correction_bias to load.
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            tie_word_embeddings=False,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )


Preset = LlamaPreset | DeepseekV3Preset

_PRESETS: tuple[Preset, ...] = (
    LlamaPreset("tiny", "Llama, ~0.1M params + embeddings: unit tests", 64, 2, 4, 2, 128, 512),
    LlamaPreset("small", "Llama, ~5M params: the CPU demo", 256, 4, 4, 4, 688, 1024),
    LlamaPreset("base", "Llama, ~30M params + embeddings: bandwidth-bound serving benchmarks", 512, 8, 8, 4, 1408),
    LlamaPreset("1b", "Llama, ~1.2B params: GPU training", 2048, 16, 32, 8, 5632, 4096, 500000.0),
    DeepseekV3Preset(
        "deepseek-tiny", "DeepSeek-V3 style MLA+MoE, tiny: unit tests", 64, 2, 4, 128, 32, 4, 2, 1, 1,
        kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        max_position=512,
    ),
    DeepseekV3Preset(
        "deepseek-small", "DeepSeek-V3 style MLA+MoE, ~8M params: CPU runs", 256, 4, 4, 688, 256, 8, 2, 1, 1,
        kv_lora_rank=64, q_lora_rank=128, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
        n_group=2, topk_group=1, max_position=1024,
    ),
    DeepseekV3Preset(
        "deepseek-serve", "DeepSeek-V3 style, V3's own MLA sizes (latent 512 + RoPE 64), ~8M params: serving "
        "benchmarks (vLLM's CPU MLA takes only this latent size)", 256, 2, 4, 688, 256, 8, 2, 1, 1,
        kv_lora_rank=512, q_lora_rank=128, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        n_group=2, topk_group=1, max_position=1024,
    ),
)
PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise CrosschipError(
            f"unknown model preset {name!r}",
            f"use one of {', '.join(PRESETS)} or a checkpoint directory",
        )
    return PRESETS[name]


def preset_summary(preset: Preset) -> dict:
    return {"arch": preset.arch, **asdict(preset)}


def build_model(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """A freshly initialised fp32 model; the seed makes initialisation reproducible."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attention_for(config))


def attention_for(config: PretrainedConfig) -> str:
    """`sdpa` where the model class supports it, else `eager`.

    sdpa is fused attention on every backend torch supports and what serving stacks use, but some classes
    refuse it: transformers' `_supports_sdpa` is False for Gemma2 (`models/gemma2/modeling_gemma2.py`:
    "sdpa does not support softcapping"), and `from_pretrained(attn_implementation="sdpa")` then raises
    (`modeling_utils.get_correct_attn_implementation`). Asking the class's own flag picks what it can run.
    """
    return "sdpa" if getattr(model_class(config), "_supports_sdpa", False) else "eager"


def attention_of(model: PreTrainedModel) -> str:
    """The attention implementation a built model runs (recorded in reports next to dtype and device)."""
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The transformers class for a config (what AutoModelForCausalLM would pick)."""
    mapping = AutoModelForCausalLM._model_mapping  # noqa: SLF001 - the public Auto class has no lookup API
    if type(config) not in mapping:
        raise CrosschipError(
            f"model type {config.model_type!r} is not a causal LM transformers knows",
            "use a checkpoint of a causal language model (e.g. llama, deepseek_v3)",
        )
    return mapping[type(config)]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
