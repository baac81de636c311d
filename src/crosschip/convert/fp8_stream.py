"""FP8-block weight -> bf16 / fp32, streamed in row blocks from the source file to the shard writer.

The hot loop of `crosschip convert` on a DeepSeek-V3 checkpoint (fp8 -> bf16 is >80% of its
bytes), so it is written for speed while staying bit-identical to
`fp8_block_dequantize(w, scale_inv).to(dtype)`:
  - rows are read in blocks of 128 (one scale row), so the weight is never whole in memory, in
    fp8, fp32 or the output dtype;
  - each block is processed in tiles of about `TILE_ELEMS` elements: the ~10 passes over a tile
    then run in the core's caches (a [256, 7168] tile took 1.7x as long per element as [128, 7168]);
  - e4m3 codes become floats by bit moves instead of torch's scalar fp8 cast (~8x faster).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from crosschip.convert.stream import ShardWriter
from crosschip.formats.quant import FP8_BLOCK, FP8_DTYPE, TensorError, check_fp8_pair

RowReader = Callable[[int, int, torch.Tensor], torch.Tensor]  # (start, stop, uint8 buffer) -> rows
TILE_ELEMS = 2**20  # elements per tile: 4 MiB of fp32, so a tile's temporaries stay in cache
_FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()  # code -> value (read only)


def dequantize_fp8_parts(name: str, shape: tuple[int, ...], read_rows: RowReader, scale_inv: torch.Tensor,
                         dtype: torch.dtype, writer: ShardWriter) -> TensorError:
    """Dequantize one FP8-block weight to `dtype` (bf16 / fp32) into `writer`; returns its rounding error.

    `read_rows(start, stop, out)` gives rows [start, stop) of the float8_e4m3fn weight, read into
    the uint8 buffer `out`. Each element is the one fp32 product (v * 2^-8) * (s * 2^8) = v * s,
    rounded once to `dtype`, as in the reference.
    """
    check_fp8_pair(torch.empty(shape, dtype=FP8_DTYPE, device="meta"), scale_inv, FP8_BLOCK, name)
    rows, cols = shape
    writer.begin(name, dtype, (rows, cols))
    step, width = tile_shape(rows, cols)
    err = ErrorSums()
    with one_torch_thread():
        scale = scale_inv.to(torch.float32)  # [row blocks, col blocks]
        col_scale = scale.repeat_interleave(FP8_BLOCK[1], dim=1)[:, :cols]  # [row blocks, cols]
        scaled = col_scale * 2.0**8  # exact unless it overflows, which disables the fast cast
        tiles = _Tiles(step, cols, width, fast=bool(torch.isfinite(scaled).all()))
        for r0 in range(0, rows if cols else 0, step):
            codes = read_rows(r0, min(r0 + step, rows), tiles.codes)  # [n, cols]
            out = torch.empty(codes.shape, dtype=dtype)  # queued to the writer: must outlive this turn
            b0 = r0 // FP8_BLOCK[0]
            for c0 in range(0, cols, width):
                cs = slice(c0, c0 + width)
                tiles.dequantize(codes[:, cs], scale[b0:, c0 // FP8_BLOCK[1]:], col_scale[b0:, cs],
                                 scaled[b0:, cs], out[:, cs], err)
            writer.put_part(out)
    return err.result(rows * cols)


def tile_shape(rows: int, cols: int) -> tuple[int, int]:
    """(rows per read, columns per tile): whole 128-row blocks, about TILE_ELEMS elements a tile."""
    block_rows, block_cols = FP8_BLOCK
    step = max(1, TILE_ELEMS // max(cols, 1) // block_rows) * block_rows
    width = max(1, TILE_ELEMS // step // block_cols) * block_cols  # whole scale blocks per tile
    return min(step, max(rows, 1)), min(width, max(cols, 1))


class _Tiles:
    """The reused buffers of one weight's tiles, and the per-tile arithmetic."""

    def __init__(self, step: int, cols: int, width: int, fast: bool) -> None:
        self.fast = fast
        self.codes = torch.empty(step * cols, dtype=torch.uint8)  # one read: [step, cols] fp8 codes
        # Flat, so a narrower last tile is still a contiguous [n, w] view.
        self._work, self._diff = torch.empty(step * width), torch.empty(step * width)
        self._bits = torch.empty(step * width, dtype=torch.int16)
        self._mags = torch.empty(step * width, dtype=torch.uint8)

    @staticmethod
    def _view(buffer: torch.Tensor, n: int, w: int) -> torch.Tensor:
        return buffer[: n * w].view(n, w)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, col_scale: torch.Tensor, scaled: torch.Tensor,
                   out: torch.Tensor, err: ErrorSums) -> None:
        """codes [n, w] (fp8, a column slice) -> out [n, w] (bf16 / fp32), folding the error into `err`."""
        n, w = codes.shape
        code_max = block_code_max(codes, self._view(self._mags, n, w))  # [row blocks, col blocks]
        finite = not bool((code_max == 0x7F).any())
        p = out if out.dtype == torch.float32 else self._view(self._work, n, w)
        if self.fast and finite:
            fp8_codes_to_float(codes, self._view(self._bits, n, w), p)
            mul_block_rows(p, scaled)
        else:
            p.copy_(codes)  # torch's cast: NaN codes stay NaN, huge scales are not pre-multiplied
            mul_block_rows(p, col_scale)
        # max |v * s| of a block is its largest code's value times its scale (rounding is monotonic).
        err.track_ref(_FP8_VALUES[code_max.long()].mul_(scale[: len(code_max), : code_max.shape[1]].abs())
                      if finite else p)
        if out.dtype == torch.float32:
            err.add_exact()
            return
        out.copy_(p)
        err.add(p, out, self._view(self._diff, n, w))


def fp8_codes_to_float(codes: torch.Tensor, bits: torch.Tensor, out: torch.Tensor) -> None:
    """Finite e4m3fn codes -> float32 values exactly 2^-8 times theirs, ~8x faster than torch's cast.

    Each code's bits become a float16 (sign, 4 exponent bits in the low 4 of fp16's 5, 3 mantissa
    bits on top): fp16's exponent bias is 8 more than e4m3's, so the fp16 value is exactly
    value * 2^-8, subnormals included, and fp16 -> fp32 is a vectorised cast. (NaN codes would
    read as 1.875: callers check for them first.)
    """
    bits.copy_(codes.view(torch.int8))  # sign-extends: bits 15 and 14 both hold the sign
    bits.bitwise_left_shift_(7).bitwise_and_(~0x4000)
    out.copy_(bits.view(torch.float16))


def block_code_max(codes: torch.Tensor, mags: torch.Tensor) -> torch.Tensor:
    """The largest |code| of each 128x128 block of rows of fp8 codes: uint8 [row blocks, col blocks].

    With the sign bit cleared, e4m3 codes order like the magnitudes they encode, so this reads
    one byte per element where a float max would read four; 0x7f in a block means it holds a NaN.
    """
    torch.bitwise_and(codes.view(torch.uint8), 0x7F, out=mags)
    rows, cols = mags.shape
    full, block = rows // FP8_BLOCK[0], FP8_BLOCK[0]
    per_row_block = [mags[: full * block].view(full, block, cols).amax(dim=1)] if full else []
    if rows % block:
        per_row_block.append(mags[full * block :].amax(dim=0, keepdim=True))
    by_rows = torch.cat(per_row_block)
    return F.pad(by_rows, (0, -cols % FP8_BLOCK[1])).view(len(by_rows), -1, FP8_BLOCK[1]).amax(dim=-1)


def mul_block_rows(p: torch.Tensor, col_scale: torch.Tensor) -> None:
    """p [r, w] *= its block's scale, in place; `col_scale` row k is the scale row of rows 128k.. of p."""
    block = FP8_BLOCK[0]
    full = p.shape[0] // block
    if full:
        p[: full * block].view(full, block, -1).mul_(col_scale[:full, None, :])
    if p.shape[0] % block:
        p[full * block :].mul_(col_scale[full])


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch ops on one thread for a while (restoring the count after).

    The tile ops take ~0.1 ms each; with 2 intra-op threads each one ends at a barrier that waits
    for the second thread, which shares the cores with the writer (sha256) and the source stream,
    so every op can cost a scheduler time slice: on 2 cores a 2.8 GB conversion took 62 s with 2
    threads and 32 s with one. One thread leaves the other core to the I/O threads.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class ErrorSums:
    """`quant.tensor_error` of a tensor accumulated over tiles (max |diff|, max |ref|, sum diff^2)."""

    def __init__(self) -> None:
        self.max_abs, self.ref_max = torch.zeros(()), torch.zeros(())
        self.squares = 0.0

    def add(self, ref: torch.Tensor, approx: torch.Tensor, diff: torch.Tensor) -> None:
        diff.copy_(approx)
        diff.sub_(ref)
        low, high = torch.aminmax(diff)
        block_max = torch.maximum(-low, high)
        self.max_abs = torch.maximum(self.max_abs, block_max)  # NaN propagates, as in max()
        # An fp32 BLAS dot is 10x faster than a float64 norm and right to ~1e-5 (rmse is a statistic),
        # unless the squares near fp32's underflow or overflow.
        if 2.0**-60 < float(block_max) < 2.0**60:
            self.squares += float(torch.dot(diff.view(-1), diff.view(-1)))
        else:
            self.squares += float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2

    def add_exact(self) -> None:
        """A tile written as computed: diff = ref - ref, 0 where finite and NaN at inf / NaN."""
        if not bool(torch.isfinite(self.ref_max)):
            self.max_abs, self.squares = torch.full((), math.nan), math.nan

    def track_ref(self, values: torch.Tensor) -> None:
        """Fold in the reference values of a tile (or any tensor with the same largest |value|)."""
        low, high = torch.aminmax(values)
        self.ref_max = torch.maximum(self.ref_max, torch.maximum(-low, high))

    def result(self, numel: int) -> TensorError:
        max_abs, ref_max = float(self.max_abs), float(self.ref_max)
        max_rel = max_abs / ref_max if ref_max > 0 else (0.0 if max_abs == 0 else math.inf)
        return TensorError(max_abs, max_rel, math.sqrt(self.squares / max(numel, 1)), ref_max)
