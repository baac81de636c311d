"""Pass/fail gates for `crosschip verify`, with documented defaults per target precision class.

Where the defaults come from
----------------------------
No parity tool publishes distribution thresholds to copy: llama.cpp's `perplexity --kl-divergence`
reports mean/percentile KLD, "Same top p" and ln(PPL ratio) but gates nothing, and vLLM's
`check_logprobs_close` is a greedy top-N containment check with no KL at all
(../shared/reference/parity-tools.md). So every number below is a crosschip engineering choice, placed
between two measured scales:

- the noise a correct port shows, from the target's unit roundoff u = 2^-p for p significant bits
  (fp32 2^-24, fp16 2^-11, bf16 2^-8). Rounding the activations perturbs the logits by roughly 1e-2 * |logit| for
  bf16 after a few dozen layers, and a small logit perturbation d gives KL ~ Var_p(d) / 2, i.e. a mean KL of
  a few 1e-4 nats for bf16 and, since KL grows with d^2, ~64x less for fp16; top-1 flips only at near-ties
  (measured on the tiny presets: fp32 vs bf16 ~4e-7, vs fp16 ~6e-9: the same 64x ratio);
- the damage a bug does: a wrong weight layout, scale, rope or norm gives mean KL of 0.1 to several nats
  and top-1 agreement far below 90%. For scale, published llama.cpp KLD runs show weight quantization at
  6 bits near 3e-3 nats mean KLD with ~97.5% same top token, a 4-bit K-quant near 1e-2 with ~95% (llama.cpp
  PR #5081), and IQ4_XS near 4e-2 with p99 0.3 and ~90% (PR #12557).

Each float gate sits 5x or more above the expected noise of its class, and for 8-bit formats (int8 w8a16 and
w8a8, fp8 e4m3 with block scales) at roughly the error of a good 4-bit quantization: an 8-bit checkpoint
worse than that has a bug (wrong scales, a layer that should have stayed in bf16), not rounding noise.

The mean-KL gate is applied to the *upper* bound of the 95% bootstrap CI of the mean (resampling whole
sequences), not to the point estimate: with few tokens the CI is wide, so a small sample cannot pass by
luck; it passes only when the data show the mean is below the threshold. The other gates use point
estimates (p99 KL, top-1 agreement, perplexity ratio). The perplexity ratio is gated in both directions
(max(r, 1/r)): parity means the same model, not a better one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from crosschip.errors import CrosschipError
from crosschip.verify.metrics import DistributionMetrics, GreedyMetrics

_FP_NOTE = (
    "crosschip engineering choice: unit roundoff u = {u} ({bits} significant bits); expected mean KL from "
    "rounding alone ~{typical} nats, top-1 flips only at near-ties. Gate 5x or more above that and far "
    "below what a conversion bug gives (0.1+ nats)."
)
_Q8_NOTE = (
    "crosschip engineering choice: {what}; measured 8-bit quantization error on LLMs is ~1e-3 to 2e-2 nats "
    "mean KL. The gate sits at the error of a good 4-bit llama.cpp quant (IQ4_XS: ~4e-2 mean, p99 ~0.3, "
    "~90% same top token, llama.cpp PR #12557): an 8-bit target worse than that has a bug, not rounding."
)


@dataclass(frozen=True)
class Gates:
    """Thresholds for one verification. KL in nats, ref || target."""

    kl_mean_max: float  # on the upper 95% CI bound of the mean per-token KL
    kl_p99_max: float
    top1_min: float
    ppl_ratio_max: float  # on max(ppl_tgt / ppl_ref, ppl_ref / ppl_tgt)
    greedy_vllm_close: bool  # require vLLM's top-N closeness at every greedy divergence
    source: str = ""


DEFAULT_GATES: dict[str, Gates] = {
    "fp32": Gates(1e-4, 1e-3, 0.99, 1.001, True, _FP_NOTE.format(
        u="2^-24", bits=24, typical="1e-9 (1e-5 with TF32 matmuls)")
        + " Loose enough for TF32 matmul kernels; top-1 0.99 because near-ties flip under any reordering."),
    "fp16": Gates(5e-4, 5e-3, 0.98, 1.005, True, _FP_NOTE.format(u="2^-11", bits=11, typical="1e-5")),
    "bf16": Gates(2e-3, 2e-2, 0.97, 1.01, True, _FP_NOTE.format(u="2^-8", bits=8, typical="a few 1e-4")
                  + " 2e-3 stays below 6-bit weight quantization (~3e-3, llama.cpp KLD runs), so quantization-"
                  "sized damage in a 'bf16' target fails."),
    "fp8": Gates(5e-2, 0.5, 0.90, 1.05, True, _Q8_NOTE.format(
        what="fp8 e4m3 with 128x128 block scales, 4 significant bits (u = 2^-4) before scaling")),
    "int8": Gates(5e-2, 0.5, 0.90, 1.05, True, _Q8_NOTE.format(
        what="int8 w8a16 (per-channel weights) and w8a8 (plus dynamic per-token activations)")),
}
PRECISION_CLASSES = tuple(DEFAULT_GATES)

_DTYPE_CLASS = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "f32": "fp32", "fp64": "fp32", "float64": "fp32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "f16": "fp16",
    # TF32 keeps fp16's 10 explicit mantissa bits, so it is gated like fp16.
    "tf32": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
}


@dataclass
class GateResult:
    """One gate's outcome; passed None means the gate was not evaluated (metric unavailable or disabled)."""

    name: str
    value: float | None
    threshold: float | None
    passed: bool | None
    note: str = ""
    group: str = "conversion"  # conversion (ref vs target), served, fidelity, tokenization, routing


def precision_class(dtype: str | None, fmt: str | None) -> str:
    """The gate class of a target from its compute dtype and/or stored format.

    A quantized format decides the class (fp8-block -> fp8, int8-w8a16 / int8-w8a8-dynamic -> int8);
    otherwise the coarser of the float dtype and float format. Nothing known -> "fp32", the strictest
    class, so missing information never loosens the gates.
    """
    found = [_one_class(v) for v in (fmt, dtype) if v]
    if not found:
        return "fp32"
    coarse = ("fp32", "fp16", "bf16", "int8", "fp8")
    return max(found, key=coarse.index)


def _one_class(name: str) -> str:
    key = name.strip().lower().removeprefix("torch.")
    if key in DEFAULT_GATES:
        return key
    if key in _DTYPE_CLASS:
        return _DTYPE_CLASS[key]
    if key.startswith(("fp8", "float8", "e4m3", "e5m2")):
        return "fp8"
    if key.startswith(("int8", "w8a8", "w8a16", "qint8")):
        return "int8"
    raise CrosschipError(f"cannot tell the precision class of {name!r}",
                         f"pass --precision with one of {', '.join(PRECISION_CLASSES)}")


@dataclass(frozen=True)
class FloorMargins:
    """How far above the golden's own figures a target may go (see module docstring, 'Measured gates')."""

    kl: float = 4.0  # mean and p99 KL: KL grows as the square of the logit error, so 4x KL is 2x the error
    top1: float = 2.0  # top-1 disagreements
    ppl: float = 2.0  # |ln perplexity ratio|
    route: float = 2.0  # share of tokens re-routed to another expert set, per MoE layer


FLOOR_MARGINS = FloorMargins()
# Thresholds never go below these, by the target's compute class: where the golden equals the reference (a
# float target stored like the reference) its figures are ~0, and another kernel order must still pass.
# (mean KL, p99 KL, top-1 disagreement share, |ln ppl ratio|)
_MIN_THRESHOLDS = {
    "fp32": (1e-6, 1e-5, 0.002, 1e-4),
    "fp16": (1e-5, 1e-4, 0.003, 1e-3),
    "bf16": (1e-4, 1e-3, 0.005, 3e-3),
}
_TOP1_SLACK_TOKENS = 3.0  # disagreements allowed beyond the margin: a handful of near-ties on a small sample
# ln(ppl ratio) is the mean of per-token log-prob differences, a signed sum that cancels: a golden whose ratio
# happens to be ~1 says little. A correct target's ratio wanders by its sampling noise, sd ~ sqrt(2 KL / N)
# (the per-token difference has variance ~2 KL for small perturbations); allow this many such sds, which also
# covers tokens being correlated within a row (effective N a few times smaller).
_PPL_NOISE_SDS = 6.0
_ROUTE_MIN = 0.01  # re-routed share allowed per MoE layer where the golden re-routes none


def measured_gates(floor: DistributionMetrics, compute_class: str, margins: FloorMargins = FLOOR_MARGINS,
                   what: str = "the golden reference conversion") -> Gates | None:
    """Gates from a measured floor: each threshold is a margin times the floor's own figure on the same tokens.

    None when the floor itself is not finite (a broken golden must not set the gates).
    """
    figures = (floor.kl_mean_ci[1], floor.kl_p99, floor.top1_agreement, floor.ppl_ratio)
    if not all(math.isfinite(x) for x in figures) or floor.ppl_ratio <= 0 or floor.tokens <= 0:
        return None
    kl_min, p99_min, top1_min, lnppl_min = _MIN_THRESHOLDS.get(compute_class, _MIN_THRESHOLDS["bf16"])
    disagree = margins.top1 * (1.0 - floor.top1_agreement) + max(top1_min, _TOP1_SLACK_TOKENS / floor.tokens)
    ppl_noise = _PPL_NOISE_SDS * math.sqrt(2.0 * max(floor.kl_mean_ci[1], 0.0) / floor.tokens)
    source = (f"measured against {what} on the same tokens: mean and p99 KL {margins.kl}x its own, top-1 "
              f"disagreements {margins.top1}x its own + {max(top1_min, _TOP1_SLACK_TOKENS / floor.tokens):.2%}, "
              f"|ln ppl ratio| {margins.ppl}x its own + {_PPL_NOISE_SDS:g} sd of its sampling noise "
              f"({ppl_noise:.2g}); never below the {compute_class} floors (mean KL {kl_min:g}, "
              f"p99 {p99_min:g}). Margins calibrated by benchmarks/verify_calibration.py.")
    return Gates(
        kl_mean_max=max(margins.kl * floor.kl_mean_ci[1], kl_min),
        kl_p99_max=max(margins.kl * floor.kl_p99, p99_min),
        top1_min=max(0.0, 1.0 - disagree),
        ppl_ratio_max=math.exp(max(margins.ppl * abs(math.log(floor.ppl_ratio)) + ppl_noise, lnppl_min)),
        greedy_vllm_close=True,
        source=source,
    )


def routing_gate(routing: list[dict[str, Any]], margins: FloorMargins = FLOOR_MARGINS) -> GateResult | None:
    """Per MoE layer, the share of tokens the target sends to another expert set than the reference does, against
    margin x the golden's share at that layer. A flip is then a metric of its own, localized to its layer: a
    golden that flips as often says it is rounding at a near-tie, not a broken router. None without MoE layers
    or a golden."""
    rows = [r for r in routing if r.get("golden_flipped") is not None]
    if not rows:
        return None
    worst, first_bad = None, None
    for r in rows:
        limit = max(margins.route * float(r["golden_flipped"]), _ROUTE_MIN)
        excess = float(r["flipped"]) - limit
        if worst is None or excess > worst[0]:
            worst = (excess, r, limit)
        if excess > 0 and first_bad is None:
            first_bad = r
    assert worst is not None
    _, row, limit = worst
    note = f"layer {row['layer']}: {row['flipped']:.2%} of tokens re-routed, golden {row['golden_flipped']:.2%}"
    if first_bad is not None:
        note = f"first failing MoE layer {first_bad['layer']}; " + note
    return GateResult("router_flips", float(row["flipped"]), limit, first_bad is None, note, group="routing")


def resolve_gates(cls: str, overrides: dict[str, float | None]) -> Gates:
    """The class's default gates with any non-None overrides (flags) applied field by field."""
    if cls not in DEFAULT_GATES:
        raise CrosschipError(f"unknown precision class {cls!r}", f"use one of {', '.join(PRECISION_CLASSES)}")
    return apply_overrides(DEFAULT_GATES[cls], overrides)


def apply_overrides(gates: Gates, overrides: dict[str, float | None]) -> Gates:
    """`gates` with any non-None overrides (flags) applied field by field."""
    names = {f.name for f in fields(Gates)} - {"source"}
    changes: dict[str, float | bool] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in names:
            raise CrosschipError(f"unknown gate {key!r}", f"use one of {', '.join(sorted(names))}")
        if key == "greedy_vllm_close":
            changes[key] = bool(value)
            continue
        if not math.isfinite(float(value)) or float(value) < 0:
            raise CrosschipError(f"gate {key} must be a finite number >= 0 (got {value})", "pass a valid threshold")
        if key == "top1_min" and float(value) > 1:
            raise CrosschipError(f"gate top1_min must be at most 1 (got {value})", "pass a share between 0 and 1")
        changes[key] = float(value)
    if not changes:
        return gates
    listed = ", ".join(f"{k}={v}" for k, v in changes.items())
    return replace(gates, **changes, source=f"{gates.source} Overridden by flags: {listed}.")


def _le(value: float, threshold: float) -> bool:
    return not math.isnan(value) and value <= threshold


def evaluate(dist: DistributionMetrics | None, greedy: GreedyMetrics | None, gates: Gates,
             group: str = "conversion") -> list[GateResult]:
    """Every gate against the measured metrics (NaN never passes)."""
    out = _evaluate(dist, greedy, gates)
    for g in out:
        g.group = group
    return out


def _evaluate(dist: DistributionMetrics | None, greedy: GreedyMetrics | None, gates: Gates) -> list[GateResult]:
    out: list[GateResult] = []
    if dist is None:
        for name in ("kl_mean", "kl_p99", "top1_agreement", "ppl_ratio"):
            out.append(GateResult(name, None, None, None, "not measured"))
    else:
        ci_hi = dist.kl_mean_ci[1]
        lower = " (a lower bound: top-K + rest)" if dist.kl_method != "exact" else ""
        out.append(GateResult("kl_mean", ci_hi, gates.kl_mean_max, _le(ci_hi, gates.kl_mean_max),
                              f"upper 95% CI bound; point estimate {dist.kl_mean:.3g}{lower}"))
        out.append(GateResult("kl_p99", dist.kl_p99, gates.kl_p99_max, _le(dist.kl_p99, gates.kl_p99_max), lower))
        top1 = dist.top1_agreement
        out.append(GateResult("top1_agreement", top1, gates.top1_min, not math.isnan(top1) and top1 >= gates.top1_min,
                              f"{dist.tokens} positions"))
        r = dist.ppl_ratio
        sym = max(r, 1 / r) if r > 0 else math.inf
        out.append(GateResult("ppl_ratio", r, gates.ppl_ratio_max, _le(sym, gates.ppl_ratio_max),
                              "gated in both directions: max(r, 1/r)"))
    if greedy is None:
        out.append(GateResult("greedy_vllm_close", None, None, None, "no greedy continuations"))
    elif not gates.greedy_vllm_close:
        out.append(GateResult("greedy_vllm_close", float(greedy.all_vllm_close), None, None, "not gated"))
    else:
        bad = [row.prompt for row in greedy.rows if not row.vllm_close]
        note = f"top-{greedy.top_n}; {greedy.identical}/{greedy.prompts} identical"
        if bad:
            note += f"; not close: prompts {', '.join(map(str, bad[:10]))}"
        out.append(GateResult("greedy_vllm_close", float(greedy.all_vllm_close), 1.0, greedy.all_vllm_close, note))
    return out


def verdict(results: list[GateResult], layer_fail: bool, *, checked_layers: bool = False) -> bool:
    """Pass when no layer failed and every evaluated gate passed.

    Nothing evaluated is a fail unless the caller ran the layer check (checked_layers): a verification
    that measured nothing must not certify parity.
    """
    evaluated = [r for r in results if r.passed is not None]
    if not evaluated and not checked_layers:
        return False
    return not layer_fail and all(r.passed for r in evaluated)
