"""The comparisons `crosschip verify` makes, and the gates each is judged by.

- **conversion**: the reference against a checkpoint run in-process (the target itself, or the checkpoint an
  endpoint serves), with the golden (golden.py: the reference converted by crosschip into that checkpoint's
  format) scored on the same tokens. The golden's figures are the floor the gates are measured from, per
  distribution statistic and per layer; without a golden the precision-class constants apply.
- **fidelity** (endpoints serving a known checkpoint): the endpoint against crosschip's own load of that
  checkpoint. Its floor is the same checkpoint run in-process in the endpoint's compute dtype, scored with the
  same top-K estimator, so the gate is "what two numerics of one checkpoint differ by".
- **served**: the reference against the endpoint, end to end. Gated by the class constants only when the
  served checkpoint is unknown (one-sided verification); otherwise reported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from crosschip import checkpoint
from crosschip.errors import CrosschipError
from crosschip.verify import gates as G
from crosschip.verify.golden import golden_checkpoint
from crosschip.verify.metrics import DistributionMetrics, GreedyMetrics, distribution_metrics, greedy_metrics
from crosschip.verify.sides import CheckpointSide, MetricUnavailable
from crosschip.verify.types import GreedyRun, Side, TokenScores

Log = Callable[[str], None]
FULL_TOP_K = 5  # top-K kept per position when both sides give full distributions (top-5 overlap)
FIDELITY_DEFAULT_DTYPE = "bf16"  # what vLLM's dtype "auto" serves an fp32 checkpoint in


@dataclass
class Pair:
    """One comparison: what was measured, the floor it is judged against, and the gate results."""

    distribution: DistributionMetrics | None = None
    greedy: GreedyMetrics | None = None
    floor: DistributionMetrics | None = None
    floor_what: str = ""
    layers: Any = None  # layers.LayerResult
    gates: list[G.GateResult] = field(default_factory=list)
    thresholds: G.Gates | None = None
    basis: str = "class"  # "measured" (a floor) or "class" (precision-class constants)
    unavailable: dict[str, str] = field(default_factory=dict)
    scores: tuple[list[TokenScores], list[TokenScores]] | None = None  # (ref, target), for reuse

    def section(self) -> dict[str, Any]:
        """The JSON section of the report (layers and gates are reported separately)."""
        floor = self.floor.to_dict(max_kl_values=0) if self.floor is not None else None
        if floor is not None:
            for key in ("kl_values", "per_position_kl"):
                floor.pop(key, None)
        return {"distribution": None if self.distribution is None else self.distribution.to_dict(),
                "greedy": None if self.greedy is None else self.greedy.to_dict(),
                "floor": floor, "floor_what": self.floor_what, "gate_basis": self.basis,
                "gate_source": self.thresholds.source if self.thresholds is not None else None}


def batches(rows: list[list[int]], batch_size: int) -> list[torch.Tensor]:
    # each: int64 [B, T]
    return [torch.tensor(rows[i : i + batch_size], dtype=torch.long) for i in range(0, len(rows), batch_size)]


def dtype_class(dtype: str | None) -> str:
    return dtype if dtype in ("fp32", "bf16", "fp16") else "fp32"


def greedy_runs(side: Side, prompts: list[list[int]], max_new: int, top_n: int) -> list[GreedyRun]:
    return [side.greedy(p, max_new, top_n) for p in prompts]


def _judge(pair: Pair, precision: str, compute: str, group: str, overrides: dict[str, float | None]) -> None:
    """Set the pair's thresholds (measured from its floor, else the class constants) and evaluate them."""
    measured = G.measured_gates(pair.floor, compute, what=pair.floor_what) if pair.floor is not None else None
    if measured is not None:
        pair.basis = "measured"
        base = measured
    else:
        base = G.DEFAULT_GATES[precision]
    pair.thresholds = G.apply_overrides(base, overrides)
    pair.gates = G.evaluate(pair.distribution, pair.greedy, pair.thresholds, group=group)


# ---------------------------------------------------------------- conversion: ref vs an in-process checkpoint


def score_in_process(opts: Any, ref: CheckpointSide, tgt: CheckpointSide, golden: CheckpointSide | None,
                      rows: list[list[int]], precision: str, log: Log) -> tuple[Pair, list[TokenScores] | None]:
    """Teacher-forced scores of ref, target and golden (and the layer result when asked); returns the pair and
    the golden's scores."""
    pair = Pair()
    if opts.layers:
        from crosschip.verify.layers import localize

        log(f"teacher-forced pass with layer localization: {len(rows)} rows x {len(rows[0])} tokens"
            + (" (+ golden)" if golden is not None else ""))
        result = localize(ref.model, tgt.model, batches(rows, opts.batch_size), isolated=opts.isolated,
                          tgt_precision=precision, compute_precision=dtype_class(tgt.dtype),
                          golden=golden.model if golden is not None else None)
        k = min(opts.top_k, FULL_TOP_K)  # full distributions: exact KL needs no wider top-K
        ref_scores = ref.scores_from_logits(rows, result.ref_logits, k)
        tgt_scores = tgt.scores_from_logits(rows, result.tgt_logits, k)
        gold = tgt.scores_from_logits(rows, result.golden_logits, k) if result.golden_logits else None
        pair.layers = result
    else:
        log(f"teacher-forced pass: {len(rows)} rows x {len(rows[0])} tokens")
        ref_scores, tgt_scores = ref.score(rows, opts.top_k), tgt.score(rows, opts.top_k)
        gold = golden.score(rows, opts.top_k) if golden is not None else None
    pair.scores = (ref_scores, tgt_scores)
    pair.distribution = distribution_metrics(ref_scores, tgt_scores, bootstrap=opts.bootstrap)
    return pair, gold


def compare_conversion(opts: Any, ref: CheckpointSide, tgt: CheckpointSide,
                       apply: Callable[[Any], object] | None, rows: list[list[int]], greedy_prompts: list[list[int]],
                       precision: str, log: Log) -> tuple[Pair, dict[str, Any]]:
    """The reference against an in-process checkpoint, judged against the golden; returns (pair, golden info).

    The golden runs on the target's device and dtype; `apply` gives it an emulated chip's dtype and activation
    format without its saturation (run.py), so an emulated overflow stays the target's own error.
    """
    golden_ctx: Any = contextlib.nullcontext((None, {"spec": None, "skipped": "--no-golden"}))
    if opts.golden:
        golden_ctx = golden_checkpoint(Path(ref.checkpoint.path), Path(tgt.checkpoint.path), log)
    with golden_ctx as (golden_path, golden_info):
        golden = None
        if golden_path is not None:
            log(f"loading golden on {tgt.device}:{tgt.dtype}")
            golden = CheckpointSide(golden_path, str(tgt.device), tgt.dtype, apply=apply, verify=False)
        try:
            pair, gold = score_in_process(opts, ref, tgt, golden, rows, precision, log)
        finally:
            if golden is not None:
                golden.close()
    if gold is not None and pair.scores is not None:
        pair.floor = distribution_metrics(pair.scores[0], gold, bootstrap=opts.bootstrap)
        pair.floor_what = "the golden reference conversion"
    if opts.max_new_tokens > 0 and greedy_prompts:
        log(f"greedy continuations: {len(greedy_prompts)} prompts x {opts.max_new_tokens} tokens")
        pair.greedy = greedy_metrics(greedy_runs(ref, greedy_prompts, opts.max_new_tokens, opts.top_n),
                                     greedy_runs(tgt, greedy_prompts, opts.max_new_tokens, opts.top_n), opts.top_n)
    _judge(pair, precision, dtype_class(tgt.dtype), "conversion", opts.gate_overrides)
    if pair.layers is not None:
        route = G.routing_gate(pair.layers.routing)
        if route is not None:
            pair.gates.append(route)
    return pair, golden_info


# ---------------------------------------------------------------- endpoints


def served_checkpoint(opts: Any, endpoint: Any, log: Log) -> tuple[Path | None, str]:
    """The checkpoint an endpoint serves: --served, else its model card's `root` (vLLM puts the --model path
    there) when that is a checkpoint directory on this machine; (None, why) otherwise."""
    if opts.served is not None:
        return Path(opts.served), "--served"
    root = (endpoint.info.identity.get("server") or {}).get("root")
    if isinstance(root, str) and root:
        candidate = Path(root)
        if (candidate / "config.json").is_file():
            log(f"the endpoint serves {candidate} (its model card's root)")
            return candidate, "the model card's root"
        return None, f"the model card's root {root!r} is not a checkpoint directory here"
    return None, "the endpoint names no checkpoint (no model card root); pass --served DIR"


def _without_full(scores: list[TokenScores], k: int) -> list[TokenScores]:
    """Top-k only, as an endpoint returns them: the floor of a fidelity check must use the same estimator."""
    return [replace(s, top_ids=s.top_ids[:, :k], top_logprobs=s.top_logprobs[:, :k], logprobs=None) for s in scores]


def compare_fidelity(opts: Any, served: CheckpointSide, own: list[TokenScores], endpoint: Side,
                     rows: list[list[int]], greedy_prompts: list[list[int]], served_dtype: str,
                     log: Log) -> tuple[Pair, list[TokenScores] | None]:
    """The endpoint against crosschip's own load of the checkpoint it serves (`own`: its scores, with full
    distributions, from the conversion pass); returns the pair and the endpoint's scores (None if it gives none)."""
    pair = Pair()
    try:
        log(f"fidelity: scoring the endpoint on {len(rows)} rows")
        end_scores = endpoint.score(rows, opts.top_k)
    except MetricUnavailable as e:
        pair.unavailable["fidelity"] = str(e)
        end_scores = None
    if end_scores is not None:
        k = min(s.top_ids.shape[1] for s in end_scores)
        pair.distribution = distribution_metrics(own, end_scores, bootstrap=opts.bootstrap)
        log(f"fidelity floor: {served.info.label} against the same checkpoint in {served_dtype}")
        other = CheckpointSide(Path(served.checkpoint.path), str(served.device), served_dtype, verify=False)
        try:
            floor_scores = other.score(rows, opts.top_k)
        finally:
            other.close()
        pair.floor = distribution_metrics(own, _without_full(floor_scores, k), bootstrap=opts.bootstrap)
        pair.floor_what = f"the served checkpoint run in-process in {served_dtype} (same top-{k} estimator)"
    if opts.max_new_tokens > 0 and greedy_prompts:
        try:
            runs = greedy_runs(endpoint, greedy_prompts, opts.max_new_tokens, opts.top_n)
            own_runs = greedy_runs(served, greedy_prompts, opts.max_new_tokens, opts.top_n)
            pair.greedy = greedy_metrics(own_runs, runs, opts.top_n)
        except MetricUnavailable as e:
            pair.unavailable["greedy"] = str(e)
    _judge(pair, served_dtype if served_dtype in G.DEFAULT_GATES else "bf16", served_dtype, "fidelity",
           opts.gate_overrides)
    return pair, end_scores


def compare_served(opts: Any, ref_scores: list[TokenScores] | None, ref: Side, endpoint: Side,
                   end_scores: list[TokenScores] | None, rows: list[list[int]], greedy_prompts: list[list[int]],
                   precision: str, gated: bool, log: Log) -> Pair:
    """The reference against the endpoint, end to end (class constants; gated only when one-sided)."""
    pair = Pair()
    try:
        if end_scores is None:
            end_scores = endpoint.score(rows, opts.top_k)
        if ref_scores is None:
            ref_scores = ref.score(rows, opts.top_k)
        pair.distribution = distribution_metrics(ref_scores, end_scores, bootstrap=opts.bootstrap)
    except MetricUnavailable as e:
        pair.unavailable["distribution"] = str(e)
    if opts.max_new_tokens > 0 and greedy_prompts:
        log(f"greedy continuations: {len(greedy_prompts)} prompts x {opts.max_new_tokens} tokens")
        stops = frozenset().union(*(getattr(s, "stop_ids", frozenset()) for s in (ref, endpoint)))
        endpoint.stop_ids = stops  # type: ignore[attr-defined] - an endpoint returns EOS where we stop before it
        try:
            pair.greedy = greedy_metrics(greedy_runs(ref, greedy_prompts, opts.max_new_tokens, opts.top_n),
                                         greedy_runs(endpoint, greedy_prompts, opts.max_new_tokens, opts.top_n),
                                         opts.top_n)
        except MetricUnavailable as e:
            pair.unavailable["greedy"] = str(e)
    _judge(pair, precision, "bf16", "served", opts.gate_overrides)
    if not gated:
        for g in pair.gates:
            if g.passed is not None:
                g.note = (g.note + "; " if g.note else "") + f"reported, not gated (threshold {g.threshold:g})"
                g.passed, g.threshold = None, None
    return pair


def require_checkpoint_ref(ref: Side, what: str) -> CheckpointSide:
    if not isinstance(ref, CheckpointSide):
        raise CrosschipError(f"{what} needs the reference in-process", "pass --ref CKPT, not an endpoint URL")
    return ref


def checkpoint_dtype(path: Path) -> str:
    """What an engine's dtype 'auto' computes a checkpoint in: its config dtype, fp32 served as bf16."""
    ckpt = checkpoint.open_checkpoint(path, verify=False)
    name = str(getattr(ckpt.config, "dtype", None) or getattr(ckpt.config, "torch_dtype", None) or "")
    return {"bfloat16": "bf16", "float16": "fp16"}.get(name.removeprefix("torch."), FIDELITY_DEFAULT_DTYPE)
