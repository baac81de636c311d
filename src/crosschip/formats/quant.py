"""Numerics of every Convert format, one tensor at a time: FP8 block, INT8 per channel, FP16 range.

Pure functions on CPU tensors; nothing here knows file names or layouts (see `layouts.py`).

Sources the formats follow (cited where each piece is implemented):
  - DeepSeek-V3 FP8: https://github.com/deepseek-ai/DeepSeek-V3 `README_WEIGHTS.md` ("FP8 Weight
    Documentation"), `inference/kernel.py` (`weight_dequant`, `act_quant`: scale = amax / 448),
    `inference/fp8_cast_bf16.py` (weight x `<name>_scale_inv`, one scale per 128x128 tile).
  - INT8 packing: https://github.com/vllm-project/compressed-tensors
    `src/compressed_tensors/compressors/quantized_compressors/pack_quantized.py` (`pack_to_int32`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crosschip.errors import CrosschipError

# --- FP8 (float8_e4m3fn) -------------------------------------------------------------------------
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value; DeepSeek's kernels divide amax by exactly this
FP8_BLOCK = (128, 128)  # README_WEIGHTS.md: "Weight block size: 128x128"
# Rounding error of e4m3fn (3 mantissa bits, round to nearest even), in units of the scaled value
# y = x / scale: half a spacing is <= 2^-4 |y| for normals (|y| >= 2^-6) and 2^-10 for subnormals
# (spacing 2^-9). So |x - dequant(quant(x))| <= 2^-4 |x| + 2^-10 * scale, per element.
FP8_REL_ERR = 2.0**-4
FP8_SUBNORMAL_ABS_ERR = 2.0**-10

# --- INT8 ---------------------------------------------------------------------------------------
# Symmetric range [-127, 127], not [-128, 127]: the grid is symmetric about 0 (negating a weight
# negates its code exactly), amax maps to +-127 with no one-sided spare code, and any int8 value is
# accepted by both loaders (vLLM CompressedTensorsW8A8Int8, vllm-ascend W8A8_DYNAMIC), so using
# one code less costs < 0.4% of resolution and nothing in compatibility.
INT8_QMAX = 127

# --- FP16 ---------------------------------------------------------------------------------------
FP16_MAX = 65504.0  # largest finite float16
FP16_MIN_NORMAL = 2.0**-14
FP16_MIN_SUBNORMAL = 2.0**-24
_AUDIT_CHUNK = 1 << 22  # elements per audit step: bounds the temporary copies for huge tensors


def _float_matrix(w: torch.Tensor, name: str) -> torch.Tensor:
    """`w` as a finite float32 2-D tensor, or a CrosschipError that names the tensor."""
    if w.dim() != 2:
        raise CrosschipError(
            f"{name}: only 2-D weights can be quantized, got shape {list(w.shape)}",
            "quantize Linear weights only; keep other tensors in high precision",
        )
    if not w.is_floating_point():
        raise CrosschipError(f"{name}: expected a floating-point weight, got {w.dtype}")
    x = w.detach().to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise CrosschipError(
            f"{name}: contains inf or NaN, which no quantized format can represent",
            "fix or re-export the source checkpoint (crosschip check lists non-finite tensors)",
        )
    return x


def fp8_scale_shape(shape: tuple[int, ...] | torch.Size, block: tuple[int, int] = FP8_BLOCK) -> tuple[int, int]:
    """Shape of `<weight>_scale_inv` for a weight: [ceil(out/128), ceil(in/128)]."""
    rows, cols = shape
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def _blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Zero-pad a 2-D tensor to whole blocks and view it as [row_blocks, br, col_blocks, bc].

    README_WEIGHTS.md: "If the weight block is not aligned to 128, it is zero-padded to 128 before
    calculating the scale. After quantization, the padded portion is removed."
    """
    rows, cols = x.shape
    pad_rows, pad_cols = -rows % block[0], -cols % block[1]
    if pad_rows or pad_cols:
        x = F.pad(x, (0, pad_cols, 0, pad_rows))
    return x.reshape(x.shape[0] // block[0], block[0], x.shape[1] // block[1], block[1])


def _unblock(blocks: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    row_blocks, br, col_blocks, bc = blocks.shape
    return blocks.reshape(row_blocks * br, col_blocks * bc)[: shape[0], : shape[1]]


def fp8_block_quantize(
    w: torch.Tensor, block: tuple[int, int] = FP8_BLOCK, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight to DeepSeek-V3 block FP8: (float8_e4m3fn weight, fp32 scale_inv).

    scale_inv[i, j] = amax(block i,j) / 448, the same rule as `act_quant`/`weight_quant` in
    DeepSeek-V3 `inference/kernel.py`; dequantization is `w_fp8.float() * scale_inv` per block
    (`weight_dequant`). An all-zero block gets scale 1 (its codes are 0, so any scale is exact; 1
    avoids the 0/0 the reference kernel would produce). Values are clamped to +-448 before the
    cast so rounding of amax/scale can never leave the finite e4m3fn range.
    """
    x = _float_matrix(w, name)
    blocks = _blocks(x, block)
    amax = blocks.abs().amax(dim=(1, 3))
    tiny = torch.finfo(torch.float32).tiny
    scale = torch.where(amax > 0, (amax / FP8_MAX).clamp(min=tiny), torch.ones_like(amax))
    scaled = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = _unblock(scaled, x.shape).to(FP8_DTYPE).contiguous()
    return q, scale.contiguous()


def check_fp8_pair(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str) -> None:
    if w_fp8.dtype != FP8_DTYPE:
        raise CrosschipError(f"{name}: expected a float8_e4m3fn weight, got {w_fp8.dtype}")
    if w_fp8.dim() != 2:
        raise CrosschipError(f"{name}: an FP8 block weight must be 2-D, got shape {list(w_fp8.shape)}")
    expected = fp8_scale_shape(w_fp8.shape, block)
    if tuple(scale_inv.shape) != expected:
        raise CrosschipError(
            f"{name}_scale_inv has shape {list(scale_inv.shape)}, but a {list(w_fp8.shape)} weight with "
            f"{block[0]}x{block[1]} blocks needs {list(expected)}",
            "the weight and its scale_inv do not belong together; re-export the FP8 checkpoint",
        )
    if not scale_inv.is_floating_point() or not bool(torch.isfinite(scale_inv.float()).all()):
        raise CrosschipError(f"{name}_scale_inv must be finite floating-point values ({scale_inv.dtype})")


def fp8_block_dequantize(
    w_fp8: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = FP8_BLOCK,
    dtype: torch.dtype = torch.bfloat16,
    name: str = "weight",
) -> torch.Tensor:
    """Exact blockwise dequantization: (w_fp8.float() * scale_inv per block).to(dtype).

    The fp32 product is what DeepSeek-V3 `weight_dequant` computes before storing to the default
    dtype; edge blocks smaller than 128 use the same scale (the padding was removed at export).
    """
    check_fp8_pair(w_fp8, scale_inv, block, name)
    blocks = _blocks(w_fp8.to(torch.float32), block) * scale_inv.to(torch.float32)[:, None, :, None]
    return _unblock(blocks, w_fp8.shape).to(dtype)


def fp8_error_bound(ref: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = FP8_BLOCK) -> torch.Tensor:
    """Per-element bound on |ref - fp8_block_dequantize(*fp8_block_quantize(ref))| (fp32 result).

    2^-4 |x| + 2^-10 * scale of the element's block (see FP8_REL_ERR), plus 2^-20 |x| for the
    fp32 division and multiplication around the cast.
    """
    x = ref.detach().to(torch.float32).abs()
    expanded = _unblock(torch.ones_like(_blocks(x, block)) * scale_inv.float()[:, None, :, None], x.shape)
    return (FP8_REL_ERR + 2.0**-20) * x + FP8_SUBNORMAL_ABS_ERR * expanded


def int8_channel_quantize(
    w: torch.Tensor, scale_dtype: torch.dtype = torch.float32, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8: (int8 [out, in], scale [out, 1] in `scale_dtype`).

    scale = amax(row) / 127, rounded to `scale_dtype` first; the codes are computed with the
    rounded scale, so dequantization with the stored scale errs by at most scale / 2 per element
    (bf16 rounds the scale by <= 2^-8, which keeps amax / scale <= 127.5). Zero rows get scale 1.
    """
    x = _float_matrix(w, name)
    amax = x.abs().amax(dim=1, keepdim=True)
    tiny = torch.finfo(scale_dtype).tiny  # scales below this would flush to zero in fp16
    scale = torch.where(amax > 0, (amax / INT8_QMAX).clamp(min=tiny), torch.ones_like(amax)).to(scale_dtype)
    if not bool(torch.isfinite(scale).all()):
        raise CrosschipError(
            f"{name}: a row is too large for a {scale_dtype} scale (max |x| = {float(amax.max()):.3g})",
            "store scales in float32 or bfloat16",
        )
    q = torch.round(x / scale.to(torch.float32)).clamp(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def int8_channel_dequantize(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16, name: str = "weight"
) -> torch.Tensor:
    """q.float() * scale (one scale per output row), cast to `dtype`."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise CrosschipError(f"{name}: expected a 2-D int8 weight, got {q.dtype} {list(q.shape)}")
    if tuple(scale.shape) != (q.shape[0], 1):
        raise CrosschipError(
            f"{name}: weight_scale has shape {list(scale.shape)}, expected [{q.shape[0]}, 1] (one per output channel)",
            "only per-channel INT8 scales are supported",
        )
    if not scale.is_floating_point() or not bool(torch.isfinite(scale.float()).all()):
        raise CrosschipError(f"{name}: weight_scale must be finite floating-point values ({scale.dtype})")
    return (q.to(torch.float32) * scale.to(torch.float32)).to(dtype)


def pack_int8_to_int32(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes 4 per int32 along the input dim, as compressed-tensors `pack_to_int32(q, 8)`.

    Each code is shifted to unsigned (q + 128), the row is zero-padded to a multiple of 4, and
    code k of a group goes to bits 8k..8k+7 (first code in the low byte); the 32-bit pattern is
    stored as int32 (two's complement).
    """
    if q.dtype != torch.int8 or q.dim() != 2:
        raise CrosschipError(f"can only pack a 2-D int8 tensor, got {q.dtype} {list(q.shape)}")
    unsigned = q.to(torch.int64) + 128
    unsigned = F.pad(unsigned, (0, -q.shape[1] % 4))
    groups = unsigned.reshape(q.shape[0], -1, 4)
    shifts = torch.arange(4, dtype=torch.int64) * 8
    packed = (groups << shifts).sum(dim=-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int32_to_int8(
    packed: torch.Tensor, shape: tuple[int, int] | torch.Size, name: str = "weight"
) -> torch.Tensor:
    """Inverse of `pack_int8_to_int32` for an unpacked weight of `shape` (compressed-tensors `weight_shape`)."""
    rows, cols = (int(s) for s in shape)
    if packed.dtype != torch.int32 or tuple(packed.shape) != (rows, math.ceil(cols / 4)):
        raise CrosschipError(
            f"{name}: weight_packed is {packed.dtype} {list(packed.shape)}, expected int32 "
            f"[{rows}, {math.ceil(cols / 4)}] for weight_shape [{rows}, {cols}]"
        )
    bits = packed.to(torch.int64) & 0xFFFFFFFF
    codes = torch.stack([(bits >> (8 * k)) & 0xFF for k in range(4)], dim=-1).reshape(rows, -1)
    return (codes[:, :cols] - 128).to(torch.int8).contiguous()


@dataclass(frozen=True)
class RangeAudit:
    """What casting one tensor to float16 would do to its values.

    overflow: |x| > 65504 (incl. inf); underflow_to_zero: nonzero x whose fp16 value is 0
    (|x| <= 2^-25, round to nearest even); subnormal: nonzero fp16 value below 2^-14 (precision
    reduced); nan: NaN values (not a range problem, reported so they are not missed).
    """

    name: str
    numel: int
    overflow: int
    underflow_to_zero: int
    subnormal: int
    nan: int
    max_abs: float

    @property
    def ok(self) -> bool:
        """Castable without clamping: nothing overflows."""
        return self.overflow == 0


def fp16_range_audit(name: str, t: torch.Tensor) -> RangeAudit:
    """Count fp16 overflow / underflow / subnormal values of `t` (non-float tensors audit clean)."""
    if not t.is_floating_point():
        return RangeAudit(name, t.numel(), 0, 0, 0, 0, 0.0)
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    counts = [0, 0, 0, 0]
    max_abs = 0.0
    for chunk in t.detach().reshape(-1).split(_AUDIT_CHUNK):
        x = chunk.to(work)
        nan = torch.isnan(x)
        a = x.abs()
        h = x.to(torch.float16)
        nonzero = (x != 0) & ~nan
        counts[0] += int((a > FP16_MAX).sum())
        counts[1] += int((nonzero & (h == 0)).sum())
        counts[2] += int((nonzero & (h != 0) & (h.abs() < FP16_MIN_NORMAL)).sum())
        counts[3] += int(nan.sum())
        if bool((~nan).any()):
            max_abs = max(max_abs, float(a[~nan].max()))
    return RangeAudit(name, t.numel(), *counts, max_abs)


def check_fp16_audits(audits: Iterable[RangeAudit]) -> None:
    """Refuse (CrosschipError naming the tensors) if any audited tensor overflows float16."""
    bad = [a for a in audits if not a.ok]
    if not bad:
        return
    shown = ", ".join(f"{a.name} ({a.overflow} values, max |x| {a.max_abs:.4g})" for a in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise CrosschipError(
        f"{len(bad)} tensors exceed the float16 range (|x| > 65504): {shown}{more}",
        "pass --clamp to saturate them to +-65504 (recorded in crosschip.json), or convert to bf16",
    )


def cast_fp16(t: torch.Tensor, clamp: bool = False, name: str = "tensor") -> torch.Tensor:
    """Cast a float tensor to float16; with `clamp`, saturate to +-65504, else refuse on overflow."""
    if not t.is_floating_point():
        return t
    if clamp:
        return t.detach().to(torch.float32).clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    check_fp16_audits([fp16_range_audit(name, t)])
    return t.detach().to(torch.float16)


@dataclass(frozen=True)
class TensorError:
    """Reconstruction error of `approx` against `ref`.

    max_abs: max |approx - ref|; max_rel: max_abs / max |ref| (error relative to the tensor's
    largest magnitude, not per element: 0 when both are all zero, inf when only ref is);
    rmse: sqrt(mean((approx - ref)^2)); ref_max_abs: max |ref|.
    """

    max_abs: float
    max_rel: float
    rmse: float
    ref_max_abs: float


def tensor_error(ref: torch.Tensor, approx: torch.Tensor) -> TensorError:
    """Compare two same-shape tensors in float32 (sums in float64)."""
    if ref.shape != approx.shape:
        raise CrosschipError(f"cannot compare tensors of shapes {list(ref.shape)} and {list(approx.shape)}")
    if ref.numel() == 0:
        return TensorError(0.0, 0.0, 0.0, 0.0)
    r = ref.detach().to(torch.float32)
    diff = approx.detach().to(torch.float32) - r
    max_abs = float(diff.abs().max())
    ref_max = float(r.abs().max())
    # Relative to the tensor's largest magnitude; an all-zero reference is exact or infinitely off.
    max_rel = max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else math.inf)
    rmse = float(torch.linalg.vector_norm(diff, dtype=torch.float64)) / math.sqrt(diff.numel())
    return TensorError(max_abs, max_rel, rmse, ref_max)
