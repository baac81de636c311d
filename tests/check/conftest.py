"""Check fixtures: real tiny checkpoints in the formats `crosschip check` judges, and config-only directories.

Every checkpoint is written by crosschip itself (make_checkpoint, then crosschip.convert.pipeline.convert),
so the FP8-block, bf16 and fp16 files are exactly what a user would hand to `crosschip check`.
Test modules import the helpers as `check_testkit` (`import conftest` would be ambiguous with tests/conftest.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.modules["check_testkit"] = sys.modules[__name__]

# Real DeepSeek-V3 config.json values (huggingface.co/deepseek-ai/DeepSeek-V3, config.json): 671B parameters.
DEEPSEEK_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False, "rope_theta": 10000, "attention_bias": False, "num_nextn_predict_layers": 1,
    "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}
# Real Meta-Llama-3-8B config.json values (huggingface.co/meta-llama/Meta-Llama-3-8B).
LLAMA3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "hidden_act": "silu",
    "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "torch_dtype": "bfloat16",
}


def write_config_dir(root: Path, config: dict[str, Any]) -> Path:
    """A directory holding only config.json (what `crosschip check` sizes on the meta device)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return root


def convert_to(src: Path, dst: Path, to: str | None = None, target: str | None = None) -> Path:
    """`crosschip convert SRC DST [--to FMT] [--target T]` through the library."""
    from crosschip.convert.pipeline import convert, resolve_options

    convert(src, dst, resolve_options(to, target, None, None))
    return dst


@pytest.fixture(scope="session")
def llama_fp32(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama preset as training writes it: fp32, tokenizer, crosschip.json."""
    return make_checkpoint("tiny", tmp_path_factory.mktemp("check-llama") / "fp32")


@pytest.fixture(scope="session")
def llama_bf16(llama_fp32: Path) -> Path:
    return convert_to(llama_fp32, llama_fp32.parent / "bf16", to="bf16")


@pytest.fixture(scope="session")
def deepseek_fp8(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deepseek-tiny (MLA + MoE) converted to DeepSeek-V3 FP8 blocks (1-byte weights + 128x128 fp32 scales)."""
    src = make_checkpoint("deepseek-tiny", tmp_path_factory.mktemp("check-deepseek") / "fp32")
    return convert_to(src, src.parent / "fp8", to="fp8-block")


# Block-aligned and misaligned models for the FP8 block-shape rule (vLLM validate_fp8_block_shape): every
# Linear a multiple of 128 but the one under test. Written like a preset checkpoint, from a preset object.
def _write_custom(preset: Any, tokenizer: Any, out: Path) -> Path:
    from crosschip import checkpoint, models

    special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = models.build_model(preset.build_config(len(tokenizer), *special), seed=0)
    return checkpoint.write_checkpoint(out, model, tokenizer, provenance={"preset": preset.name, "seed": 0})


@pytest.fixture(scope="session")
def llama_688_fp8(tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama with intermediate_size 688 (the `small` preset's), converted to FP8 blocks by the library
    (which does not gate): gate_up_proj's partition 688 is not a multiple of 128, so no engine loads it."""
    from crosschip.models import LlamaPreset

    root = tmp_path_factory.mktemp("check-688")
    src = _write_custom(LlamaPreset("l688", "test", 128, 2, 2, 2, 688, 256), tiny_tokenizer, root / "fp32")
    return convert_to(src, root / "fp8", to="fp8-block")


@pytest.fixture(scope="session")
def llama_256_fp8(tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same Llama with intermediate_size 256: every partition lines up at --devices 1."""
    from crosschip.models import LlamaPreset

    root = tmp_path_factory.mktemp("check-256")
    src = _write_custom(LlamaPreset("l256", "test", 128, 2, 2, 2, 256, 256), tiny_tokenizer, root / "fp32")
    return convert_to(src, root / "fp8", to="fp8-block")


@pytest.fixture(scope="session")
def deepseek_blocks_fp8(tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DeepSeek-V3 style (MLA + MoE), every FP8 partition a multiple of 128 at --devices 1 (experts 128 wide)."""
    from crosschip.models import DeepseekV3Preset

    preset = DeepseekV3Preset("ds-blocks", "test", 128, 2, 2, 256, 128, 4, 2, 1, 1, kv_lora_rank=128,
                              q_lora_rank=None, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64,
                              max_position=512)
    root = tmp_path_factory.mktemp("check-ds-blocks")
    return convert_to(_write_custom(preset, tiny_tokenizer, root / "fp32"), root / "fp8", to="fp8-block")
