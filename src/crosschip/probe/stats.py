"""Per-tensor statistics of the probe, reduced on the tensor's device without a host synchronization.

A tensor is first reduced to a mergeable *raw* vector (RAW_FIELDS: counts, sums, a max), so the several
calls of one module in a step (gradient accumulation) and the several parameters of one module merge
exactly; `finalize` turns raw rows into STAT_NAMES in one vectorized pass per step.

Definitions (msprobe's statistics dump reports the same quantities: max/min/mean/norm per tensor):
  mean, std (population), absmax, l2   over the *finite* elements only; NaN where there are none.
                                       NaN/Inf are counted instead, so one NaN does not hide the rest.
  nan, inf, zeros                      element counts (zeros: finite elements equal to 0).
  over_fp16                            finite elements with |x| > 65504, fp16's largest finite value.
std comes from the sums (E[x^2] - E[x]^2, clamped at 0), accumulated in float32 on the device: exact
enough to localize drift, not for tensors whose |mean| exceeds their std by ~1e3 or more.

On CPU a cheap path runs when the tensor is finite and within fp16's range (the usual case): min/max,
sum, L2 norm and a nonzero count, 4 passes; reading the min/max back costs nothing there, as CPU ops
are synchronous. Elsewhere, and for tensors that hold NaN/Inf or overflow fp16, the full masked path
runs entirely on the device (no branch on a device value).
"""

from __future__ import annotations

import functools

import torch

STAT_NAMES: tuple[str, ...] = ("mean", "std", "absmax", "l2", "nan", "inf", "zeros", "over_fp16")
FLOAT_STATS: tuple[str, ...] = STAT_NAMES[:4]
COUNT_STATS: tuple[str, ...] = STAT_NAMES[4:]
RAW_FIELDS: tuple[str, ...] = ("finite", "sum", "sumsq", "absmax", "nan", "inf", "zeros", "over_fp16")
FP16_MAX = 65504.0
_ABSMAX = RAW_FIELDS.index("absmax")


def acc_dtype(device: torch.device) -> torch.dtype:
    """Dtype of raw rows: float64 where the device has it (counts stay exact past 2^24), else float32."""
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


class Scratch:
    """A reusable float32 buffer for upcasting bf16/fp16 CPU tensors before reducing them.

    A fresh float32 copy of a large activation page-faults on every call (~10 ms for 8M elements);
    copying into memory already touched costs ~1 ms. One per recorder: nothing else may hold it.
    """

    def __init__(self) -> None:
        self.buf = torch.empty(0)

    def upcast(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64):
            return x
        if self.buf.numel() < x.numel():
            self.buf = torch.empty(x.numel())
        return self.buf[: x.numel()].view(x.shape).copy_(x)


def _as_float(x: torch.Tensor, scratch: Scratch | None) -> torch.Tensor:
    if x.dtype in (torch.float32, torch.float64):
        return x
    return scratch.upcast(x) if scratch is not None and x.device.type == "cpu" else x.float()


@torch.no_grad()
def raw_stats(x: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
    """RAW_FIELDS of x as a [8] tensor on x's device (acc_dtype); no host sync off the CPU.

    `scratch` (CPU only) is reused for the float32 upcast of a bf16/fp16 tensor; the result never aliases it.
    """
    acc = acc_dtype(x.device)
    if x.numel() == 0:
        return torch.tensor([0, 0, 0, float("nan"), 0, 0, 0, 0], dtype=acc, device=x.device)
    x = x.detach()
    with torch.autocast(x.device.type, enabled=False):
        if x.device.type == "cpu":
            lo, hi = (float(v) for v in torch.aminmax(x))  # in x's own dtype: exact, and no upcast yet
            if max(-lo, hi) <= FP16_MAX:  # False for NaN and +-Inf too
                return _fast_raw(_as_float(x, scratch), max(-lo, hi), acc)
        return _full_raw(_as_float(x, scratch), acc)


def _fast_raw(xf: torch.Tensor, absmax: float, acc: torch.dtype) -> torch.Tensor:
    """A finite tensor within fp16's range: nothing to mask, no NaN/Inf/overflow to count."""
    n = xf.numel()
    sums = torch.stack([xf.sum(), _sumsq(xf)]).to(acc)
    zeros = n - int(torch.count_nonzero(xf))
    return torch.cat([
        torch.tensor([n], dtype=acc), sums, torch.tensor([absmax, 0, 0, zeros, 0], dtype=acc),
    ])


def _sumsq(xf: torch.Tensor) -> torch.Tensor:
    """Sum of squares, float32, accurate and without a temporary the size of x (a large one costs page faults).

    torch's CPU float32 vector_norm accumulates each output sequentially (rel. error ~1e-4 over 2M
    elements), so it runs per row of at most a few thousand elements and the row norms are summed.
    """
    k = xf.shape[-1] if xf.dim() >= 2 else 0
    if 64 <= k <= 8192:
        return torch.linalg.vector_norm(xf.reshape(-1, k), dim=1).square().sum()
    return (xf * xf).sum()


def _full_raw(xf: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Any tensor, on any device: mask the non-finite elements out, then reduce."""
    n = xf.numel()
    finite = torch.isfinite(xf)  # [*x.shape] bool
    n_finite = torch.count_nonzero(finite)
    nan = torch.count_nonzero(torch.isnan(xf))
    xz = torch.where(finite, xf, 0.0)
    absx = xz.abs()
    nonzero = torch.count_nonzero(xz)
    # sumsq in acc: finite values up to 3.4e38 would overflow a float32 sum of squares.
    l2 = torch.linalg.vector_norm(xz, dtype=acc)
    absmax = torch.where(n_finite > 0, absx.amax(), float("nan"))
    counts = torch.stack([
        n_finite, nan, n - n_finite - nan, n_finite - nonzero, torch.count_nonzero(absx > FP16_MAX),
    ]).to(acc)
    floats = torch.stack([xz.sum().to(acc), l2 * l2, absmax.to(acc)])
    return torch.cat([counts[:1], floats, counts[1:]])


@functools.cache
def _max_mask(device: torch.device, length: int) -> torch.Tensor:
    return torch.tensor([i == _ABSMAX for i in range(length)], device=device)


def merge_raw(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Raw stats of the union of two element sets: sums add, absmax takes the max (NaN = empty).

    Rows may carry extra trailing columns (the recorder's input NaN/Inf count): those add too.
    """
    return torch.where(_max_mask(a.device, a.shape[-1]), torch.fmax(a, b), a + b)


def finalize(raw: torch.Tensor) -> torch.Tensor:
    """[M, 8+k] raw rows -> [M, 8+k] rows of STAT_NAMES (extra trailing columns pass through)."""
    n, s, ss = raw[:, 0], raw[:, 1], raw[:, 2]
    mean = s / n  # 0/0 = NaN: no finite element
    std = (ss / n - mean * mean).clamp_min(0).sqrt()
    stats = torch.stack([mean, std, raw[:, _ABSMAX], ss.sqrt()], dim=1)
    return torch.cat([stats, raw[:, _ABSMAX + 1 :]], dim=1)


def tensor_stats(x: torch.Tensor) -> torch.Tensor:
    """STAT_NAMES of x as a [8] tensor on x's device (float64 on CPU/CUDA, float32 elsewhere)."""
    return finalize(raw_stats(x)[None])[0]
