"""Convert fixtures: a hand-written DeepSeek-V3 FP8 checkpoint, crosschip-written sources, file surgery.

The FP8 checkpoint is built here without crosschip's quantizer: random float8_e4m3fn codes and
random positive per-block scales, laid out as DeepSeek-V3 publishes it (README_WEIGHTS.md in
https://github.com/deepseek-ai/DeepSeek-V3): `<name>` F8_E4M3 + `<name>_scale_inv` F32
[ceil(out/128), ceil(in/128)] for every Linear inside a decoder layer, BF16 embeddings, norms,
lm_head and router, F32 `e_score_correction_bias`, several shards plus an index, no crosschip.json
and no tokenizer. Its dimensions (200, 300, 136, ...) are deliberately not multiples of 128.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

BLOCK = 128
INDEX = "model.safetensors.index.json"
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
}
# Every dimension that a weight has is off the 128 grid except where the model forces it.
DS_FP8_CONFIG: dict[str, Any] = {
    "vocab_size": 400, "hidden_size": 200, "intermediate_size": 300, "moe_intermediate_size": 136,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "n_routed_experts": 4,
    "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 72,
    "q_lora_rank": 96, "qk_rope_head_dim": 8, "qk_nope_head_dim": 24, "v_head_dim": 24, "n_group": 1,
    "topk_group": 1, "max_position_embeddings": 256, "num_nextn_predict_layers": 0,
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
}
FP8_SHARDS = 3
# Test modules import the helpers below as `convert_testkit`: `import conftest` would be ambiguous
# (tests/conftest.py has the same module name), pytest docs "conftest.py: local per-directory plugins".
sys.modules["convert_testkit"] = sys.modules[__name__]


def deepseek_v3_shapes(c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a DeepSeek-V3 HF checkpoint, spelled out from the config."""
    h, heads, qk = c["hidden_size"], c["num_attention_heads"], c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c["vocab_size"], h),
                                          "model.norm.weight": (h,), "lm_head.weight": (c["vocab_size"], h)}

    def mlp(prefix: str, inter: int) -> None:
        shapes.update({f"{prefix}.gate_proj.weight": (inter, h), f"{prefix}.up_proj.weight": (inter, h),
                       f"{prefix}.down_proj.weight": (h, inter)})

    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_a_proj.weight": (c["q_lora_rank"], h),
            f"{p}.self_attn.q_a_layernorm.weight": (c["q_lora_rank"],),
            f"{p}.self_attn.q_b_proj.weight": (heads * qk, c["q_lora_rank"]),
            f"{p}.self_attn.kv_a_proj_with_mqa.weight": (c["kv_lora_rank"] + c["qk_rope_head_dim"], h),
            f"{p}.self_attn.kv_a_layernorm.weight": (c["kv_lora_rank"],),
            f"{p}.self_attn.kv_b_proj.weight": (heads * (c["qk_nope_head_dim"] + c["v_head_dim"]),
                                                c["kv_lora_rank"]),
            f"{p}.self_attn.o_proj.weight": (h, heads * c["v_head_dim"]),
        })
        if i < c["first_k_dense_replace"]:
            mlp(f"{p}.mlp", c["intermediate_size"])
            continue
        for e in range(c["n_routed_experts"]):
            mlp(f"{p}.mlp.experts.{e}", c["moe_intermediate_size"])
        mlp(f"{p}.mlp.shared_experts", c["moe_intermediate_size"] * c["n_shared_experts"])
        shapes[f"{p}.mlp.gate.weight"] = (c["n_routed_experts"], h)
        shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (c["n_routed_experts"],)
    return shapes


def deepseek_fp8_weight(name: str, shape: tuple[int, ...]) -> bool:
    """DeepSeek-V3's release rule: 2-D Linear weights inside decoder layers, except norms and the router."""
    return (name.startswith("model.layers.") and len(shape) == 2 and "norm" not in name
            and not name.endswith(".mlp.gate.weight"))


def blockwise_dequant(w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """Reference DeepSeek-V3 `weight_dequant` in float32: each 128x128 tile times its scale."""
    rows, cols = w.shape
    expanded = scale_inv.float().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
    return w.float() * expanded


def expand_blocks(scale_inv: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A per-block tensor broadcast to every element of a [rows, cols] weight."""
    return scale_inv.float().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[: shape[0], : shape[1]]


@dataclass(frozen=True)
class Fp8Checkpoint:
    root: Path
    tensors: dict[str, torch.Tensor]  # exactly what is stored (fp8 codes, fp32 scales, bf16 / fp32 rest)
    weight_map: dict[str, str]

    @property
    def fp8_weights(self) -> list[str]:
        return sorted(n for n, t in self.tensors.items() if t.dtype == torch.float8_e4m3fn)


def _random_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if deepseek_fp8_weight(name, shape):
            out[name] = torch.randn(shape, generator=g).to(torch.float8_e4m3fn)
            grid = (math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK))
            # Different positive scale per tile, so a wrong tile mapping cannot go unnoticed.
            out[name + "_scale_inv"] = (0.5 + torch.rand(grid, generator=g)) * 0.02
        elif name.endswith("e_score_correction_bias"):
            out[name] = torch.rand(shape, generator=g) * 0.1  # F32 in the release
        elif len(shape) == 1:
            out[name] = (1 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        else:
            out[name] = (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    return out


def write_sharded(root: Path, tensors: dict[str, torch.Tensor], weight_map: dict[str, str]) -> None:
    """Write safetensors shards and their index as `weight_map` assigns tensors to files."""
    root.mkdir(parents=True, exist_ok=True)
    for file in sorted(set(weight_map.values())):
        part = {n: t.contiguous() for n, t in tensors.items() if weight_map[n] == file}
        save_file(part, root / file, metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / INDEX).write_text(json.dumps(index, indent=2))


def write_fp8_deepseek(root: Path, seed: int = 0) -> Fp8Checkpoint:
    """A DeepSeek-V3-style FP8 checkpoint as downloaded: config + FP8_SHARDS shards + index, nothing else."""
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(**DS_FP8_CONFIG).to_dict()
    config.pop("dtype", None)
    config |= {"torch_dtype": "bfloat16", "quantization_config": FP8_QUANTIZATION_CONFIG}
    tensors = _random_tensors(deepseek_v3_shapes(config), seed)
    names = sorted(tensors)
    # Round-robin over sorted names: a weight and its `_scale_inv` are neighbours, so they land in
    # different shards (the converter must pair them across files).
    weight_map = {n: f"model-{i % FP8_SHARDS + 1:05d}-of-{FP8_SHARDS:05d}.safetensors"
                  for i, n in enumerate(names)}
    split = [n for n in names if n.endswith("_scale_inv")
             and weight_map[n] != weight_map[n.removesuffix("_scale_inv")]]
    assert split, "the fixture must place some scale in another shard than its weight"
    write_sharded(root, tensors, weight_map)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return Fp8Checkpoint(root, tensors, weight_map)


@pytest.fixture(scope="session")
def fp8_deepseek(tmp_path_factory: pytest.TempPathFactory) -> Fp8Checkpoint:
    return write_fp8_deepseek(tmp_path_factory.mktemp("ds-fp8") / "src")


@pytest.fixture(scope="session")
def llama_src(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` Llama preset as crosschip writes it (fp32, tokenizer, crosschip.json)."""
    return make_checkpoint("tiny", tmp_path_factory.mktemp("llama") / "src")


@pytest.fixture(scope="session")
def deepseek_src(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `deepseek-tiny` preset (MLA + MoE) as crosschip writes it (fp32)."""
    return make_checkpoint("deepseek-tiny", tmp_path_factory.mktemp("deepseek") / "src")


# ------------------------------------------------------------------------------ file surgery


def snapshot(root: Path) -> dict[str, tuple[str, int] | None]:
    """Every path below root: (sha256, mtime_ns) for files, None for directories."""
    out: dict[str, tuple[str, int] | None] = {}
    for p in sorted(root.rglob("*")):
        key = p.relative_to(root).as_posix()
        out[key] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) if p.is_file() else None
    return out


def shard_of(root: Path, name: str) -> Path:
    return root / json.loads((root / INDEX).read_text())["weight_map"][name]


def edit_tensors(root: Path, name: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite the shard that holds `name` after `edit` changed its {name: tensor} dict in place."""
    path = shard_of(root, name)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite a safetensors header in place (data bytes kept), e.g. to give a tensor a bogus dtype."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def drop_manifest(root: Path) -> Path:
    """Tampered copies of a crosschip checkpoint no longer match crosschip.json: remove it."""
    (root / "crosschip.json").unlink(missing_ok=True)
    return root


def write_overflowing(src: Path, root: Path) -> str:
    """A copy of `src` with two values of one weight outside the float16 range; returns its name."""
    shutil.copytree(src, root)
    drop_manifest(root)
    name = "model.layers.1.mlp.down_proj.weight"

    def blow_up(t: dict[str, torch.Tensor]) -> None:
        t[name][0, 0], t[name][1, 2] = 1e5, -7e4

    edit_tensors(root, name, blow_up)
    return name
