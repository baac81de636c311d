"""Numerics of the Convert formats: FP8 blocks, INT8 per channel, INT32 packing, FP16 range audit."""

from __future__ import annotations

import math

import pytest
import torch

from crosschip.errors import CrosschipError
from crosschip.formats import quant


def _weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Weights with a spread of magnitudes (including tiny ones that hit fp8 subnormals)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[::7] *= 30.0  # rows with outliers: blocks get different scales
    w[:, ::11] *= 1e-4  # small values far below each block's amax
    return w


def test_fp8_round_trip_with_ragged_blocks_stays_within_the_format_bound() -> None:
    w = _weights(300, 200)  # neither dim a multiple of 128: edge blocks are 44 rows / 72 columns
    q, scale_inv = quant.fp8_block_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (300, 200)
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (3, 2)
    back = quant.fp8_block_dequantize(q, scale_inv, dtype=torch.float32)
    err = (back - w).abs()
    bound = quant.fp8_error_bound(w, scale_inv)
    assert bool((err <= bound).all()), float((err / bound).max())
    # The bound is tight enough to mean something: relative error is a few percent at most.
    assert float(err.max()) <= 2**-4 * float(w.abs().max())


def test_fp8_scale_is_block_amax_over_448_with_zero_padding() -> None:
    # DeepSeek-V3 kernel.py: s = max(|x|) / 448 per block; README_WEIGHTS.md: edge blocks are
    # zero-padded before the scale is computed, so the padding never changes amax.
    w = _weights(130, 260, seed=1)
    q, scale_inv = quant.fp8_block_quantize(w)
    for bi in range(2):
        for bj in range(3):
            block = w[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128]
            assert float(scale_inv[bi, bj]) == pytest.approx(float(block.abs().max()) / 448.0, rel=1e-6)
            codes = q[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128].float()
            assert float(codes.abs().max()) == 448.0  # each block's largest value uses the top code


def test_fp8_dequantize_is_the_exact_blockwise_product() -> None:
    g = torch.Generator().manual_seed(2)
    codes = (torch.randn(130, 300, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(2, 3, generator=g) * 1e-3 + 1e-5
    expected = torch.empty(130, 300)
    for bi in range(2):
        for bj in range(3):
            rows, cols = slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128)
            expected[rows, cols] = codes[rows, cols].float() * scale_inv[bi, bj]
    assert torch.equal(quant.fp8_block_dequantize(codes, scale_inv, dtype=torch.float32), expected)
    assert torch.equal(quant.fp8_block_dequantize(codes, scale_inv), expected.to(torch.bfloat16))


def test_fp8_zero_blocks_get_a_finite_scale_and_come_back_as_zeros() -> None:
    w = _weights(256, 256, seed=3)
    w[:128, 128:] = 0.0
    q, scale_inv = quant.fp8_block_quantize(w)
    assert float(scale_inv[0, 1]) == 1.0 and bool(torch.isfinite(scale_inv).all())
    back = quant.fp8_block_dequantize(q, scale_inv, dtype=torch.float32)
    assert bool(torch.isfinite(back).all())
    assert torch.equal(back[:128, 128:], torch.zeros(128, 128))
    zq, zs = quant.fp8_block_quantize(torch.zeros(5, 7))
    assert torch.equal(zs, torch.ones(1, 1))
    assert torch.equal(quant.fp8_block_dequantize(zq, zs, dtype=torch.float32), torch.zeros(5, 7))


def test_fp8_bad_inputs_are_crosschip_errors() -> None:
    q, scale_inv = quant.fp8_block_quantize(_weights(300, 200))
    with pytest.raises(CrosschipError, match=r"scale_inv has shape \[2, 2\].*needs \[3, 2\]"):
        quant.fp8_block_dequantize(q, scale_inv[:2], name="layer.weight")
    with pytest.raises(CrosschipError, match="float8_e4m3fn"):
        quant.fp8_block_dequantize(q.float(), scale_inv)
    with pytest.raises(CrosschipError, match="finite"):
        quant.fp8_block_dequantize(q, scale_inv.clone().fill_(math.inf))
    with pytest.raises(CrosschipError, match="2-D"):
        quant.fp8_block_quantize(torch.ones(10))
    with pytest.raises(CrosschipError, match="inf or NaN"):
        quant.fp8_block_quantize(torch.tensor([[1.0, math.nan]]), name="bad.weight")


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_round_trip_errs_by_at_most_half_a_step(scale_dtype: torch.dtype) -> None:
    w = _weights(96, 150, seed=4)
    w[5] = 0.0  # a dead output channel
    q, scale = quant.int8_channel_quantize(w, scale_dtype=scale_dtype)
    assert q.dtype == torch.int8 and q.shape == (96, 150)
    assert scale.dtype == scale_dtype and scale.shape == (96, 1)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    assert float(scale[5, 0]) == 1.0 and not bool(q[5].any())
    back = quant.int8_channel_dequantize(q, scale, dtype=torch.float32)
    half_step = scale.float() / 2
    assert bool(((back - w).abs() <= half_step * (1 + 1e-5)).all())
    # amax of every live row maps to +-127 (or one code lower when the scale was rounded up).
    live = w.abs().amax(dim=1) > 0
    assert bool((q.abs().amax(dim=1)[live] >= 126).all())


def test_int8_dequantize_checks_shapes() -> None:
    q, scale = quant.int8_channel_quantize(_weights(8, 16))
    with pytest.raises(CrosschipError, match=r"expected \[8, 1\]"):
        quant.int8_channel_dequantize(q, scale.reshape(-1))
    with pytest.raises(CrosschipError, match="int8"):
        quant.int8_channel_dequantize(q.float(), scale)


def test_int32_packing_matches_compressed_tensors() -> None:
    # compressed-tensors pack_to_int32 docstring: [1, 2] -> [129, 130, 0, 0] -> 33409.
    assert quant.pack_int8_to_int32(torch.tensor([[1, 2]], dtype=torch.int8)).tolist() == [[33409]]
    # Four 127s are bytes 0xFF x 4: the uint32 0xFFFFFFFF stored as int32 -1.
    assert quant.pack_int8_to_int32(torch.full((1, 4), 127, dtype=torch.int8)).tolist() == [[-1]]
    assert quant.pack_int8_to_int32(torch.full((1, 4), -128, dtype=torch.int8)).tolist() == [[0]]
    g = torch.Generator().manual_seed(5)
    for cols in range(1, 10):
        codes = torch.randint(-127, 128, (3, cols), generator=g, dtype=torch.int8)
        packed = quant.pack_int8_to_int32(codes)
        assert packed.dtype == torch.int32 and packed.shape == (3, math.ceil(cols / 4))
        assert torch.equal(quant.unpack_int32_to_int8(packed, (3, cols)), codes)
    with pytest.raises(CrosschipError, match="weight_packed"):
        quant.unpack_int32_to_int8(packed, (3, 40))


def test_fp16_audit_counts_overflow_underflow_and_subnormals() -> None:
    values = [
        1e5, -7e4, math.inf,  # overflow: |x| > 65504 (3)
        1e-8, -2.9e-8,  # become exactly 0 in fp16: |x| <= 2^-25 (2)
        1e-5, 2.0**-24, 3e-8, -6e-5,  # survive as subnormals: fp16 value below 2^-14 (4)
        0.0, 1.0, 65504.0, -2.0**-14, math.nan,  # zero, normals, the largest finite value, NaN
    ]  # fmt: skip
    audit = quant.fp16_range_audit("w", torch.tensor(values, dtype=torch.float32))
    assert (audit.overflow, audit.underflow_to_zero, audit.subnormal, audit.nan) == (3, 2, 4, 1)
    assert audit.numel == len(values) and audit.max_abs == math.inf and not audit.ok
    # bf16 has no 65504: its neighbours are 65280 (fits fp16) and 65536 (overflows).
    clean = quant.fp16_range_audit("ok", torch.tensor([1.0, -65280.0], dtype=torch.bfloat16))
    assert clean.ok and clean.max_abs == 65280.0
    assert quant.fp16_range_audit("bf", torch.tensor([65504.0], dtype=torch.bfloat16)).overflow == 1
    ints = quant.fp16_range_audit("ids", torch.arange(10**6))
    assert ints.ok and ints.overflow == 0


def test_fp16_cast_refuses_overflow_unless_clamped() -> None:
    t = torch.tensor([1e5, -1e6, 0.5, 1e-9])
    with pytest.raises(CrosschipError, match=r"model\.big\.weight.*--clamp") as excinfo:
        quant.cast_fp16(t, name="model.big.weight")
    assert excinfo.value.fix is not None and "--clamp" in excinfo.value.fix
    clamped = quant.cast_fp16(t, clamp=True)
    assert clamped.dtype == torch.float16
    assert clamped.tolist() == [65504.0, -65504.0, 0.5, 0.0]
    audits = [quant.fp16_range_audit(f"layer{i}", t) for i in range(7)] + [quant.fp16_range_audit("fine", t[2:])]
    with pytest.raises(CrosschipError, match=r"7 tensors.*layer0 \(2 values.*and 2 more"):
        quant.check_fp16_audits(audits)
    quant.check_fp16_audits(audits[-1:])


def test_tensor_error_definitions() -> None:
    ref = torch.tensor([[1.0, -4.0], [2.0, 0.0]])
    approx = torch.tensor([[1.5, -4.0], [2.0, 0.5]])
    err = quant.tensor_error(ref, approx)
    assert err.max_abs == 0.5 and err.ref_max_abs == 4.0
    assert err.max_rel == pytest.approx(0.5 / 4.0)
    assert err.rmse == pytest.approx(math.sqrt((0.25 + 0.25) / 4))
    assert quant.tensor_error(torch.zeros(3), torch.zeros(3)).max_rel == 0.0
    assert quant.tensor_error(torch.zeros(3), torch.ones(3)).max_rel == math.inf
    with pytest.raises(CrosschipError, match="shapes"):
        quant.tensor_error(ref, approx.T.reshape(4))
