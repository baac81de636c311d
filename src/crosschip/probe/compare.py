"""Compare two probe recordings: where (step, module) do they part, and where did the first NaN/Inf appear.

Runs are read only through `crosschip.probe.store` (manifest, per-step per-module statistics, per-step
loss), one rank's recording each (`rank_a`, `rank_b`; 0 by default): two ranks of one run, or the same
rank of two runs (before and after a chip move). Every rank of one run at once: crosschip.probe.ranks.
Rows are aligned on (step, module, kind) present in both runs (inner join); what only one run
recorded is listed, not compared.

Tolerance, per statistic s in (mean, std, absmax, l2) and row (step, module, kind):
    tol = max(margin * noise_rel[module, kind, s], margin * u * sqrt(step))
- noise_rel is the reference's own run-to-run noise: with `noise` = a second recording of the reference
  configuration (another data-order seed, another device, or an fp64 replay), the median over steps of
  |A - N| / scale(A). This is the issue's "tolerance from the reference's own noise"; msprobe's run_ut
  similarly judges a device's error against a reference's own error level with ratio thresholds 2-10
  (/work/shared/reference/parity-tools.md, section 2), hence the default margin of 10 (a median is a
  typical value; single steps scatter above it).
- u is the unit roundoff of the coarser precision of the two runs (fp32 2^-24, bf16 2^-8, fp16 2^-11) and
  sqrt(step) lets independent rounding errors accumulate like a random walk over the steps. This floor is
  crosschip's own choice, not a derived bound: training amplifies differences (often faster than
  sqrt(step)), so without a noise run two runs on different kernels usually leave it after a few steps.
  Pass a noise run for a tolerance that means "more than the reference differs from itself".
scale(A) is |A| for std, absmax and l2. For the mean it is max(|mean|, rms) with rms = l2 / sqrt(numel):
rounding moves the mean by up to u * mean|x| <= u * rms, so a mean that cancels to ~0 is judged on the
tensor's scale instead of flagging every rounding bit as a huge relative change.
Counts (nan, inf, over_fp16) are compared exactly: any difference is a divergence regardless of
tolerance (zeros are reported, not judged: underflow legitimately differs between precisions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from crosschip.errors import CrosschipError

FLOAT_STATS = ("mean", "std", "absmax", "l2")
COUNT_STATS = ("nan", "inf", "over_fp16")
UNIT_ROUNDOFF = {"fp64": 2.0**-53, "fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}
_ALIASES = {"float64": "fp64", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
DEFAULT_MARGIN = 10.0
TINY = 1e-30  # denominators: an exactly-zero statistic in A makes any change in B infinitely relative
MAX_DRIFT_COLUMNS = 120  # longer runs are binned (max over each bin) so the heat map stays readable
_KIND_RANK = {"output": 0, "grad": 1}  # within a step: outputs (forward) before grads (backward)
_COLUMNS = ("step", "module", "kind", "order", "in_nonfinite", "numel", *FLOAT_STATS, *COUNT_STATS)


@dataclass
class Origin:
    """A row where something first went wrong in one run (first NaN/Inf, or first overflow)."""

    step: int
    module: str
    kind: str
    order: int
    nan: int
    inf: int
    over_fp16: int
    in_nonfinite: int  # -1 for grads / no tensor input
    absmax: float
    note: str = ""


@dataclass
class Divergence:
    """The first row (step, then execution order) where B leaves A's tolerance."""

    step: int
    module: str
    kind: str
    order: int
    statistic: str
    a: float
    b: float
    rel_diff: float
    tolerance: float
    tolerance_source: str  # "noise" | "floor" | "exact" (counts)
    failing: list[dict[str, Any]] = field(default_factory=list)  # every statistic out of tolerance on this row


@dataclass
class RunSummary:
    path: str
    device: str
    precision: str
    mode: str
    rows: int
    steps: list[int]  # [first, last] recorded step
    modules: int
    nonfinite_origin: Origin | None
    overflow_origin: Origin | None
    loss_nonfinite_step: int | None
    rank: int = 0
    world_size: int = 1
    grad_scope: str = "full"  # "local shard": FSDP2 gradients, this rank's shard only


@dataclass
class ProbeComparison:
    run_a: RunSummary
    run_b: RunSummary
    noise: str | None
    margin: float
    unit_roundoff: float
    coarser_precision: str
    aligned_rows: int
    aligned_steps: int
    only_in_a: dict[str, list[Any]]  # {"modules": [...], "steps": [...]}
    only_in_b: dict[str, list[Any]]
    first_divergence: Divergence | None
    divergent_rows: int
    verdict: str  # "match" | "diverged"
    reasons: list[str]
    loss: dict[str, list[Any]]  # {"steps", "a", "b", "grad_norm_a", "grad_norm_b"}
    drift: dict[str, Any]  # {"rows", "kinds", "columns", "values"}: max over statistics of rel diff / tol
    worst: list[dict[str, Any]]  # rows (module, kind) with the largest drift ratio, largest first
    noise_rel: list[dict[str, Any]]  # per (module, kind): median relative noise per statistic
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        from crosschip.htmlreport import jsonable

        return {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}


# ---------------------------------------------------------------- loading


@dataclass
class _Run:
    path: Path
    manifest: dict[str, Any]
    cols: dict[str, np.ndarray]
    steps: dict[str, np.ndarray]
    index: dict[tuple[int, str, str], int]  # (step, module, kind) -> row
    rank: int = 0


def _precision(manifest: dict[str, Any], path: Path) -> str:
    raw = str(manifest.get("precision", "")).lower()
    name = _ALIASES.get(raw, raw)
    if name not in UNIT_ROUNDOFF:
        raise CrosschipError(f"probe recording {path} has unknown precision {raw!r}",
                             f"record with one of {', '.join(UNIT_ROUNDOFF)}")
    return name


def _load(path: Path, rank: int = 0) -> _Run:
    from crosschip.probe import store

    path = Path(path)
    manifest = store.read_manifest(path, rank)
    table = store.read_stats(path, rank)
    missing = [c for c in _COLUMNS if c not in table.column_names]
    if missing:
        raise CrosschipError(f"probe stats of {path} lack columns {missing}", "re-record with this crosschip version")
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in _COLUMNS}
    for c in FLOAT_STATS:
        cols[c] = cols[c].astype(np.float64)
    steps_table = store.read_steps(path, rank)
    steps = {c: steps_table.column(c).to_numpy(zero_copy_only=False) for c in steps_table.column_names}
    return _Run(path, manifest, cols, steps, _index(cols), rank)


def _index(cols: dict[str, np.ndarray]) -> dict[tuple[int, str, str], int]:
    """(step, module, kind) -> row; a module called twice in a step (shared or re-entered) keeps its first call."""
    index: dict[tuple[int, str, str], int] = {}
    order = cols["order"]
    for i, key in enumerate(zip(cols["step"].tolist(), cols["module"].tolist(), cols["kind"].tolist(), strict=True)):
        j = index.get(key)
        if j is None or order[i] < order[j]:
            index[key] = i
    return index


def _subset(run: _Run, kinds: Sequence[str]) -> _Run:
    """`run` restricted to rows of the given kinds (output, grad)."""
    keep = np.isin(run.cols["kind"], list(kinds))
    cols = {c: v[keep] for c, v in run.cols.items()}
    return _Run(run.path, run.manifest, cols, run.steps, _index(cols), run.rank)


# ---------------------------------------------------------------- relative differences


def _scale(run: _Run, rows: np.ndarray, stat: str) -> np.ndarray:
    """The denominator of the relative difference of `stat` (see the module docstring)."""
    a = np.abs(run.cols[stat][rows])
    if stat == "mean":
        numel = np.maximum(run.cols["numel"][rows].astype(np.float64), 1.0)
        a = np.fmax(a, run.cols["l2"][rows] / np.sqrt(numel))  # fmax: a NaN l2 does not poison |mean|
    return np.fmax(a, TINY)


def _rel_diff(a: np.ndarray, b: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """|a - b| / scale; equal values (both NaN, same Inf) give 0, a one-sided non-finite value gives inf."""
    with np.errstate(all="ignore"):
        rel = np.abs(a - b) / scale
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    rel = np.where(same, 0.0, rel)
    return np.where(np.isnan(rel), np.inf, rel)


def _noise_rel(ref: _Run, noise: _Run) -> tuple[dict[tuple[str, str], np.ndarray], list[str]]:
    """(module, kind) -> median over steps of the relative difference ref vs noise, per FLOAT_STATS."""
    ia, inn = _align(ref, noise)
    rel = np.stack([_rel_diff(ref.cols[s][ia], noise.cols[s][inn], _scale(ref, ia, s)) for s in FLOAT_STATS], 1)
    groups: dict[tuple[str, str], list[int]] = {}
    for j, i in enumerate(ia.tolist()):
        groups.setdefault((ref.cols["module"][i], ref.cols["kind"][i]), []).append(j)
    medians = {key: np.median(rel[idx], axis=0) for key, idx in groups.items()}
    notes = []
    if any(np.isinf(m).any() for m in medians.values()):
        notes.append("the noise run is non-finite where the reference is not on most steps of some rows: "
                     "their tolerance is infinite")
    return medians, notes


# ---------------------------------------------------------------- origins


def _is_inside(child: str, parent: str) -> bool:
    return child != parent and (parent == "" or child.startswith(parent + "."))


def _most_specific(candidates: Sequence[int], run: _Run) -> int:
    """The first candidate, descending into any candidate submodule of it (pre- or post-order hooks alike)."""
    names = run.cols["module"]
    best = candidates[0]
    while True:
        inner = next((c for c in candidates if _is_inside(names[c], names[best])), None)
        if inner is None:
            return best
        best = inner


def _origin(run: _Run, mask: np.ndarray, finite_input: bool, note: str) -> Origin | None:
    """The earliest step with a row in mask, then the first such row in execution order (outputs first)."""
    c = run.cols
    if finite_input:  # outputs must have had a finite (or non-tensor) input; grads have no input
        mask = mask & ((c["kind"] != "output") | (c["in_nonfinite"] <= 0))
    rows = np.flatnonzero(mask)
    if rows.size == 0:
        return None
    step = c["step"][rows].min()
    rows = rows[c["step"][rows] == step]
    rank = np.array([_KIND_RANK.get(k, 2) for k in c["kind"][rows]])
    rows = rows[np.lexsort((c["order"][rows], rank))]
    same_kind = [int(r) for r in rows if c["kind"][r] == c["kind"][rows[0]]]
    i = _most_specific(same_kind, run)
    if finite_input and c["kind"][i] == "grad":
        note = "gradient: " + note.removeprefix("output ").replace(", input finite", "")
    return Origin(step=int(c["step"][i]), module=str(c["module"][i]), kind=str(c["kind"][i]),
                  order=int(c["order"][i]), nan=int(c["nan"][i]), inf=int(c["inf"][i]),
                  over_fp16=int(c["over_fp16"][i]), in_nonfinite=int(c["in_nonfinite"][i]),
                  absmax=float(c["absmax"][i]), note=note)


def nonfinite_origin(run: _Run) -> Origin | None:
    """First step with any NaN/Inf; there the first module whose input was finite and output was not.

    Without such an output (only grads went non-finite) the first grad row with NaN/Inf; if every
    non-finite output already had a non-finite input, the first of them, with a note saying so."""
    c = run.cols
    bad = (c["nan"] + c["inf"]) > 0
    if not bad.any():
        return None
    first = c["step"][bad].min()
    in_step = bad & (c["step"] == first)
    found = _origin(run, in_step & (c["kind"] == "output"), True, "output non-finite, input finite")
    found = found or _origin(run, in_step & (c["kind"] == "grad"), False, "first non-finite gradient")
    return found or _origin(run, in_step, False, "input already non-finite: the cause precedes the recorded modules")


def overflow_origin(run: _Run) -> Origin | None:
    """First step and module whose output went beyond fp16's range (over_fp16 > 0) or to Inf from a finite input."""
    c = run.cols
    return _origin(run, (c["over_fp16"] > 0) | (c["inf"] > 0), True, "output beyond fp16 range, input finite")


def _first_nonfinite_loss(run: _Run) -> int | None:
    loss = run.steps.get("loss")
    if loss is None or loss.size == 0:
        return None
    bad = ~np.isfinite(loss.astype(np.float64))
    return int(run.steps["step"][bad].min()) if bad.any() else None


def _summary(run: _Run, precision: str) -> RunSummary:
    steps = run.cols["step"]
    return RunSummary(
        path=str(run.path), device=str(run.manifest.get("device", "")), precision=precision,
        mode=str(run.manifest.get("mode", "")), rows=int(steps.size),
        steps=[int(steps.min()), int(steps.max())] if steps.size else [],
        modules=len(set(run.cols["module"].tolist())), nonfinite_origin=nonfinite_origin(run),
        overflow_origin=overflow_origin(run), loss_nonfinite_step=_first_nonfinite_loss(run),
        rank=run.rank, world_size=int(run.manifest.get("world_size", 1)),
        grad_scope=str(run.manifest.get("grad_scope", "full")),
    )


# ---------------------------------------------------------------- alignment and tolerance


@dataclass
class _Aligned:
    ia: np.ndarray  # rows of A, sorted by (step, kind, order)
    ib: np.ndarray  # the matching rows of B
    rel: np.ndarray  # [n, len(FLOAT_STATS)] relative differences
    tol: np.ndarray  # [n, len(FLOAT_STATS)] tolerances
    from_noise: np.ndarray  # [n, len(FLOAT_STATS)] whether the noise term set the tolerance
    count_diff: np.ndarray  # [n, len(counts)] bool: counts differ
    ratio: np.ndarray  # [n] max over statistics of rel / tol (inf on a count difference)
    counts: tuple[str, ...] = COUNT_STATS  # the counts compared exactly


def _label(run: _Run) -> str:
    return f"{run.path}" if run.rank == 0 else f"{run.path} (rank {run.rank})"


def _align(a: _Run, b: _Run) -> tuple[np.ndarray, np.ndarray]:
    common = [(ia, b.index[k]) for k, ia in a.index.items() if k in b.index]
    if not common:
        raise CrosschipError(f"{_label(a)} and {_label(b)} share no (step, module) rows",
                             "record both runs with the same --probe-modules and --probe-steps")
    ia = np.array([c[0] for c in common])
    ib = np.array([c[1] for c in common])
    rank = np.array([_KIND_RANK.get(k, 2) for k in a.cols["kind"][ia]])
    order = np.lexsort((a.cols["order"][ia], rank, a.cols["step"][ia]))
    return ia[order], ib[order]


def _compare_rows(a: _Run, b: _Run, noise: dict[tuple[str, str], np.ndarray] | None, margin: float,
                  unit: float, counts: tuple[str, ...] = COUNT_STATS) -> _Aligned:
    ia, ib = _align(a, b)
    rel = np.stack([_rel_diff(a.cols[s][ia], b.cols[s][ib], _scale(a, ia, s)) for s in FLOAT_STATS], 1)
    # floor: [n, 1]; rounding drift allowed to grow like a random walk over the steps
    floor = margin * unit * np.sqrt(np.maximum(a.cols["step"][ia], 1).astype(np.float64))[:, None]
    noise_term = np.zeros_like(rel)
    if noise is not None:
        zero = np.zeros(len(FLOAT_STATS))
        keys = zip(a.cols["module"][ia].tolist(), a.cols["kind"][ia].tolist(), strict=True)
        noise_term = margin * np.stack([noise.get(k, zero) for k in keys])
    tol = np.maximum(noise_term, floor)
    count_diff = np.stack([a.cols[s][ia] != b.cols[s][ib] for s in counts], 1)
    with np.errstate(all="ignore"):
        ratio = np.where(rel == 0, 0.0, rel / tol).max(axis=1)
    ratio = np.where(count_diff.any(axis=1), np.inf, ratio)
    return _Aligned(ia, ib, rel, tol, noise_term > floor, count_diff, ratio, counts)


def _divergent(al: _Aligned) -> np.ndarray:
    return al.count_diff.any(axis=1) | (al.rel > al.tol).any(axis=1)


def _first_divergence(a: _Run, b: _Run, al: _Aligned) -> tuple[Divergence | None, int]:
    bad = np.flatnonzero(_divergent(al))
    if bad.size == 0:
        return None, 0
    # the first diverging row's step and kind, refined into a diverging submodule if one exists there
    step, kind = a.cols["step"][al.ia[bad[0]]], a.cols["kind"][al.ia[bad[0]]]
    same = [int(j) for j in bad if a.cols["step"][al.ia[j]] == step and a.cols["kind"][al.ia[j]] == kind]
    by_row = {int(al.ia[j]): j for j in same}
    j = by_row[_most_specific([int(al.ia[j]) for j in same], a)]
    i, k = int(al.ia[j]), int(al.ib[j])
    failing: list[dict[str, Any]] = []
    for n, s in enumerate(al.counts):
        if al.count_diff[j, n]:
            va, vb = int(a.cols[s][i]), int(b.cols[s][k])
            failing.append({"statistic": s, "a": va, "b": vb, "rel_diff": abs(va - vb) / max(abs(va), 1),
                            "tolerance": 0.0, "tolerance_source": "exact", "ratio": math.inf})
    for n, s in enumerate(FLOAT_STATS):
        if al.rel[j, n] > al.tol[j, n]:
            failing.append({"statistic": s, "a": float(a.cols[s][i]), "b": float(b.cols[s][k]),
                            "rel_diff": float(al.rel[j, n]), "tolerance": float(al.tol[j, n]),
                            "tolerance_source": "noise" if al.from_noise[j, n] else "floor",
                            "ratio": float(al.rel[j, n] / al.tol[j, n])})
    head = failing[0] if failing[0]["tolerance_source"] == "exact" else max(failing, key=lambda f: f["ratio"])
    div = Divergence(step=int(step), module=str(a.cols["module"][i]), kind=str(kind), order=int(a.cols["order"][i]),
                     statistic=head["statistic"], a=head["a"], b=head["b"], rel_diff=head["rel_diff"],
                     tolerance=head["tolerance"], tolerance_source=head["tolerance_source"], failing=failing)
    return div, int(bad.size)


# ---------------------------------------------------------------- curves and drift matrix


def _curve(run: _Run, name: str, steps: list[int]) -> list[float | None]:
    values = run.steps.get(name)
    if values is None:
        return [None] * len(steps)
    by_step = dict(zip(run.steps["step"].tolist(), values.astype(np.float64).tolist(), strict=True))
    return [by_step.get(s) for s in steps]


def _loss_curves(a: _Run, b: _Run) -> dict[str, list[Any]]:
    steps = sorted(set(a.steps.get("step", np.array([])).tolist()) | set(b.steps.get("step", np.array([])).tolist()))
    return {"steps": steps, "a": _curve(a, "loss", steps), "b": _curve(b, "loss", steps),
            "grad_norm_a": _curve(a, "grad_norm", steps), "grad_norm_b": _curve(b, "grad_norm", steps)}


def _drift(a: _Run, al: _Aligned) -> dict[str, Any]:
    """Rows (module, kind): outputs in execution order, then grads; columns: steps (binned when many)."""
    c = a.cols
    first_order: dict[tuple[str, str], tuple[int, int]] = {}
    for i in al.ia.tolist():
        key = (c["module"][i], c["kind"][i])
        first_order.setdefault(key, (_KIND_RANK.get(key[1], 2), int(c["order"][i])))
    rows = sorted(first_order, key=lambda k: first_order[k])
    steps = sorted(set(c["step"][al.ia].tolist()))
    n_cols = min(len(steps), MAX_DRIFT_COLUMNS)
    col_of_step = {s: (k * n_cols) // len(steps) for k, s in enumerate(steps)}
    bins: list[list[int]] = [[] for _ in range(n_cols)]
    for s, col in col_of_step.items():
        bins[col].append(s)
    labels = [str(b[0]) if len(b) == 1 else f"{b[0]}-{b[-1]}" for b in bins]
    row_of = {k: r for r, k in enumerate(rows)}
    ri = np.array([row_of[(c["module"][i], c["kind"][i])] for i in al.ia.tolist()])
    ci = np.array([col_of_step[s] for s in c["step"][al.ia].tolist()])
    matrix = np.full((len(rows), n_cols), -1.0)  # -1: not recorded in both runs
    np.maximum.at(matrix, (ri, ci), al.ratio)
    values = [[None if v < 0 else float(v) for v in line] for line in matrix.tolist()]
    return {"rows": [r[0] for r in rows], "kinds": [r[1] for r in rows], "columns": labels, "values": values,
            "meaning": "max over mean/std/absmax/l2 of relative difference / tolerance (>1: out of tolerance; "
                       "inf: a NaN/Inf/over-fp16 count differs)"}


def _worst(drift: dict[str, Any], top: int = 10) -> list[dict[str, Any]]:
    peaks = []
    for name, kind, line in zip(drift["rows"], drift["kinds"], drift["values"], strict=True):
        present = [(v, col) for col, v in enumerate(line) if v is not None]
        if present:
            v = max(p[0] for p in present)
            col = next(c for x, c in present if x == v)  # where it first peaks
            peaks.append((-v, col, {"module": name, "kind": kind, "max_ratio": v, "at": drift["columns"][col]}))
    peaks.sort(key=lambda p: p[:2])  # largest first; among equals (inf), the earliest
    return [p[2] for p in peaks[:top] if p[2]["max_ratio"] > 0]


# ---------------------------------------------------------------- entry point


def _only_in(x: _Run, y: _Run) -> dict[str, list[Any]]:
    mods = sorted(set(x.cols["module"].tolist()) - set(y.cols["module"].tolist()))
    steps = sorted(set(x.cols["step"].tolist()) - set(y.cols["step"].tolist()))
    return {"modules": mods, "steps": [int(s) for s in steps]}


def _verdict(div: Divergence | None, sa: RunSummary, sb: RunSummary) -> tuple[str, list[str]]:
    reasons = []
    if div is not None:
        reasons.append(f"first divergence at step {div.step}, {div.module} ({div.kind}): {div.statistic}")
    if sb.nonfinite_origin is not None and sa.nonfinite_origin is None:
        o = sb.nonfinite_origin
        reasons.append(f"B has NaN/Inf from step {o.step}, {o.module} ({o.kind}); A has none")
    if sb.loss_nonfinite_step is not None and sa.loss_nonfinite_step is None:
        reasons.append(f"B's loss is non-finite from step {sb.loss_nonfinite_step}; A's never is")
    return ("diverged" if reasons else "match"), reasons


def check_margin(margin: float) -> None:
    if not (margin > 0 and math.isfinite(margin)):
        raise CrosschipError(f"--margin must be a positive number (got {margin})",
                             f"pass e.g. --margin {DEFAULT_MARGIN:g}")


def compare_runs(run_a: Path, run_b: Path, *, noise: Path | None = None, margin: float = DEFAULT_MARGIN,
                 rank_a: int = 0, rank_b: int = 0) -> ProbeComparison:
    """Compare probe recordings: A is the reference, B the run under test, noise a second recording of A's setup.

    `rank_a`/`rank_b` pick the rank of each run (the same run twice compares two of its ranks; see
    crosschip.probe.ranks for what that means under DDP); the noise run is read at `rank_a`."""
    check_margin(margin)
    a, b = _load(Path(run_a), rank_a), _load(Path(run_b), rank_b)
    pa, pb = _precision(a.manifest, a.path), _precision(b.manifest, b.path)
    coarser = pa if UNIT_ROUNDOFF[pa] >= UNIT_ROUNDOFF[pb] else pb
    notes: list[str] = []
    noise_med = None
    if noise is not None:
        noise_med, noise_notes = _noise_rel(a, _load(Path(noise), rank_a))
        notes += noise_notes
    else:
        notes.append("no noise run: tolerance is the precision floor margin * u * sqrt(step) only; pass --noise "
                     "(the reference configuration recorded again with another seed or device) for one that "
                     "reflects the reference's own run-to-run noise")
    if a.path.resolve() == b.path.resolve() and rank_a != rank_b:
        notes.append(f"ranks {rank_a} and {rank_b} of one run: under DDP each rank trains on its own batch, so their "
                     "output statistics differ by design while full gradients should agree; `crosschip probe ranks "
                     "RUN` judges outputs against their usual spread between ranks")
    al = _compare_rows(a, b, noise_med, margin, UNIT_ROUNDOFF[coarser])
    div, n_bad = _first_divergence(a, b, al)
    sa, sb = _summary(a, pa), _summary(b, pb)
    verdict, reasons = _verdict(div, sa, sb)
    drift = _drift(a, al)
    noise_rows = [{"module": m, "kind": k, **{s: float(v) for s, v in zip(FLOAT_STATS, med, strict=True)}}
                  for (m, k), med in (noise_med or {}).items()]
    return ProbeComparison(
        run_a=sa, run_b=sb, noise=None if noise is None else str(noise), margin=margin,
        unit_roundoff=UNIT_ROUNDOFF[coarser], coarser_precision=coarser, aligned_rows=int(al.ia.size),
        aligned_steps=len(set(a.cols["step"][al.ia].tolist())), only_in_a=_only_in(a, b), only_in_b=_only_in(b, a),
        first_divergence=div, divergent_rows=n_bad, verdict=verdict, reasons=reasons, loss=_loss_curves(a, b),
        drift=drift, worst=_worst(drift), noise_rel=noise_rows, notes=notes,
    )
