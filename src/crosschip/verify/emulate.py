"""Emulate a target chip's numerics on the CPU, so parity can be estimated before owning the chip.

`--emulate PROFILE` runs the model in-process under the numerics of a target profile that software
can reproduce:

- its serving float dtype (fp16 on Ascend 310P, which has no bf16; bf16 on 910B/910C and NVIDIA);
- saturating overflow where the profile says so: after each decoder layer, its attention, its MLP,
  every Linear inside it and the final norm, +-inf becomes +-finfo(dtype).max and NaN becomes 0,
  as Ascend inference parts do in saturation mode;
- its weight and activation formats: weights come on the quantized grid from the checkpoint
  (crosschip.checkpoint.load_model dequantizes what `convert` wrote), and W8A8-dynamic activations
  are quantized per token to symmetric int8 before every Linear, as vllm-ascend W8A8_DYNAMIC does.

It does NOT reproduce the chip's kernels, fused operators, accumulation order or internal
accumulator widths, so an emulated result is an estimate and is labelled "emulated" everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from crosschip.errors import CrosschipError
from crosschip.targets import SERVING_FORMATS, list_targets, load_target

ACT_QUANT_INT8_DYNAMIC = "int8-dynamic"
_FLOAT_FORMATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Formats whose weights are stored quantized: the profile must be able to serve them.
_QUANTIZED_FORMATS = tuple(f for f in SERVING_FORMATS if f not in _FLOAT_FORMATS)
_INT8_MAX = 127.0


@dataclass(frozen=True)
class Emulation:
    """The numerics of one target profile that crosschip reproduces in software."""

    profile: str
    dtype: torch.dtype  # weights and activations
    saturate: bool  # overflow saturates to +-max and NaN -> 0 (Ascend saturation mode)
    act_quant: str | None  # "int8-dynamic" for w8a8: per-token symmetric int8 before each Linear

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description for reports and certificates."""
        names = {v: k for k, v in _FLOAT_FORMATS.items()}
        return {
            "profile": self.profile,
            "dtype": names.get(self.dtype, str(self.dtype)),
            "saturate": self.saturate,
            "act_quant": self.act_quant,
            "emulated": True,
        }


@dataclass
class EmulationHandle:
    """Hooks that apply_emulation installed; remove() takes them off (the dtype cast stays)."""

    emulation: Emulation
    handles: list[RemovableHandle] = field(default_factory=list)
    clamped_values: int = 0  # weight / buffer elements beyond the dtype's range, saturated by the cast

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def serving_float_dtype(profile_name: str) -> torch.dtype:
    """The float dtype a profile serves in: its default serving format when that is a float, else the
    widest-range 16-bit float it runs (bf16, then fp16), else fp32."""
    profile = load_target(profile_name)
    if profile.default_serving_format in _FLOAT_FORMATS:
        return _FLOAT_FORMATS[profile.default_serving_format]
    for name in ("bf16", "fp16", "fp32"):
        if profile.supports(name):
            return _FLOAT_FORMATS[name]
    raise CrosschipError(
        f"target {profile_name!r} runs no float dtype (matmul_dtypes: {', '.join(profile.matmul_dtypes)})",
        "emulate a target that lists fp32, bf16 or fp16 in matmul_dtypes",
    )


def emulation_for(profile_name: str, weight_format: str | None) -> Emulation:
    """The emulation of `profile_name` serving a checkpoint stored in `weight_format` (None: a float one)."""
    if profile_name not in list_targets():
        raise CrosschipError(
            f"unknown target {profile_name!r} for --emulate", f"use one of: {', '.join(list_targets())}"
        )
    profile = load_target(profile_name)
    if weight_format is not None:
        if weight_format not in SERVING_FORMATS:
            raise CrosschipError(
                f"unknown weight format {weight_format!r}", f"use one of: {', '.join(SERVING_FORMATS)}"
            )
        # A float checkpoint is cast to the profile's dtype (what a user would do); a quantized one
        # must be a format the chip can actually run, or there is nothing faithful to emulate.
        if weight_format in _QUANTIZED_FORMATS and not profile.can_serve(weight_format):
            raise CrosschipError(
                f"target {profile_name} cannot serve {weight_format} weights",
                f"convert the checkpoint to a format {profile_name} serves (its default is "
                f"{profile.default_serving_format}) or emulate another target",
            )
    act_quant = ACT_QUANT_INT8_DYNAMIC if weight_format == "int8-w8a8-dynamic" else None
    return Emulation(
        profile=profile_name,
        dtype=serving_float_dtype(profile_name),
        saturate=profile.overflow_mode == "saturation",
        act_quant=act_quant,
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """model.model.layers of a Hugging Face decoder (Llama, DeepseekV3, ...)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise CrosschipError(
            f"{type(model).__name__} has no model.layers decoder stack",
            "use a Hugging Face causal LM with decoder layers at model.model.layers (Llama, DeepseekV3)",
        )
    return layers


def saturate_(x: torch.Tensor) -> torch.Tensor:
    """+-inf -> +-finfo(dtype).max, NaN -> 0: what a saturating chip returns instead of IEEE specials."""
    if not x.is_floating_point():
        return x
    big = torch.finfo(x.dtype).max
    return torch.nan_to_num(x, nan=0.0, posinf=big, neginf=-big)


def _saturate_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    # HF attention returns (output, weights); the decoder layer and MLP return a tensor.
    if isinstance(output, torch.Tensor):
        return saturate_(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (saturate_(output[0]), *output[1:])
    return None


def fake_quant_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize x to symmetric int8 per row of the last dim (scale = amax / 127).

    This is dynamic per-token activation quantization as vllm-ascend W8A8_DYNAMIC runs it
    (torch_npu.npu_dynamic_quant); computed in fp32 and returned in x's dtype.
    """
    # x: [..., K]; scale: [..., 1]
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / _INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.clamp(torch.round(xf / safe), -_INT8_MAX - 1, _INT8_MAX)
    return (q * safe).to(x.dtype)


def _act_quant_pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    return (fake_quant_int8_per_token(args[0]), *args[1:])


def _saturation_targets(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """Modules whose outputs saturate: each decoder layer, its attention, MLP and Linears; the final norm."""
    targets: list[nn.Module] = []
    for layer in layers:
        targets.extend(m for m in (getattr(layer, "self_attn", None), getattr(layer, "mlp", None)) if m is not None)
        targets.extend(m for m in layer.modules() if isinstance(m, nn.Linear))
        targets.append(layer)
    norm = getattr(getattr(model, "model", None), "norm", None)
    if isinstance(norm, nn.Module):
        targets.append(norm)
    return targets


def _clamp_to_range_(model: nn.Module, dtype: torch.dtype) -> int:
    """Saturate parameters and buffers that a cast to `dtype` would turn into +-inf; returns how many.

    A saturating chip never holds inf weights: they were clamped when converted (crosschip convert's
    fp16 range audit does the same), so emulation clamps too instead of propagating inf.
    """
    big = torch.finfo(dtype).max
    clamped = 0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point() and torch.finfo(tensor.dtype).max > big:
                over = tensor.abs() > big
                if bool(over.any()):
                    clamped += int(over.sum())
                    tensor.clamp_(-big, big)
    return clamped


def apply_emulation(model: nn.Module, emu: Emulation) -> EmulationHandle:
    """Cast `model` to emu.dtype in place and hook in saturation / activation quantization.

    Saturation hooks go on module outputs (a chip saturates every op; module boundaries are the
    points software can reach without rewriting the model). Activation quantization covers every
    nn.Linear inside the decoder layers; fused MoE expert weights (3-D parameters) are not Linears
    and keep unquantized activations.
    """
    layers = decoder_layers(model)
    if emu.act_quant not in (None, ACT_QUANT_INT8_DYNAMIC):
        raise CrosschipError(f"unknown activation quantization {emu.act_quant!r}", "use 'int8-dynamic' or None")
    handle = EmulationHandle(emulation=emu)
    if emu.saturate:
        handle.clamped_values = _clamp_to_range_(model, emu.dtype)
    model.to(emu.dtype)
    if emu.act_quant is not None:
        handle.handles.extend(_hook_act_quant(layers))
    if emu.saturate:
        for module in _saturation_targets(model, layers):
            handle.handles.append(module.register_forward_hook(_saturate_hook))
    return handle


def _hook_act_quant(layers: nn.ModuleList) -> list[RemovableHandle]:
    return [
        module.register_forward_pre_hook(_act_quant_pre_hook)
        for layer in layers
        for module in layer.modules()
        if isinstance(module, nn.Linear)
    ]


def format_numerics(model: nn.Module, weight_format: str) -> list[RemovableHandle]:
    """Hooks that make an in-process model compute what its stored format means on a serving engine.

    int8-w8a8-dynamic: activations are quantized per token to int8 before every decoder Linear (vLLM's
    CompressedTensorsW8A8Int8 with dynamic input scales, vllm-ascend's W8A8_DYNAMIC), so crosschip's own load
    of such a checkpoint is comparable with what an engine serves. Other formats need none (their weights
    are already on the stored grid after dequantization).
    """
    if weight_format != "int8-w8a8-dynamic":
        return []
    return _hook_act_quant(decoder_layers(model))
