"""The streamed FP8-block dequantization is bit for bit `fp8_block_dequantize(...).to(dtype)`.

Its fast path moves e4m3 bits into float16 and pre-multiplies the scale by 2^8; these tests cover
what could break that: NaN codes, scales too large to pre-multiply, subnormal codes and scales,
edges off the 128 grid, column tiling of wide weights, and the error it reports.
"""

from __future__ import annotations

import math

import pytest
import torch

from crosschip.convert import fp8_stream
from crosschip.formats.quant import FP8_DTYPE, fp8_block_dequantize, fp8_scale_shape, tensor_error


class Collect:
    """The writer's side of the protocol: the tensor's parts, in order."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []

    def begin(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.dtype, self.shape = dtype, shape

    def put_part(self, part: torch.Tensor) -> None:
        self.parts.append(part.clone())

    def tensor(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.parts]).reshape(self.shape) if self.parts else \
            torch.empty(self.shape, dtype=self.dtype)


def random_codes(shape: tuple[int, int], seed: int, nan: bool = False) -> torch.Tensor:
    codes = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    codes[(codes & 0x7F) == 0x7F] -= 1  # every finite code, subnormals (exponent 0) included
    if nan and codes.numel():
        codes.view(-1)[codes.numel() // 2] = 0xFF
    return codes.view(FP8_DTYPE)


def run(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, object]:
    def read_rows(start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        rows = w[start:stop]
        return out.view(-1)[: rows.numel()].view(FP8_DTYPE).view(rows.shape).copy_(rows)

    sink = Collect()
    err = fp8_stream.dequantize_fp8_parts("w", tuple(w.shape), read_rows, scale, dtype, sink)  # type: ignore[arg-type]
    return sink.tensor(), err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(300, 200), (128, 128), (1, 1), (0, 5), (257, 1000)])
@pytest.mark.parametrize("tile", [fp8_stream.TILE_ELEMS, 128 * 256])  # the small tile splits columns
def test_bit_identical_to_the_reference(shape: tuple[int, int], dtype: torch.dtype, tile: int,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8_stream, "TILE_ELEMS", tile)
    w = random_codes(shape, seed=sum(shape))
    scale = torch.rand(fp8_scale_shape(shape), generator=torch.Generator().manual_seed(1)) * 1e-3 + 1e-5
    out, err = run(w, scale, dtype)
    ref = fp8_block_dequantize(w, scale, dtype=dtype)
    assert out.dtype == dtype and torch.equal(out, ref)
    expected = tensor_error(fp8_block_dequantize(w, scale, dtype=torch.float32), ref.float())
    assert err.max_abs == expected.max_abs and err.ref_max_abs == pytest.approx(expected.ref_max_abs, rel=1e-6)
    assert err.rmse == pytest.approx(expected.rmse, rel=1e-4, abs=1e-30)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nan_codes_and_extreme_scales_take_torch_s_cast(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8_stream, "TILE_ELEMS", 128 * 256)
    shape = (260, 700)
    w = random_codes(shape, seed=3, nan=True)  # one NaN code: only its tile leaves the fast path
    scale = torch.full(fp8_scale_shape(shape), 2.0**-3)
    scale[0, 1] = 2.0**126  # x 2^8 overflows fp32: the whole weight leaves the fast path
    scale[1, 2] = 2.0**-140  # a subnormal scale
    out, err = run(w, scale, dtype)
    ref = fp8_block_dequantize(w, scale, dtype=dtype)
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().sum() == 1
    assert torch.equal(out.nan_to_num(), ref.nan_to_num())
    assert math.isnan(err.max_abs)  # NaN propagates into the reported error, as in tensor_error


def test_tile_shape_keeps_whole_scale_blocks() -> None:
    for rows, cols in [(7168, 2048), (2048, 7168), (7168, 16384), (576, 7168), (3, 5)]:
        step, width = fp8_stream.tile_shape(rows, cols)
        assert step % 128 == 0 or step == rows
        assert width % 128 == 0 or width == cols
        assert step * width <= max(fp8_stream.TILE_ELEMS, step * 128)
