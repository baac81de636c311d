"""Convert streams: peak RSS is set by the largest tensor, not by the size of the model.

Two checkpoints in the DeepSeek-V3 FP8 layout (float8_e4m3fn Linear weights + fp32 `_scale_inv`
per 128x128 block, bf16 embeddings and norms; Llama-shaped), with the same tensor shapes and one
with 4x the decoder layers (~130 MB vs ~500 MB of fp8, ~1 GB of bf16 out), are converted to bf16,
each in a fresh process that reports its own peak RSS. An implementation that kept the model's
tensors, or the touched pages of a memory-mapped source, adds ~4x as much to the larger run's peak,
far past the 25% allowed: the interpreter's own baseline (~330 MB with torch) is smaller than that.
Checked to fail: crosschip before this test (safetensors' mmap, whole-tensor temporaries) peaked at
663 vs 1048 MiB; the current code with only the mmap reader put back at 511 vs 876 MiB, keeping
every converted block alive at 606 vs 1338 MiB; as it is, 381 vs 382 MiB.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

HIDDEN, INTER, VOCAB, BLOCK = 2048, 4096, 2048, 128
LAYERS = 3  # and 4x as many
SHARD_BYTES = 128 * 2**20
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
# Runs one conversion and prints this process's peak RSS. VmHWM, not getrusage's ru_maxrss: Linux
# carries ru_maxrss across exec from the forking process, so a child of a large pytest process
# would report pytest's peak instead of its own.
WRAPPER = """
import sys
from pathlib import Path
from crosschip.convert.pipeline import ConvertOptions, convert
convert(Path(sys.argv[1]), Path(sys.argv[2]), ConvertOptions(fmt="bf16", shard_bytes=256 * 2**20))
status = Path("/proc/self/status").read_text()
print(int(status.split("VmHWM:")[1].split()[0]) * 1024)
"""

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads peak RSS from /proc/self/status")


def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}"
    shapes: dict[str, tuple[int, ...]] = {f"{p}.input_layernorm.weight": (HIDDEN,),
                                          f"{p}.post_attention_layernorm.weight": (HIDDEN,)}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        shapes[f"{p}.self_attn.{proj}.weight"] = (HIDDEN, HIDDEN)
    shapes |= {f"{p}.mlp.gate_proj.weight": (INTER, HIDDEN), f"{p}.mlp.up_proj.weight": (INTER, HIDDEN),
               f"{p}.mlp.down_proj.weight": (HIDDEN, INTER)}
    return shapes


def write_fp8_checkpoint(root: Path, layers: int, seed: int = 0) -> None:
    """FP8 e4m3 Linear weights + fp32 `_scale_inv` per 128x128 block, bf16 embeddings and norms, shards + index."""
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        shapes |= layer_shapes(i)
    shapes |= {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    root.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    for name, shape in shapes.items():
        if sum(t.nbytes for t in shards[-1].values()) > SHARD_BYTES:
            shards.append({})
        if name.startswith("model.layers.") and len(shape) == 2:
            codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
            codes[(codes & 0x7F) == 0x7F] -= 1  # no NaN codes
            shards[-1][name] = torch.from_numpy(codes).view(torch.float8_e4m3fn)
            grid = (math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK))
            shards[-1][name + "_scale_inv"] = torch.from_numpy(rng.uniform(1e-4, 1e-3, grid).astype(np.float32))
        else:
            shards[-1][name] = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(torch.bfloat16)
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, root / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": VOCAB, "torch_dtype": "bfloat16",
              "quantization_config": FP8_CONFIG}
    (root / "config.json").write_text(json.dumps(config))


def converted_peak_rss(src: Path, dst: Path) -> int:
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(src), str(dst)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.strip().splitlines()[-1])


def test_peak_rss_does_not_grow_with_the_model(tmp_path: Path) -> None:
    write_fp8_checkpoint(tmp_path / "small", layers=LAYERS)
    write_fp8_checkpoint(tmp_path / "large", layers=4 * LAYERS)
    small = sum(p.stat().st_size for p in (tmp_path / "small").glob("*.safetensors"))
    large = sum(p.stat().st_size for p in (tmp_path / "large").glob("*.safetensors"))

    peak_small = converted_peak_rss(tmp_path / "small", tmp_path / "small-bf16")
    peak_large = converted_peak_rss(tmp_path / "large", tmp_path / "large-bf16")

    mib = 2**20
    assert peak_large < 1.25 * peak_small, (
        f"peak RSS {peak_large / mib:.0f} MiB converting {large / mib:.0f} MiB vs {peak_small / mib:.0f} MiB "
        f"converting {small / mib:.0f} MiB: memory grows with the model")
    # The runs really converted: every weight is there in bf16, no scale is left.
    out = tmp_path / "large-bf16"
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(weight_map) == 3 + 9 * 4 * LAYERS and not any(n.endswith("_scale_inv") for n in weight_map)
    name = f"model.layers.{4 * LAYERS - 1}.mlp.down_proj.weight"
    with safe_open(out / weight_map[name], "pt") as f:
        assert f.get_slice(name).get_dtype() == "BF16"
