"""Compare the ranks of one multi-rank (torchrun) probe recording: which rank, step and module went wrong first.

What a cross-rank comparison means. Under DDP every rank runs the same model on its own batch, then the
gradients are all-reduced, so:
- the **first NaN/Inf** is the decisive signal. A NaN produced in one rank's forward pass stays on that
  rank until backward; the all-reduce (DDP) or reduce-scatter (FSDP2) then spreads it into every rank's
  gradients at the same step, and the optimizer into every rank's weights from the next step on. So
  among every rank's NaN/Inf origin (crosschip.probe.compare.nonfinite_origin) the earliest by
  (step, outputs before gradients, execution order, rank) names the rank whose forward produced it;
  the other ranks' origins at that step are gradients, later in the order.
- **outputs** legitimately differ between ranks (different data). Each rank r is compared with the
  reference rank using the pair's own spread as the noise run: per (module, statistic), the median over
  steps of |ref - r| / scale. A row diverges when its difference at one step exceeds `margin` times that
  median (or the precision floor): "this rank left its usual distance from the reference". This needs
  several recorded steps; with one, a step is its own median and never diverges. NaN and Inf counts
  are compared exactly; over-fp16 counts are not (one rank's data may cross 65504 and another's not),
  the per-rank overflow origins report them.
- **gradients** recorded whole (grad_scope "full": DDP, or one process) are all-reduced, the same on
  every rank: they are held to the precision floor alone, so a rank out of step with the others (a
  missed all-reduce, a desync) shows there. FSDP2 records each rank's own shard ("local shard"):
  different elements on each rank, not compared (their NaN/Inf still count for the origin).
A divergence names the rank compared against the reference; with two ranks either side may be at fault,
the NaN origin never is ambiguous.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from crosschip.errors import CrosschipError
from crosschip.probe.compare import (
    _KIND_RANK,
    DEFAULT_MARGIN,
    FLOAT_STATS,
    UNIT_ROUNDOFF,
    Divergence,
    Origin,
    _align,
    _compare_rows,
    _first_divergence,
    _first_nonfinite_loss,
    _load,
    _precision,
    _rel_diff,
    _Run,
    _scale,
    _subset,
    check_margin,
    nonfinite_origin,
    overflow_origin,
)

CROSS_RANK_COUNTS = ("nan", "inf")
MIN_SPREAD_STEPS = 5  # fewer clean steps give no usable median: those outputs are judged on NaN/Inf counts only


@dataclass
class RankSummary:
    """One rank's recording and where it first went non-finite."""

    rank: int
    rows: int
    steps: list[int]  # [first, last] recorded step
    grad_scope: str
    nonfinite_origin: Origin | None
    overflow_origin: Origin | None
    loss_nonfinite_step: int | None


@dataclass
class RankPair:
    """Rank `rank` against the reference rank."""

    rank: int
    aligned_rows: int
    divergent_rows: int
    compared: list[str]  # the kinds compared: output, and grad unless the grads are local shards
    first_divergence: Divergence | None
    outputs_counts_only: list[str]  # modules with < MIN_SPREAD_STEPS clean steps: outputs judged on NaN/Inf only


@dataclass
class RankFinding:
    """Where something first went wrong, over all ranks: the rank, step and module."""

    finding: str  # "first NaN/Inf" | "first divergence"
    rank: int
    step: int
    module: str
    kind: str
    order: int  # execution order within the step (outputs) or module index (grads)
    detail: str


@dataclass
class RankComparison:
    run: str
    world_size: int
    reference_rank: int
    margin: float
    unit_roundoff: float
    ranks: list[RankSummary]
    pairs: list[RankPair]
    first_nonfinite: RankFinding | None
    first_divergence: RankFinding | None
    first: RankFinding | None  # the earlier of the two (the NaN/Inf on a tie): what to look at first
    verdict: str  # "match" | "diverged"
    reasons: list[str]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        from crosschip.htmlreport import jsonable

        return {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}


def _when(step: int, kind: str, order: int, rank: int) -> tuple[int, int, int, int]:
    """Sort key: earlier step, outputs (forward) before grads (backward), execution order, lower rank."""
    return step, _KIND_RANK.get(kind, 2), order, rank


def _summary(run: _Run) -> RankSummary:
    steps = run.cols["step"]
    return RankSummary(rank=run.rank, rows=int(steps.size), steps=[int(steps.min()), int(steps.max())] if steps.size
                       else [], grad_scope=str(run.manifest.get("grad_scope", "full")),
                       nonfinite_origin=nonfinite_origin(run), overflow_origin=overflow_origin(run),
                       loss_nonfinite_step=_first_nonfinite_loss(run))


def _spread(a: _Run, b: _Run) -> dict[tuple[str, str], np.ndarray]:
    """(module, output) -> the spread of each FLOAT_STATS between the two ranks: the larger of the median over
    steps of |a - b| / scale(a) of that module and the same median over every module (a statistic nearly
    independent of the data, like an RMSNorm output's l2, would otherwise get a tolerance its rare
    data-dependent steps exceed). Only steps where neither holds a NaN/Inf count: after a NaN has spread,
    both ranks are NaN alike (a difference of 0), which must not shrink the spread. With fewer than
    MIN_SPREAD_STEPS such steps the spread is inf: those floats are not judged."""
    ia, ib = _align(a, b)
    clean = (a.cols["nan"][ia] + a.cols["inf"][ia] + b.cols["nan"][ib] + b.cols["inf"][ib]) == 0
    rel = np.stack([_rel_diff(a.cols[s][ia], b.cols[s][ib], _scale(a, ia, s)) for s in FLOAT_STATS], 1)
    rel[~clean] = np.nan
    groups: dict[tuple[str, str], list[int]] = {}
    for j, i in enumerate(ia.tolist()):
        if a.cols["kind"][i] == "output":  # grads: absent = the precision floor alone
            groups.setdefault((a.cols["module"][i], "output"), []).append(j)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: no finite step, the floor alone
        outputs = [j for idx in groups.values() for j in idx]
        pooled = np.nan_to_num(np.nanmedian(rel[outputs], axis=0), nan=0.0) if outputs else 0.0
        return {key: np.fmax(np.nanmedian(rel[idx], axis=0), pooled) if clean[idx].sum() >= MIN_SPREAD_STEPS
                else np.full(len(FLOAT_STATS), np.inf) for key, idx in groups.items()}


def _pair(ref: _Run, other: _Run, margin: float, unit: float) -> RankPair:
    """Outputs against their own cross-rank spread; full grads against the floor; local-shard grads not at all."""
    shards = "local shard" in (ref.manifest.get("grad_scope"), other.manifest.get("grad_scope"))
    kinds = ["output"] if shards else ["output", "grad"]
    a, b = _subset(ref, kinds), _subset(other, kinds)
    spread = _spread(a, b)
    al = _compare_rows(a, b, spread, margin, unit, CROSS_RANK_COUNTS)
    div, n_bad = _first_divergence(a, b, al)
    unjudged = sorted(m for (m, _), med in spread.items() if np.isinf(med).all())
    return RankPair(rank=other.rank, aligned_rows=int(al.ia.size), divergent_rows=n_bad, compared=kinds,
                    first_divergence=div, outputs_counts_only=unjudged)


def _earliest(found: list[tuple[int, Any]]) -> tuple[int, Any] | None:
    """The (rank, event) that happened first: by step, then kind, forward order and rank."""
    return min(found, key=lambda f: _when(f[1].step, f[1].kind, f[1].order, f[0])) if found else None


def _first_nonfinite(summaries: list[RankSummary]) -> RankFinding | None:
    first = _earliest([(s.rank, s.nonfinite_origin) for s in summaries if s.nonfinite_origin is not None])
    if first is None:
        return None
    rank, o = first
    return RankFinding("first NaN/Inf", rank, o.step, o.module, o.kind, o.order,
                       f"nan {o.nan}, inf {o.inf}, input non-finite {o.in_nonfinite}; {o.note}")


def _first_divergence_over(pairs: list[RankPair], reference: int) -> RankFinding | None:
    first = _earliest([(p.rank, p.first_divergence) for p in pairs if p.first_divergence is not None])
    if first is None:
        return None
    rank, d = first
    return RankFinding("first divergence", rank, d.step, d.module, d.kind, d.order,
                       f"vs rank {reference}: {d.statistic} {d.a:.6g} -> {d.b:.6g}, rel diff {d.rel_diff:.3g} > "
                       f"tol {d.tolerance:.3g} ({d.tolerance_source})")


def _load_ranks(run: Path, reference: int) -> list[_Run]:
    from crosschip.probe import store

    recorded = store.ranks(run)
    if not recorded:
        store.read_manifest(run)  # raises the usual "has no probe recording"
    if len(recorded) < 2:
        raise CrosschipError(f"{run} holds the probe recording of one rank only",
                             "record under torchrun with --probe stats, or compare two runs with probe compare")
    if reference not in recorded:
        raise CrosschipError(f"{run} has no probe recording of rank {reference}",
                             f"pass --reference one of {', '.join(map(str, recorded))}")
    return [_load(run, r) for r in recorded]


def compare_ranks(run: Path, *, reference: int = 0, margin: float = DEFAULT_MARGIN) -> RankComparison:
    """Every recorded rank of `run` against `reference`; names the first rank, step and module that went wrong."""
    check_margin(margin)
    run = Path(run)
    runs = _load_ranks(run, reference)
    ref = next(r for r in runs if r.rank == reference)
    coarser = max((_precision(r.manifest, r.path) for r in runs), key=lambda p: UNIT_ROUNDOFF[p])
    unit = UNIT_ROUNDOFF[coarser]
    summaries = [_summary(r) for r in runs]
    pairs = [_pair(ref, r, margin, unit) for r in runs if r.rank != reference]
    nonfinite, divergence = _first_nonfinite(summaries), _first_divergence_over(pairs, reference)
    candidates = [f for f in (nonfinite, divergence) if f is not None]  # NaN first: min keeps the first of ties
    first = min(candidates, key=lambda f: _when(f.step, f.kind, f.order, f.rank), default=None)
    reasons = [f"{f.finding}: rank {f.rank}, step {f.step}, {f.module} ({f.kind})" for f in candidates]
    losses = [(s.loss_nonfinite_step, s.rank) for s in summaries if s.loss_nonfinite_step is not None]
    if losses:
        step, rank = min(losses)
        reasons.append(f"first non-finite loss: rank {rank}, step {step}")
    world = {int(r.manifest.get("world_size", 1)) for r in runs}
    notes = [] if world == {len(runs)} else [f"manifests say world size {sorted(world)}, {len(runs)} ranks recorded"]
    if any(p.outputs_counts_only for p in pairs):
        notes.append(f"outputs of modules with fewer than {MIN_SPREAD_STEPS} steps free of NaN/Inf on both ranks are "
                     "judged on their NaN/Inf counts only (too few steps for a spread)")
    if any(p.compared == ["output"] for p in pairs):
        notes.append("gradients are local shards (FSDP2): not compared between ranks, only checked for NaN/Inf")
    return RankComparison(
        run=str(run), world_size=max(world), reference_rank=reference, margin=margin, unit_roundoff=unit,
        ranks=summaries, pairs=pairs, first_nonfinite=nonfinite, first_divergence=divergence, first=first,
        verdict="diverged" if reasons else "match", reasons=reasons, notes=notes,
    )
