"""Per-point error statistics and gates of layer localization (msprobe's metrics, fp64 noise-floor gates).

Split from `layers.py`: what is measured at each point and how the gate is set, apart from how the
points are captured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from crosschip.errors import CrosschipError

# Unit roundoff u = 2^-p (p = significand bits incl. the implicit one): fp32 p=24, fp16 p=11,
# bf16 p=8; int8 weights/activations ~ 8 bits; fp8 e4m3 p=4.
UNIT_ROUNDOFF: dict[str, float] = {
    "fp32": 2.0**-24,
    "bf16": 2.0**-8,
    "fp16": 2.0**-11,
    "int8": 2.0**-8,
    "fp8": 2.0**-4,
}
# margin: how far above its expected rounding error a point may go. Measured with B=2, T=32, 8 seeds
# (error / (gate / margin), i.e. relative to the scaled noise floor):
#   unperturbed, isolated: bf16 and fp16 <= 0.53 (tiny), 0.62 (deepseek-tiny), 0.37 (small);
#   unperturbed, accumulated: <= 0.71 (tiny), 0.82 (small); grows ~sqrt(depth): 2.3 after 16 layers;
#     deepseek-tiny up to 5.4 (bf16) / 48 (fp16) where inherited rounding flips a near-tie MoE route;
#   layer-1 MLP weights + 5% of their std as noise, isolated: bf16 >= 2.6 (small), 3.7 (tiny),
#     4.7 (deepseek-tiny); fp16 >= 21; fp32 >= 1.7e5;
#   noise floor itself: 1.4-9.0 u_fp32 per point.
# 4 leaves >= 6x headroom over every unperturbed isolated error and passes dense stacks accumulated
# to ~50 layers; at bf16 the gate is rel_rmse ~0.06-0.09, stricter than msprobe's fixed cos < 0.99
# (rel_rmse ~0.14) and in the spirit of torch dynamo's m = 3 for fp16/bf16 against fp64.
DEFAULT_MARGIN = 4.0
# With a golden (the reference converted by crosschip into the target's format and run with the target's
# numerics), a point's gate is GOLDEN_MARGIN x the golden's own error there: a correct conversion by another
# tool rounds differently but to the same grid, so its error sits near the golden's; a planted fault adds its
# own error on top. Calibrated by benchmarks/verify_calibration.py (table in the README).
GOLDEN_MARGIN = 2.0
# Without a measured noise floor, assume fp32 noise of this many unit roundoffs (upper end of the
# 1.4-9.0 measured above), so an unmeasured gate errs on the side of passing rounding.
ASSUMED_NOISE_ULPS = 8.0
_WITHIN = (1e-3, 5e-3)  # msprobe One/Five-Thousandth Err Ratio thresholds


@dataclass
class PointStats:
    """Comparison statistics of one point over all batches (exact running sums, float64).

    nonfinite counts elements where one side is Inf/NaN and the other is not the same special value;
    any such element makes max_abs, max_rel and rel_rmse infinite and cosine undefined (NaN), as
    msprobe reports N/A. Specials at the same positions on both sides are zeroed (msprobe's rule).
    """

    cosine: float
    max_abs: float
    max_rel: float
    within_1e_3: float
    within_5e_3: float
    rel_rmse: float
    numel: int
    nonfinite: int = 0
    rerouted: float | None = None  # MoE mlp points: share of tokens whose top-k expert set differs

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite floats become None (their meaning is in `nonfinite`)."""

        def num(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        return {
            "cosine": num(self.cosine),
            "max_abs": num(self.max_abs),
            "max_rel": num(self.max_rel),
            "within_1e-3": self.within_1e_3,
            "within_5e-3": self.within_5e_3,
            "rel_rmse": num(self.rel_rmse),
            "numel": self.numel,
            "nonfinite": self.nonfinite,
            "rerouted": self.rerouted,
        }


@dataclass
class StatsAccumulator:
    """Running sums for PointStats; update() takes a target and a reference tensor of one shape."""

    dot: float = 0.0
    tt: float = 0.0
    rr: float = 0.0
    dd: float = 0.0
    max_abs: float = 0.0
    max_rel: float = 0.0
    within: list[int] = field(default_factory=lambda: [0, 0])
    numel: int = 0
    nonfinite: int = 0

    def update(self, tgt: torch.Tensor, ref: torch.Tensor) -> None:
        # Few passes: this runs on every point of every batch (the overhead budget). float64 only when
        # a side is float64 (the noise floor's fp64 twin): comparing <= fp32 tensors, whose differences
        # are >= fp32 rounding, float32 holds every statistic to ~1e-6 relative at half the traffic.
        dtype = torch.float64 if torch.float64 in (tgt.dtype, ref.dtype) else torch.float32
        t = tgt.detach().to("cpu", dtype).reshape(-1)  # [N]
        r = ref.detach().to("cpu", dtype).reshape(-1)  # [N]
        if t.shape != r.shape:
            raise CrosschipError(
                f"layer outputs differ in size ({tgt.shape} vs {ref.shape})", "compare models of one architecture"
            )
        bad = None
        tt, rr = float(torch.dot(t, t)), float(torch.dot(r, r))
        if dtype == torch.float32 and not (math.isfinite(tt) and math.isfinite(rr)):
            # A square beyond float32 or an Inf/NaN element: float64 tells them apart.
            return self.update(tgt.detach().to(torch.float64), ref)
        # float32/16 values squared cannot overflow float64, so non-finite sums mean an Inf/NaN element.
        if not (math.isfinite(tt) and math.isfinite(rr)):
            t, r, bad = self._zero_specials(t, r)
            tt, rr = float(torch.dot(t, t)), float(torch.dot(r, r))
        self.dot += float(torch.dot(t, r))
        self.tt, self.rr = self.tt + tt, self.rr + rr
        d = t - r  # [N]
        self.dd += float(torch.dot(d, d))
        self.numel += t.numel()
        if not t.numel():
            return
        abs_d, abs_r = d.abs_(), r.abs()
        self.max_abs = max(self.max_abs, float(abs_d.max()))
        # rel = |t - r| / |r|: 0/0 (both zero) -> 0 counts as within; x/0 -> inf never does.
        rel = torch.div(abs_d, abs_r).nan_to_num_(nan=0.0, posinf=math.inf)  # [N]
        for k, thr in enumerate(_WITHIN):
            within = rel < thr if bad is None else (rel < thr) & ~bad
            self.within[k] += int(torch.count_nonzero(within))
        # MaxRelErr only over |r| > 0 (msprobe): drop the x/0 infinities.
        self.max_rel = max(self.max_rel, float(rel.nan_to_num_(posinf=0.0).max()))

    def _zero_specials(self, t: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Zero Inf/NaN on both sides; count those not matched by the same special on the other side."""
        fin = torch.isfinite(t) & torch.isfinite(r)
        same_special = (t == r) | (torch.isnan(t) & torch.isnan(r))
        bad = ~fin & ~same_special
        self.nonfinite += int(bad.sum())
        return torch.where(fin, t, 0.0), torch.where(fin, r, 0.0), bad

    def stats(self) -> PointStats:
        n = max(self.numel, 1)
        within = (self.within[0] / n, self.within[1] / n)
        if self.nonfinite:
            inf = math.inf
            return PointStats(math.nan, inf, inf, *within, inf, self.numel, self.nonfinite)
        if self.tt == 0.0 and self.rr == 0.0:
            cosine = 1.0
        elif self.tt == 0.0 or self.rr == 0.0:
            cosine = 0.0
        else:
            cosine = self.dot / math.sqrt(self.tt * self.rr)
        zero_ref = 0.0 if self.dd == 0.0 else math.inf  # an all-zero reference: exact or infinitely wrong
        rel_rmse = math.sqrt(self.dd / self.rr) if self.rr > 0.0 else zero_ref
        return PointStats(cosine, self.max_abs, self.max_rel, *within, rel_rmse, self.numel)


def gate_for(
    noise_rel_rmse: float | None, tgt_precision: str, margin: float, ref_unit: float = UNIT_ROUNDOFF["fp32"]
) -> float:
    """margin * max(reference noise scaled to the target's unit roundoff, the target's unit roundoff).

    noise_rel_rmse is the reference-vs-fp64 rel_rmse of the point (None: not measured, assume
    ASSUMED_NOISE_ULPS unit roundoffs); ref_unit is the unit roundoff of the reference's dtype.
    """
    u_tgt = unit_roundoff(tgt_precision)
    noise = ASSUMED_NOISE_ULPS * ref_unit if noise_rel_rmse is None else noise_rel_rmse
    return margin * max(noise * (u_tgt / ref_unit), u_tgt)


def unit_roundoff(precision: str) -> float:
    if precision not in UNIT_ROUNDOFF:
        raise CrosschipError(f"unknown target precision {precision!r}", f"use one of: {', '.join(UNIT_ROUNDOFF)}")
    return UNIT_ROUNDOFF[precision]
