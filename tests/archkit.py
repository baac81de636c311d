"""Tiny random checkpoints of the architectures newcomers bring (issue 14): one small config per model type.

Every config is as small as the class allows (hidden 64, 2 layers, head_dim 32 so that vLLM's CPU attention
would accept it too) and sized to the test tokenizer. Shared by tests/test_arch_matrix.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

# model_type -> config class kwargs beyond the common ones. Only classes this transformers has are used.
ARCH_KWARGS: dict[str, dict[str, Any]] = {
    "qwen2": {},
    "qwen3": {"head_dim": 32},
    "mistral": {"head_dim": 32, "sliding_window": None},
    "phi3": {"pad_token_id": None},
    "gemma2": {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 64},
    "gemma3_text": {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 64},
    "qwen3_moe": {"head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "decoder_sparse_step": 1},
    "mixtral": {"head_dim": 32, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "deepseek_v3": {"num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": 32, "kv_lora_rank": 32,
                    "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 4,
                    "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 32, "n_group": 1,
                    "topk_group": 1, "first_k_dense_replace": 1},
}


def tiny_config(model_type: str, vocab_size: int, bos: int, eos: int, pad: int | None) -> PretrainedConfig:
    """A 2-layer, 64-wide config of `model_type` with 2 query heads of 32 and 1 KV head."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "tie_word_embeddings": False,
    }
    kwargs.update(ARCH_KWARGS[model_type])
    return AutoConfig.for_model(model_type, **kwargs)


def write_arch_checkpoint(model_type: str, tokenizer: Any, out: Path, seed: int = 0) -> Path:
    """A seed-`seed` random checkpoint of `model_type` written by crosschip (manifest, tokenizer)."""
    from crosschip import checkpoint, models

    special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    config = tiny_config(model_type, len(tokenizer), *special)
    torch.manual_seed(seed)
    model = models.build_model(config, seed=seed)
    provenance = {"arch": model_type, "seed": seed, "source": "tests/archkit.py"}
    return checkpoint.write_checkpoint(Path(out), model, tokenizer, provenance=provenance)
