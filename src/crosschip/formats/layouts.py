"""On-disk layouts of each Convert format: tensor names, dtypes, shapes, config and description files.

One source tensor in, its output tensors out (`encode`), and back (`decode`), so a streaming
pipeline can convert shard by shard and a loader can run any format on CPU. Layouts and sources:

  fp32 / bf16 / fp16 -- "hf": plain Hugging Face tensors, same names.
  fp8-block -- "deepseek-v3": float8_e4m3fn `x.weight` + fp32 `x.weight_scale_inv`
      [ceil(out/128), ceil(in/128)]; config `quantization_config` as in DeepSeek-V3
      `README_WEIGHTS.md` (https://github.com/deepseek-ai/DeepSeek-V3). transformers
      (FineGrainedFP8, `integrations/finegrained_fp8.py`: `weight_scale_inv`, `weight_block_size`)
      and vLLM's Fp8Config read the same files.
  int8-w8a8-dynamic -- "compressed-tensors": int8 `x.weight` [out, in] + fp32 `x.weight_scale`
      [out, 1], no zero point (symmetric), format "int-quantized". vLLM
      `compressed_tensors/schemes/compressed_tensors_w8a8_int8.py` (CompressedTensorsW8A8Int8)
      creates exactly weight int8 [out, in] and a float32 ChannelQuantScaleParameter [out, 1];
      compressed-tensors `compressors/naive_quantized/base.py` writes weight + weight_scale and
      drops the zero point when `symmetric`.
  int8-w8a8-dynamic -- "ascend": int8 `x.weight` [out, in] + `x.weight_scale` and
      `x.weight_offset` [out, 1] in the model dtype (zeros: symmetric), plus
      `quant_model_description.json` mapping every tensor to "W8A8_DYNAMIC" or "FLOAT".
      vllm-ascend `quantization/w8a8_dynamic.py` AscendW8A8DynamicLinearMethod.get_weight /
      get_perchannel_param (`dtype=params_dtype`); MoE experts keep their HF names
      (`experts.N.gate_proj.weight`; `w13_`/`w2_` are vLLM-internal, see
      AscendW8A8DynamicFusedMoEMethod); `quant_config.py` / `modelslim_config.py` look up
      `quant_description[prefix + ".weight"]` for every Linear, embedding and expert shard.
  int8-w8a16 -- "compressed-tensors": `x.weight_packed` int32 [out, ceil(in/4)] (4 codes per
      int32), `x.weight_scale` [out, 1] in the model dtype, `x.weight_shape` int64 [2]; format
      "pack-quantized". vLLM only serves int8 weight-only through CompressedTensorsWNA16, which
      `_get_scheme_from_parts` selects for `format == "pack-quantized"` (WNA16_SUPPORTED_BITS
      [4, 8]) and whose create_weights registers weight_packed int32, weight_shape int64 [2] and
      weight_scale [out, in/group] with `dtype=params_dtype`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from crosschip.errors import CrosschipError
from crosschip.formats import policy
from crosschip.formats.quant import (
    FP8_BLOCK,
    FP8_DTYPE,
    RangeAudit,
    TensorError,
    cast_fp16,
    fp8_block_dequantize,
    fp8_block_quantize,
    fp8_scale_shape,
    fp16_range_audit,
    int8_channel_dequantize,
    int8_channel_quantize,
    pack_int8_to_int32,
    tensor_error,
    unpack_int32_to_int8,
)

FORMATS = ("fp32", "bf16", "fp16", "fp8-block", "int8-w8a16", "int8-w8a8-dynamic")
# First entry is the default --layout of each format.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "fp32": ("hf",),
    "bf16": ("hf",),
    "fp16": ("hf",),
    "fp8-block": ("deepseek-v3",),
    "int8-w8a16": ("compressed-tensors",),
    "int8-w8a8-dynamic": ("compressed-tensors", "ascend"),
}
QUANTIZED_FORMATS = frozenset({"fp8-block", "int8-w8a16", "int8-w8a8-dynamic"})
_FIXED_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANT_DESCRIPTION_NAME = "quant_model_description.json"
ASCEND_QUANT_TYPE = "W8A8_DYNAMIC"
ASCEND_FLOAT = "FLOAT"
# Suffixes of tensors that belong to a quantized `<module>.weight` (module-level companions).
_MODULE_COMPANIONS = (
    "weight_scale",
    "weight_offset",
    "weight_packed",
    "weight_shape",
    "weight_zero_point",
    "weight_g_idx",
)
_FP8_SCALE_SUFFIX = "_scale_inv"


def resolve_layout(fmt: str, layout: str | None = None) -> str:
    """The layout to write `fmt` in: the given one if the format supports it, else its default."""
    if fmt not in LAYOUTS:
        raise CrosschipError(f"unknown format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    supported = LAYOUTS[fmt]
    if layout is None:
        return supported[0]
    if layout not in supported:
        raise CrosschipError(
            f"format {fmt} has no layout {layout!r}", f"use --layout {' or '.join(supported)} (or omit it)"
        )
    return layout


def stored_specs(plan: Plan, name: str, shape: tuple[int, ...],
                 dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of each tensor convert stores for one floating-point logical tensor.

    Known from the plan alone, before any data is read: the pipeline pre-plans its output shards
    with it, and `crosschip check` sizes a checkpoint in a format it has not been converted to.
    """
    names = plan.outputs(name)
    if name not in plan.quantized:
        return [(names[0], torch.float32 if policy.keep_fp32(name) else dtype, shape)]
    rows, cols = shape
    if plan.fmt == "fp8-block":
        return [(names[0], FP8_DTYPE, shape), (names[1], torch.float32, fp8_scale_shape(shape))]
    if plan.fmt == "int8-w8a16":
        return [(names[0], torch.int32, (rows, math.ceil(cols / 4))), (names[1], dtype, (rows, 1)),
                (names[2], torch.int64, (2,))]
    if plan.layout == "ascend":
        return [(names[0], torch.int8, shape), (names[1], dtype, (rows, 1)), (names[2], dtype, (rows, 1))]
    return [(names[0], torch.int8, shape), (names[1], torch.float32, (rows, 1))]


def resolve_dtype(fmt: str, dtype: torch.dtype | None = None) -> torch.dtype:
    """Dtype of the high-precision tensors: fixed for fp32/bf16/fp16, `dtype` or bf16 otherwise."""
    resolve_layout(fmt)
    fixed = _FIXED_DTYPES.get(fmt)
    if fixed is not None:
        if dtype is not None and dtype != fixed:
            raise CrosschipError(f"format {fmt} stores {fixed}, not {dtype}")
        return fixed
    chosen = dtype or torch.bfloat16
    if chosen not in _FIXED_DTYPES.values():
        raise CrosschipError(f"unsupported high-precision dtype {chosen}", "use float32, bfloat16 or float16")
    return chosen


def output_names(fmt: str, layout: str, name: str, quantized: bool) -> tuple[str, ...]:
    """Names of the output tensors a source tensor becomes (the first one carries the weight)."""
    if not quantized:
        return (name,)
    module = _weight_module(name)
    if fmt == "fp8-block":
        return (name, name + _FP8_SCALE_SUFFIX)
    if fmt == "int8-w8a16":
        return (f"{module}.weight_packed", f"{module}.weight_scale", f"{module}.weight_shape")
    if layout == "ascend":
        return (name, f"{module}.weight_scale", f"{module}.weight_offset")
    return (name, f"{module}.weight_scale")


def source_name(output_name: str) -> str:
    """The source tensor an output tensor belongs to (`x.weight_scale` -> `x.weight`)."""
    if output_name.endswith(".weight" + _FP8_SCALE_SUFFIX):
        return output_name.removesuffix(_FP8_SCALE_SUFFIX)
    module, _, leaf = output_name.rpartition(".")
    if module and leaf in _MODULE_COMPANIONS:
        return f"{module}.weight"
    return output_name


def group_names(names: Sequence[str]) -> dict[str, list[str]]:
    """Output names grouped by source tensor, in first-seen order (what `decode` takes)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(source_name(name), []).append(name)
    return groups


def _weight_module(name: str) -> str:
    if not name.endswith(".weight"):
        raise CrosschipError(f"{name}: only `.weight` tensors can be quantized")
    return name.removesuffix(".weight")


@dataclass(frozen=True)
class Plan:
    """Which source tensors one conversion quantizes (decided before any tensor is read)."""

    fmt: str
    layout: str
    shapes: Mapping[str, tuple[int, ...]]
    quantized: frozenset[str]

    def outputs(self, name: str) -> tuple[str, ...]:
        return output_names(self.fmt, self.layout, name, name in self.quantized)

    def all_outputs(self) -> list[str]:
        """Every output tensor name, in source order."""
        return [out for name in self.shapes for out in self.outputs(name)]

    def ignore(self) -> list[str]:
        """Linear-like modules kept in high precision (compressed-tensors `ignore`)."""
        return [
            policy.module_name(name)
            for name, shape in self.shapes.items()
            if policy.is_linear_weight(name, shape) and name not in self.quantized
        ]


def make_plan(fmt: str, layout: str | None, shapes: Mapping[str, Sequence[int]], config: Mapping[str, Any]) -> Plan:
    """Apply the quantization policy to every source tensor (name -> shape, e.g. from headers)."""
    layout = resolve_layout(fmt, layout)
    shapes = {name: tuple(int(s) for s in shape) for name, shape in shapes.items()}
    quantized: frozenset[str] = frozenset()
    if fmt in QUANTIZED_FORMATS:
        keep_float = ("kv_b_proj",) if layout == "ascend" else ()
        quantized = frozenset(
            name
            for name, shape in shapes.items()
            if policy.quantizable(name, shape, config, include_mtp=fmt == "fp8-block", keep_float=keep_float)
        )
    return Plan(fmt, layout, shapes, quantized)


def fp8_quantization_config() -> dict[str, Any]:
    """DeepSeek-V3 `config.json` quantization_config (README_WEIGHTS.md, "FP8 Configuration")."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(FP8_BLOCK)}


def _int8_args(strategy: str, dynamic: bool) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs as serialized by `model_dump()`.

    Only fields every released version accepts (QuantizationArgs is `extra="forbid"`): newer
    `scale_dtype` / `zp_dtype` are left to their defaults. Dynamic args carry no observer.
    """
    return {
        "actorder": None,
        "block_structure": None,
        "dynamic": dynamic,
        "group_size": None,
        "num_bits": 8,
        "observer": None if dynamic else "minmax",
        "observer_kwargs": {},
        "strategy": strategy,
        "symmetric": True,
        "type": "int",
    }


def compressed_tensors_config(fmt: str, ignore: Sequence[str]) -> dict[str, Any]:
    """`quantization_config` for compressed-tensors INT8 (QuantizationConfig / QuantizationScheme).

    W8A8 = preset INT8_W8A8 (weights channel/static, inputs token/dynamic, both symmetric) in
    "int-quantized"; W8A16 = int8 channel weights, no input_activations, "pack-quantized".
    `quantization_status` "compressed" tells loaders the tensors on disk are already quantized.
    """
    if fmt == "int8-w8a8-dynamic":
        inputs, storage = _int8_args("token", dynamic=True), "int-quantized"
    elif fmt == "int8-w8a16":
        inputs, storage = None, "pack-quantized"
    else:
        raise CrosschipError(f"format {fmt} has no compressed-tensors layout")
    scheme = {
        "input_activations": inputs,
        "output_activations": None,
        "targets": ["Linear"],
        "weights": _int8_args("channel", dynamic=False),
    }
    return {
        "config_groups": {"group_0": scheme},
        "format": storage,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def ascend_description(plan: Plan) -> dict[str, Any]:
    """`quant_model_description.json`: metadata + every output tensor -> W8A8_DYNAMIC | FLOAT.

    Keys as msModelSlim writes them (version, model_quant_type, group_size 0 for per-channel); the
    bias of a quantized module is marked with its module's type, as msModelSlim does.
    """
    if plan.layout != "ascend":
        raise CrosschipError(f"layout {plan.layout} has no quant_model_description.json")
    quantized_modules = {policy.module_name(n) for n in plan.quantized}
    kinds: dict[str, Any] = {"version": "1.0.0", "model_quant_type": ASCEND_QUANT_TYPE, "group_size": 0}
    for name in plan.shapes:
        quantized = name in plan.quantized or (name.endswith(".bias") and policy.module_name(name) in quantized_modules)
        for out in plan.outputs(name):
            kinds[out] = ASCEND_QUANT_TYPE if quantized else ASCEND_FLOAT
    return kinds


def quantization_config(plan: Plan) -> dict[str, Any] | None:
    """The config.json `quantization_config` of a plan (None: the key must be absent)."""
    if plan.fmt == "fp8-block":
        return fp8_quantization_config()
    if plan.layout == "compressed-tensors":
        return compressed_tensors_config(plan.fmt, plan.ignore())
    # ascend: vllm-ascend reads quant_model_description.json (`--quantization ascend`), and a
    # quantization_config with a quant_method would make vLLM pick another method.
    return None


def convert_config(plan: Plan, config: Mapping[str, Any], dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The output config.json: dtype set, quantization_config written or removed."""
    out = copy.deepcopy(dict(config))
    dtype_name = str(resolve_dtype(plan.fmt, dtype)).removeprefix("torch.")
    out["dtype"] = dtype_name
    if "torch_dtype" in out:
        out["torch_dtype"] = dtype_name
    qc = quantization_config(plan)
    if qc is None:
        out.pop("quantization_config", None)
    else:
        out["quantization_config"] = qc
    return out


def extra_files(plan: Plan) -> dict[str, dict[str, Any]]:
    """JSON files besides config.json that the layout needs (file name -> content)."""
    return {QUANT_DESCRIPTION_NAME: ascend_description(plan)} if plan.layout == "ascend" else {}


def detect_format(config: Mapping[str, Any], description: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(format, layout) of an existing checkpoint from its config.json and ascend description."""
    if description is not None:
        kind = description.get("model_quant_type")
        if kind != ASCEND_QUANT_TYPE:
            raise CrosschipError(f"unsupported Ascend quantization {kind!r}", f"only {ASCEND_QUANT_TYPE} is supported")
        return "int8-w8a8-dynamic", "ascend"
    qc = config.get("quantization_config")
    if qc:
        method, storage = qc.get("quant_method"), qc.get("format")
        if method == "fp8" and list(qc.get("weight_block_size") or []) == list(FP8_BLOCK):
            return "fp8-block", "deepseek-v3"
        if method == "compressed-tensors" and storage in ("int-quantized", "pack-quantized"):
            return ("int8-w8a8-dynamic" if storage == "int-quantized" else "int8-w8a16"), "compressed-tensors"
        raise CrosschipError(
            f"unsupported quantization_config (quant_method={method!r}, format={storage!r})",
            "crosschip reads fp8 128x128 block and compressed-tensors int8 checkpoints",
        )
    names = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    return names.get(str(config.get("dtype") or config.get("torch_dtype")), "fp32"), "hf"


@dataclass(frozen=True)
class Encoded:
    """One source tensor in the target format.

    tensors: output name -> tensor; error: reconstruction error of the float32 decode against the
    source (None for non-float tensors or when not measured); audit: the fp16 range audit of the
    source when it was cast to float16 (clamped: saturated instead of refused).
    """

    tensors: dict[str, torch.Tensor]
    quantized: bool
    error: TensorError | None
    audit: RangeAudit | None
    clamped: bool = False


def _encode_plain(
    name: str, t: torch.Tensor, dtype: torch.dtype, clamp: bool
) -> tuple[torch.Tensor, RangeAudit | None]:
    if not t.is_floating_point():
        return t, None
    if policy.keep_fp32(name):
        return t.detach().to(torch.float32), None
    if dtype == torch.float16:
        audit = fp16_range_audit(name, t)
        return cast_fp16(t, clamp=clamp, name=name), audit
    return t.detach().to(dtype), None


def _encode_quantized(fmt: str, layout: str, name: str, t: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    names = output_names(fmt, layout, name, quantized=True)
    if fmt == "fp8-block":
        return dict(zip(names, fp8_block_quantize(t, name=name), strict=True))
    if fmt == "int8-w8a16":
        q, scale = int8_channel_quantize(t, scale_dtype=dtype, name=name)
        shape = torch.tensor(list(q.shape), dtype=torch.int64)
        return dict(zip(names, (pack_int8_to_int32(q), scale, shape), strict=True))
    if layout == "ascend":
        q, scale = int8_channel_quantize(t, scale_dtype=dtype, name=name)
        return dict(zip(names, (q, scale, torch.zeros_like(scale)), strict=True))
    # vLLM's CompressedTensorsW8A8Int8 keeps weight_scale in float32: store it losslessly.
    return dict(zip(names, int8_channel_quantize(t, scale_dtype=torch.float32, name=name), strict=True))


def encode(
    fmt: str,
    layout: str | None,
    name: str,
    tensor: torch.Tensor,
    *,
    quantize: bool,
    dtype: torch.dtype | None = None,
    clamp: bool = False,
    measure: bool = True,
) -> Encoded:
    """Convert one high-precision source tensor (decode quantized sources first).

    `quantize` comes from the Plan; `dtype` is the high-precision dtype of quantized formats
    (default bf16; also the dtype of ascend / W8A16 scales). Float16 casts are audited and refused
    on overflow unless `clamp`.
    """
    layout = resolve_layout(fmt, layout)
    target = resolve_dtype(fmt, dtype)
    audit = None
    if quantize:
        if fmt not in QUANTIZED_FORMATS:
            raise CrosschipError(f"format {fmt} does not quantize ({name})")
        tensors = _encode_quantized(fmt, layout, name, tensor, target)
    else:
        converted, audit = _encode_plain(name, tensor, target, clamp)
        tensors = {name: converted}
    error = None
    if measure and tensor.is_floating_point():
        error = tensor_error(tensor, decode(fmt, layout, name, tensors, torch.float32))
    clamped = audit is not None and not audit.ok
    return Encoded(tensors, quantize, error, audit, clamped)


def _require(tensors: Mapping[str, torch.Tensor], names: tuple[str, ...], fmt: str) -> list[torch.Tensor]:
    missing = [n for n in names if n not in tensors]
    extra = sorted(set(tensors) - set(names))
    if missing:
        raise CrosschipError(
            f"{fmt} tensor {names[0]} is missing {', '.join(missing)}",
            "the checkpoint is incomplete or not in this layout; re-export it",
        )
    if extra:
        raise CrosschipError(
            f"{fmt} tensor {names[0]} has unexpected companions {', '.join(extra)}",
            "asymmetric or grouped INT8 and other schemes are not supported",
        )
    return [tensors[n] for n in names]


def _decode_plain(fmt: str, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype in (FP8_DTYPE, torch.int8) and fmt in QUANTIZED_FORMATS:
        companion = "_scale_inv" if t.dtype == FP8_DTYPE else "_scale"
        raise CrosschipError(
            f"{name} is {t.dtype} but has no {companion} tensor", "the checkpoint is incomplete; re-export it"
        )
    return t.to(dtype) if t.is_floating_point() else t


def decode(
    fmt: str, layout: str | None, name: str, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Rebuild the high-precision tensor `name` from its output tensors (see `group_names`)."""
    layout = resolve_layout(fmt, layout)
    if set(tensors) == {name}:
        return _decode_plain(fmt, name, tensors[name], dtype)
    if fmt not in QUANTIZED_FORMATS:
        raise CrosschipError(f"{name}: unexpected tensors {sorted(set(tensors) - {name})} in a {fmt} checkpoint")
    names = output_names(fmt, layout, name, quantized=True)
    parts = _require(tensors, names, fmt)
    if fmt == "fp8-block":
        return fp8_block_dequantize(parts[0], parts[1], dtype=dtype, name=name)
    if fmt == "int8-w8a16":
        packed, scale, shape = parts
        if shape.numel() != 2:
            raise CrosschipError(f"{name}: weight_shape must hold 2 values, got {list(shape.shape)}")
        q = unpack_int32_to_int8(packed, tuple(int(s) for s in shape.tolist()), name=name)
        return int8_channel_dequantize(q, scale, dtype=dtype, name=name)
    if layout == "ascend" and bool((parts[2] != 0).any()):
        raise CrosschipError(
            f"{name}: weight_offset is not zero (asymmetric weights)",
            "only symmetric W8A8_DYNAMIC weights are supported",
        )
    return int8_channel_dequantize(parts[0], parts[1], dtype=dtype, name=name)
