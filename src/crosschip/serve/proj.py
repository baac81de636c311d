"""Projections for the serving runners: y = x @ W^T + b in the fastest weight layout this device has.

CPU libraries run batch-1 GEMV at speeds up to 4x apart depending on the layout, the shape and the
kernel (BLAS "nt"/"nn", oneDNN "dnn", batched "split"), so `pick_layouts` measures them per shape at
start-up. `fuse` builds one projection for several linears that read the same input (q/k/v, gate/up).
`rms_norm` is the RMSNorm every runner applies, computed as HF computes it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

from crosschip.devices import synchronize
from crosschip.errors import CrosschipError

LAYOUTS = ("nt", "nn", "dnn", "split")
# "split" runs its row-block bmm for at most this many input rows and oneDNN (else F.linear) above: on a
# 2-core EPYC the bmm is 1.4-1.8x faster than oneDNN at 1-2 rows, even at 4-8 and 1.4x slower at 16.
SPLIT_MAX_ROWS = 4


def _onednn_linear() -> Callable[..., torch.Tensor] | None:
    """oneDNN's inner product (the op inductor's CPU backend emits), or None in builds without it.

    Unlike BLAS GEMV, which runs a batch-1 projection on one core, it splits one row's projection
    across all intra-op threads; it takes the ordinary [out, in] weight, so nothing is repacked.
    """
    try:
        return torch.ops.mkldnn._linear_pointwise  # noqa: SLF001 - no public entry point
    except (AttributeError, RuntimeError):
        return None


def _split_parts(out_features: int) -> int:
    """Row blocks for the "split" layout: one per intra-op thread (at least 2), dividing `out`."""
    parts = max(2, torch.get_num_threads())
    while out_features % parts:
        parts -= 1
    return parts


class Proj:
    """y = x @ W^T + b for 2-D x, W stored [out, in] ("nt", "dnn", "split") or [in, out] ("nn").

    CPU libraries run batch-1 GEMV at speeds up to 4x apart depending on the layout, the shape
    and the kernel (BLAS "nt"/"nn", oneDNN "dnn", batched "split"), so `pick_layouts` chooses per shape.
    "split" views W as [P, out/P, in] and runs one `bmm`: torch parallelises bmm over its batch, so
    each thread streams its own block of rows, where BLAS runs a batch-1 GEMV on one core. Measured
    on a 2-core EPYC: 30-37 GB/s of weights against 9 GB/s ("nt") and 16-25 GB/s ("dnn").
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, layout: str) -> None:
        if layout not in LAYOUTS:
            raise CrosschipError(
                f"unknown weight layout {layout!r}", f"use auto or one of {', '.join(LAYOUTS)}"
            )
        self.layout = layout
        self.nn = layout == "nn"
        self.w = weight.t().contiguous() if self.nn else weight.contiguous()  # [in, out] | [out, in]
        self.b = bias
        # "split" runs above SPLIT_MAX_ROWS rows on oneDNN where it can (CPU), else on F.linear
        use_dnn = layout == "dnn" or (layout == "split" and self.w.device.type == "cpu")
        self._dnn = _onednn_linear() if use_dnn else None
        if layout == "dnn" and self._dnn is None:
            raise CrosschipError("this torch build has no oneDNN linear", "use layout auto, nt, nn or split")
        self._blocks = None
        if layout == "split":
            out_f, in_f = self.w.shape
            parts = _split_parts(out_f)
            if parts < 2:
                raise CrosschipError(f"{out_f} output rows do not split into blocks", "use layout nt")
            self._blocks = self.w.view(parts, out_f // parts, in_f)  # [P, out/P, in], a view

    def weight_view(self, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of the logical [out, in] weight, as a view of the stored tensor."""
        return self.w[:, start:stop].t() if self.nn else self.w[start:stop]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in] -> [N, out]."""
        if self._blocks is not None and x.shape[0] <= SPLIT_MAX_ROWS:
            parts = self._blocks.shape[0]
            y = torch.bmm(self._blocks, x.t().unsqueeze(0).expand(parts, -1, -1))  # [P, out/P, N]
            y = y.view(-1, x.shape[0]).t().contiguous()  # [N, out]; no copy when N == 1
            return y if self.b is None else y + self.b
        if self._dnn is not None:
            return self._dnn(x, self.w, self.b, "none", [], "")
        if self.nn:
            return torch.mm(x, self.w) if self.b is None else torch.addmm(self.b, x, self.w)
        return F.linear(x, self.w, self.b)


def fuse(mods: list[torch.nn.Linear], layouts: dict[tuple[int, int], str]) -> Proj:
    """One projection for several linears that read the same input (q/k/v, gate/up).

    The modules' parameters are rebound to views of the fused tensor, so the HF model keeps
    working (tests compare against it) without a second copy of the weights in memory.
    """
    weight = torch.cat([m.weight.detach() for m in mods], dim=0)  # [sum(out), in]
    bias = None if mods[0].bias is None else torch.cat([m.bias.detach() for m in mods], dim=0)
    proj = Proj(weight, bias, layouts[tuple(weight.shape)])
    start = 0
    for m in mods:
        stop = start + m.weight.shape[0]
        m.weight = torch.nn.Parameter(proj.weight_view(start, stop), requires_grad=False)
        if bias is not None:
            m.bias = torch.nn.Parameter(bias[start:stop], requires_grad=False)
        start = stop
    return proj


def _probe_projections(
    shape: tuple[int, int], layout: str, weight: torch.Tensor, x: torch.Tensor, copies: int
) -> list[Proj] | None:
    """`copies` projections of `weight` in `layout`; None if the kernel is missing, fails or is wrong."""
    try:
        projs = [Proj(weight.clone(), None, layout) for _ in range(copies)]
        got, want = projs[0](x).float(), F.linear(x, weight).float()
    except (CrosschipError, RuntimeError, NotImplementedError):
        return None
    return projs if torch.allclose(got, want, rtol=1e-2, atol=1e-2 * shape[1] ** 0.5) else None


def _layout_times(
    shape: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
    probe_bytes: int,
    candidates: tuple[str, ...] = LAYOUTS,
    rounds: int = 6,
) -> dict[str, float]:
    """Best seconds per batch-1 projection in each layout (inf where it cannot run).

    Each layout runs over copies that together exceed the caches (cold weights, as in decode), and
    the layouts take turns round by round so that a burst of load elsewhere hits them all alike.
    """
    out_f, in_f = shape
    itemsize = torch.empty((), dtype=dtype).element_size()
    copies = max(2, min(64, probe_bytes // (out_f * in_f * itemsize)))
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_f, in_f, generator=gen).to(device=device, dtype=dtype)
    x = torch.randn(1, in_f, generator=gen).to(device=device, dtype=dtype)
    probes = {layout: _probe_projections(shape, layout, weight, x, copies) for layout in candidates}
    best = {layout: math.inf for layout in candidates}
    for _ in range(rounds):
        for layout, projs in probes.items():
            if projs is None:
                continue
            synchronize(device)
            start = time.perf_counter()
            for proj in projs:
                proj(x)
            synchronize(device)
            best[layout] = min(best[layout], (time.perf_counter() - start) / copies)
    return best


def pick_layouts(
    shapes: set[tuple[int, int]],
    dtype: torch.dtype,
    device: torch.device,
    probe_bytes: int = 64 * 2**20,
    candidates: tuple[str, ...] = LAYOUTS,
) -> dict[tuple[int, int], str]:
    """The fastest of `candidates` (which include "nt") per [out, in] shape for batch-1 decode, measured here.

    HF's own "nt" stays unless another layout is clearly (>10%) faster: timing noise must not move it.
    """
    chosen = {}
    with torch.inference_mode():
        for shape in sorted(shapes):
            times = _layout_times(shape, dtype, device, probe_bytes, candidates)
            best = min(times, key=times.__getitem__)
            chosen[shape] = best if times[best] < 0.9 * times["nt"] else "nt"
    return chosen


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as HF computes it: in float32, cast back to x's dtype before the weight multiply."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one fused kernel; same op order in fp32
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)
