"""Planted faults: copies of a checkpoint with one known defect each, to calibrate and test `crosschip verify`.

A gate is only as good as the faults it has been shown to catch. Each fault here is a defect seen in real
conversions, written into a copy of a (converted) checkpoint the way a broken tool would write it:

- `scale`: a module's dequantization scale multiplied by a factor (INT8 `weight_scale`, FP8 `weight_scale_inv`;
  the weight itself for float formats), as a wrong calibration or a transposed scale tensor does;
- `zero-block`: one block of a weight zeroed (an FP8 128x128 tile, or the top-left block of a smaller matrix),
  as a dropped shard or an unwritten tile does;
- `swap-rows`: two output rows of a weight exchanged (their per-channel scales with them), as a wrong
  head or gate/up interleave does;
- `no-bos`: the tokenizer no longer adds the BOS the model was trained with.

`alternative` writes the opposite: a *correct* conversion by another method (per-channel INT8 scales with
error-minimizing clipping, as llm-compressor's MSE observer picks them: up to 20% shrink in 100 steps,
|err|^2.4; FP8 block scales rounded up to powers of two, as MX-style recipes do). It rounds to the same grid
differently, so a gate measured against crosschip's own conversion must still pass it.

The copy gets a fresh crosschip.json (sha256 of every file), so only the content is wrong, as with a
checkpoint another tool produced; the manifest records the planted fault for whoever inspects it.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from crosschip import checkpoint
from crosschip.errors import CrosschipError
from crosschip.fsio import atomic_write_json

KINDS = ("scale", "zero-block", "swap-rows", "no-bos")
ALTERNATIVES = ("int8-mse-clip", "fp8-pow2-scale")
# llm-compressor's MSE observer: shrink amax by up to 20% in 100 steps, keep the ratio minimizing sum |err|^2.4.
_CLIP_RATIOS = tuple(1.0 - 0.2 * i / 100 for i in range(101))
_CLIP_NORM = 2.4
_SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")  # FP8 block scales, INT8 per-channel scales
_BLOCK = 128


@dataclass(frozen=True)
class Fault:
    """One planted defect: its kind, the modules it hits (glob over module names) and, for scales, the factor."""

    name: str
    kind: str
    modules: str = ""  # e.g. "model.layers.1.mlp.down_proj" or "model.layers.*.mlp.down_proj"
    factor: float = 1.0
    expect: str | None = None  # the localization point expected to fail first (None: not layer-local)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _module_of(tensor_name: str) -> tuple[str, str]:
    module, _, leaf = tensor_name.rpartition(".")
    return module, leaf


def _edit_scale(tensors: dict[str, torch.Tensor], module: str, factor: float) -> bool:
    for suffix in _SCALE_SUFFIXES:
        name = f"{module}.{suffix}"
        if name in tensors:
            tensors[name] = (tensors[name].float() * factor).to(tensors[name].dtype)
            return True
    name = f"{module}.weight"
    if name in tensors and tensors[name].is_floating_point() and tensors[name].element_size() > 1:
        tensors[name] = (tensors[name].float() * factor).to(tensors[name].dtype)
        return True
    return False


def _edit_zero_block(tensors: dict[str, torch.Tensor], module: str) -> bool:
    name = f"{module}.weight"
    if name not in tensors or tensors[name].dim() != 2:
        return False
    w = tensors[name].clone()
    rows, cols = min(_BLOCK, w.shape[0] // 2 or 1), min(_BLOCK, w.shape[1] // 2 or 1)
    w[:rows, :cols] = 0  # int8 code 0 and fp8 code 0 both decode to 0
    tensors[name] = w
    return True


def _edit_swap_rows(tensors: dict[str, torch.Tensor], module: str) -> bool:
    name = f"{module}.weight"
    if name not in tensors or tensors[name].dim() != 2 or tensors[name].shape[0] < 2:
        return False
    for key in (name, f"{module}.weight_scale", f"{module}.weight_offset"):
        if key in tensors and tensors[key].dim() == 2 and tensors[key].shape[0] == tensors[name].shape[0]:
            t = tensors[key].clone()
            t[[0, 1]] = t[[1, 0]]
            tensors[key] = t
    return True


def _edit(tensors: dict[str, torch.Tensor], fault: Fault) -> list[str]:
    modules = sorted({_module_of(n)[0] for n in tensors if fnmatch.fnmatchcase(_module_of(n)[0], fault.modules)})
    hit = []
    for module in modules:
        if fault.kind == "scale":
            done = _edit_scale(tensors, module, fault.factor)
        elif fault.kind == "zero-block":
            done = _edit_zero_block(tensors, module)
        else:
            done = _edit_swap_rows(tensors, module)
        if done:
            hit.append(module)
    return hit


def strip_bos(tokenizer_dir: Path) -> None:
    """Make a saved tokenizer stop adding BOS (drop TemplateProcessing, add_bos_token false), in place."""
    path = tokenizer_dir / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    post = data.get("post_processor") or {}
    if post.get("type") == "TemplateProcessing":
        data["post_processor"] = None
    elif post.get("type") == "Sequence":
        post["processors"] = [p for p in post.get("processors", []) if p.get("type") != "TemplateProcessing"]
    atomic_write_json(path, data)
    config_path = tokenizer_dir / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["add_bos_token"] = False
        atomic_write_json(config_path, config)


def _rehash(dst: Path, key: str, record: dict[str, Any]) -> None:
    """A fresh manifest over the edited files, with `record` under `key`; conversions and provenance kept."""
    old = checkpoint.read_manifest(dst) or {}
    manifest = checkpoint.build_manifest(dst, old.get("provenance", {}), old.get("model", {}))
    manifest["conversions"] = old.get("conversions", [])
    manifest["verifications"] = []
    manifest[key] = record
    atomic_write_json(dst / checkpoint.MANIFEST_NAME, manifest)


def plant(src: Path, dst: Path, fault: Fault) -> Path:
    """A copy of checkpoint `src` at `dst` with `fault` planted; refuses a fault that hits nothing."""
    if fault.kind not in KINDS:
        raise CrosschipError(f"unknown fault kind {fault.kind!r}", f"use one of {', '.join(KINDS)}")
    if dst.exists():
        raise CrosschipError(f"{dst} already exists", "plant faults into a new directory")
    ckpt = checkpoint.open_checkpoint(src)
    shutil.copytree(ckpt.path, dst)
    hit: list[str] = []
    if fault.kind == "no-bos":
        strip_bos(dst)
        hit = ["tokenizer"]
    else:
        for name in ckpt.files:
            path = checkpoint.safe_member(dst, name, "weight map")
            tensors = safetensors.torch.load_file(str(path))
            found = _edit(tensors, fault)
            if found:
                safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
                hit.extend(found)
    if not hit:
        shutil.rmtree(dst)
        raise CrosschipError(f"fault {fault.name}: no module matches {fault.modules!r}", "check the module glob")
    _rehash(dst, "planted_fault", {**fault.to_dict(), "modules_hit": hit})
    return dst


# ---------------------------------------------------------------- correct alternatives


def _int8_mse_clip(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 with the clipping ratio (of amax) that minimizes the row's |error|^2.4 (llm-compressor's rule)."""
    # w: [out, in] float32
    amax = w.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    best_err = torch.full_like(amax, float("inf"))
    best_scale = amax / 127
    for ratio in _CLIP_RATIOS:
        scale = (ratio * amax / 127).to(scale_dtype).float()
        err = (torch.round(w / scale).clamp(-127, 127) * scale - w).abs().pow(_CLIP_NORM).sum(dim=1, keepdim=True)
        better = err < best_err
        best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
    q = torch.round(w / best_scale).clamp(-127, 127).to(torch.int8)
    return q, best_scale.to(scale_dtype)


def _fp8_pow2(w: torch.Tensor, scale_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 with each 128x128 block's scale rounded up to a power of two."""
    from crosschip.formats.quant import FP8_DTYPE, FP8_MAX, fp8_block_quantize

    _, scale = fp8_block_quantize(w)
    pow2 = torch.exp2(torch.ceil(torch.log2(scale)))
    expanded = pow2.repeat_interleave(_BLOCK, 0).repeat_interleave(_BLOCK, 1)[: w.shape[0], : w.shape[1]]
    q = (w / expanded).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    assert pow2.shape == scale_shape
    return q, pow2.float()


def alternative(converted: Path, ref: Path, dst: Path, method: str) -> Path:
    """A copy of `converted` whose quantized weights are re-quantized from `ref`'s float weights by `method`."""
    if method not in ALTERNATIVES:
        raise CrosschipError(f"unknown alternative {method!r}", f"use one of {', '.join(ALTERNATIVES)}")
    if dst.exists():
        raise CrosschipError(f"{dst} already exists", "write the alternative into a new directory")
    ref_state = checkpoint.read_state_dict(checkpoint.open_checkpoint(ref), torch.float32)
    ckpt = checkpoint.open_checkpoint(converted)
    shutil.copytree(ckpt.path, dst)
    hit: list[str] = []
    suffix = "weight_scale" if method == "int8-mse-clip" else "weight_scale_inv"
    for name in ckpt.files:
        path = checkpoint.safe_member(dst, name, "weight map")
        tensors = safetensors.torch.load_file(str(path))
        for key in [k for k in tensors if k.endswith("." + suffix)]:
            module = key.removesuffix("." + suffix)
            w = ref_state[f"{module}.weight"]
            if method == "int8-mse-clip":
                q, scale = _int8_mse_clip(w, tensors[key].dtype)
            else:
                q, scale = _fp8_pow2(w, tensors[key].shape)
            tensors[f"{module}.weight"], tensors[key] = q.contiguous(), scale.contiguous()
            hit.append(module)
        safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
    if not hit:
        shutil.rmtree(dst)
        raise CrosschipError(f"{converted} has no {suffix} tensors for {method}", "pick the matching method")
    _rehash(dst, "requantized", {"method": method, "modules": hit})
    return dst
