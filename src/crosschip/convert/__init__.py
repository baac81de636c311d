"""Convert: re-encode a checkpoint for the serving chip (fp32/bf16/fp16, FP8 block, INT8).

Pure, per-tensor building blocks; the streaming pipeline and CLI sit on top of them:
  - `quant`: numerics (FP8 128x128 blocks, INT8 per channel, FP16 range audit, error stats)
  - `policy`: which tensors a quantized format quantizes
  - `layouts`: names, dtypes and shapes on disk, config.json / description files, encode/decode

Typical use, one tensor at a time:
    plan = layouts.make_plan(fmt, layout, shapes, config)          # shapes from safetensors headers
    enc = layouts.encode(fmt, plan.layout, name, t, quantize=name in plan.quantized, dtype=dtype)
    new_config = layouts.convert_config(plan, config, dtype); files = layouts.extra_files(plan)
"""

from crosschip.formats.layouts import (
    FORMATS,
    LAYOUTS,
    QUANT_DESCRIPTION_NAME,
    QUANTIZED_FORMATS,
    Encoded,
    Plan,
    convert_config,
    decode,
    detect_format,
    encode,
    extra_files,
    group_names,
    make_plan,
    resolve_dtype,
    resolve_layout,
)
from crosschip.formats.quant import RangeAudit, TensorError, check_fp16_audits, fp16_range_audit, tensor_error

__all__ = [
    "FORMATS",
    "LAYOUTS",
    "QUANTIZED_FORMATS",
    "QUANT_DESCRIPTION_NAME",
    "Encoded",
    "Plan",
    "RangeAudit",
    "TensorError",
    "check_fp16_audits",
    "convert_config",
    "decode",
    "detect_format",
    "encode",
    "extra_files",
    "fp16_range_audit",
    "group_names",
    "make_plan",
    "resolve_dtype",
    "resolve_layout",
    "tensor_error",
]
