"""Distribution metrics on teacher-forced text, and greedy-divergence metrics on free generation.

Teacher-forced: both sides scored the same token ids, so position t of ref and target predicts the same
next token. Per-token KL(ref || target) in nats, its mean (with a bootstrap CI), p99 and max, top-1
agreement, top-5 overlap and the perplexity ratio (the statistics llama.cpp's `perplexity
--kl-divergence` reports, see ../shared/reference/parity-tools.md).

Greedy: the first position where the two continuations differ, and vLLM's closeness check
(vLLM `tests/models/utils.py` `check_logprobs_close`): at that position each side's token must be in
the other side's top-N logprobs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from crosschip.errors import CrosschipError
from crosschip.verify.types import GreedyRun, TokenScores

KL_EXACT = "exact"
KL_TOPK = "topk+rest (lower bound)"
# float32 top-K probabilities can sum past 1 by rounding (K = V): the rest bucket keeps at least this
# mass on both sides so it stays finite; it moves the KL by well under 1e-6 nats.
REST_FLOOR = 1e-8
# Exact KL works on [rows, V] float64 blocks of at most this many elements (~128 MiB per temporary).
# Bootstrap replicates are drawn in blocks of at most this many indices.
_BOOT_ELEMS = 1 << 22
MAX_REPORT_KL_VALUES = 10_000


@dataclass
class DistributionMetrics:
    """Teacher-forced comparison of two sides (KL in nats, ref || target)."""

    kl_method: str  # KL_EXACT or KL_TOPK
    kl_mean: float
    kl_p99: float
    kl_max: float
    kl_mean_ci: tuple[float, float]  # 95% bootstrap CI of kl_mean
    ci_resampled: str  # "sequences" (>= 2 sequences), "tokens" (a single sequence) or "none"
    bootstrap: int
    top1_agreement: float
    top5_overlap: float | None  # None when a side returned fewer than 5 top logprobs
    ppl_ref: float
    ppl_tgt: float
    ppl_ratio: float  # ppl_tgt / ppl_ref
    tokens: int
    sequences: int
    per_position_kl: list[float]  # mean KL at each position index across sequences
    kl_values: list[float]  # every per-token KL, in sequence order
    unavailable: dict[str, str] = field(default_factory=dict)

    def to_dict(self, max_kl_values: int = MAX_REPORT_KL_VALUES) -> dict[str, Any]:
        """JSON-able dict; kl_values becomes an evenly spaced sample of the sorted values (a quantile sketch,
        so a histogram of it has the shape of the full one) when there are more than max_kl_values."""
        out = asdict(self)
        out["kl_mean_ci"] = list(self.kl_mean_ci)
        values = sorted(self.kl_values)
        keep = max(2, max_kl_values)
        if len(values) > keep:
            step = (len(values) - 1) / (keep - 1)
            values = [values[round(i * step)] for i in range(keep)]
            out["kl_values_sampled"] = True
        out["kl_values"] = values
        return out


@dataclass
class GreedyRow:
    """One prompt's greedy comparison."""

    prompt: int
    ref_tokens: int
    tgt_tokens: int
    first_divergence: int | None  # index of the first differing generated token; None if identical
    matched: int  # tokens equal before the divergence (all of them when identical)
    vllm_close: bool
    ref_token: int | None  # the tokens at the divergence
    tgt_token: int | None
    note: str = ""
    ref_text: str = ""
    tgt_text: str = ""


@dataclass
class GreedyMetrics:
    """Greedy continuations of both sides over the same prompts."""

    prompts: int
    identical: int
    mean_matched: float
    all_vllm_close: bool
    top_n: int
    rows: list[GreedyRow]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- validation


def _validate_scores(ref: list[TokenScores], tgt: list[TokenScores]) -> None:
    """Both sides must have scored the same sequences of target ids, with consistent tensor shapes."""
    if not ref or not tgt:
        raise CrosschipError("no teacher-forced sequences to compare", "give verify prompts with at least 2 tokens")
    if len(ref) != len(tgt):
        raise CrosschipError(f"ref scored {len(ref)} sequences but target scored {len(tgt)}",
                             "score the same sequences on both sides")
    for s, (r, t) in enumerate(zip(ref, tgt, strict=True)):
        a, b = r.target_ids.reshape(-1), t.target_ids.reshape(-1)
        if a.numel() != b.numel():
            raise CrosschipError(f"sequence {s}: ref scored {a.numel()} positions, target {b.numel()}",
                                 "score the same token ids on both sides")
        bad = (a != b).nonzero()
        if bad.numel():
            p = int(bad[0])
            raise CrosschipError(f"sequence {s}, position {p}: ref target id {int(a[p])} != target's {int(b[p])}",
                                 "score the same token ids on both sides (same tokenizer and prompts)")
        for side, sc in (("ref", r), ("target", t)):
            n = a.numel()
            if sc.top_ids.ndim != 2 or sc.top_ids.shape[0] != n or sc.top_ids.shape[1] < 1:
                raise CrosschipError(f"sequence {s}: {side} top_ids has shape {tuple(sc.top_ids.shape)}, "
                                     f"expected [{n}, K>=1]", "return top-K logprobs at every position")
            if sc.top_logprobs.shape != sc.top_ids.shape or sc.token_logprobs.numel() != n:
                raise CrosschipError(f"sequence {s}: {side} logprob tensors do not match its {n} positions",
                                     "return one logprob per position and per top-K entry")
            if sc.logprobs is not None and (sc.logprobs.ndim != 2 or sc.logprobs.shape[0] != n):
                raise CrosschipError(f"sequence {s}: {side} full logprobs have shape {tuple(sc.logprobs.shape)}",
                                     f"return [{n}, V] log-softmax rows")


# ---------------------------------------------------------------- KL


def exact_kl(ref: list[torch.Tensor], tgt: list[torch.Tensor]) -> torch.Tensor:
    """KL(ref || tgt) per row of full log-softmax rows; returns float64 [N] over all sequences' rows.

    float32 log-softmax rows sum to 1 only within ~1e-7, so each side's normalizer is folded in:
    with p = exp(a), q = exp(b), Za = sum(p) and P = p / Za, Q = q / Zb,
        KL = sum(p * (a - b)) / Za + log1p(sum(q - p) / Za).
    Both sums are of differences, which are small where the sides agree, so float32 keeps them to
    ~1e-9 nats per token (identical rows give exactly 0) at a seventh of the cost of renormalizing in float64.
    """
    out = []
    for lr, lt in zip(ref, tgt, strict=True):  # each: float32 [T, V]
        lr, lt = lr.float(), lt.float()
        p, q = lr.exp(), lt.exp()
        z_ref = p.sum(-1)
        # p == 0 terms are 0 (not 0 * inf = nan); p > 0 with lt = -inf gives +inf, the true KL.
        cross = torch.where(p > 0, p * (lr - lt), torch.zeros((), dtype=p.dtype)).sum(-1)
        kl = cross / z_ref + torch.log1p(q.sub_(p).sum(-1) / z_ref)
        out.append(torch.where(torch.isnan(kl), kl, kl.clamp_min(0.0)).double())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _waterfill_kl(p: torch.Tensor, w_rest: torch.Tensor, pool: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """min over q of sum_j p_j log(p_j/q_j) + w log(w/q_rest), s.t. sum_j q_j + q_rest = pool, 0 <= q_j <= cap.

    p: [N, M] ref probabilities of tokens whose target probability is unknown (0 in unused slots);
    w_rest, pool, cap: [N]. Tokens outside the target's top-K have target probability <= its K-th
    probability (cap), so the true target distribution is feasible and this minimum is a lower bound of
    its contribution. KKT: q_j = min(cap, lam * p_j), q_rest = lam * w_rest (water-filling); the first
    m (tokens capped, largest p first) whose next token stays under the cap gives lam.
    """
    n, m = p.shape
    ps, _ = p.sort(-1, descending=True)  # [N, M]
    prefix = torch.cat([torch.zeros(n, 1, dtype=p.dtype), ps.cumsum(-1)], -1)  # [N, M+1]
    total = ps.sum(-1, keepdim=True) + w_rest[:, None]  # [N, 1], >= REST_FLOOR
    ks = torch.arange(m + 1, dtype=p.dtype)  # capped count
    lam = (pool[:, None] - ks * cap[:, None]) / (total - prefix).clamp_min(1e-300)  # [N, M+1]
    nxt = torch.cat([ps, torch.zeros(n, 1, dtype=p.dtype)], -1)  # [N, M+1]
    ok = lam * nxt <= cap[:, None]
    first = ok.to(torch.int8).argmax(-1)  # [N]; m capped is always ok (nxt = 0)
    lam_star = lam.gather(1, first[:, None]).squeeze(1).clamp_min(1e-300)
    rank = torch.arange(m)[None, :]
    q = torch.where(rank < first[:, None], cap[:, None], lam_star[:, None] * ps)
    terms = torch.where(ps > 0, ps * (ps.log() - q.log()), torch.zeros_like(ps))
    rest = torch.where(w_rest > 0, -w_rest * lam_star.log(), torch.zeros_like(w_rest))
    return terms.sum(-1) + rest


def _usable_full(side: TokenScores, other: TokenScores, ids: torch.Tensor) -> torch.Tensor | None:
    """side's full logprobs if they can be looked up at `ids` (the other side's top ids) and both sides
    share a vocabulary size when both are full; else None."""
    full = side.logprobs
    if full is None or (other.logprobs is not None and other.logprobs.shape[1] != full.shape[1]):
        return None
    return full if int(ids.max()) < full.shape[1] else None


def _topk_parts(r: TokenScores, t: TokenScores) -> dict[str, torch.Tensor]:
    """Per-sequence pieces of the top-K + rest KL: what each side knows about the other's top-K tokens."""
    a, b = r.top_ids, t.top_ids  # [T, Ka], [T, Kb]
    lpa, lpb = r.top_logprobs.double(), t.top_logprobs.double()
    eq = a[:, :, None] == b[:, None, :]  # [T, Ka, Kb]
    in_b = eq.any(-1)  # [T, Ka]: ref's top token also in target's top-K
    in_a = eq.any(1)  # [T, Kb]
    t_full, r_full = _usable_full(t, r, a), _usable_full(r, t, b)
    if t_full is not None:
        q_a = t_full.gather(1, a).double()
        q_known = torch.ones_like(in_b)
        cap = torch.ones(a.shape[0], dtype=torch.float64)  # unused: no unknown target probabilities
    else:
        q_a = torch.where(in_b, lpb.gather(1, eq.to(torch.int8).argmax(-1)), torch.full_like(lpa, math.nan))
        q_known = in_b
        cap = lpb[:, -1].exp()  # tokens outside the target's top-K are at most its K-th probability
    # Target's top tokens outside ref's top-K are their own buckets only when ref knows their probability;
    # otherwise they stay in the shared rest bucket (a coarser partition: still a lower bound).
    neg_inf = torch.full_like(lpb, -math.inf)
    if r_full is not None:
        extra = ~in_a
        p_b = torch.where(extra, r_full.gather(1, b).double(), neg_inf)
    else:
        extra = torch.zeros_like(in_a)
        p_b = neg_inf
    return {"lp_a": lpa, "lq_a": q_a, "q_known": q_known, "lp_b": p_b,
            "lq_b": torch.where(extra, lpb, neg_inf), "cap": cap}


def _bucket_kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """sum over buckets of p log(p/q), from log-probabilities ([N, K] -> [N]); empty buckets (p = 0) add 0."""
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


def topk_rest_kl(ref: list[TokenScores], tgt: list[TokenScores]) -> torch.Tensor:
    """KL(ref || tgt) over a coarse partition of the vocabulary; returns [N] over all rows.

    Buckets: each of ref's top-K tokens; each of the target's top-K tokens when ref has full logprobs;
    one rest bucket with everything else, holding each side's remaining mass. A ref top-K token outside
    the target's top-K, when the target is top-K only, gets the share of the target's rest mass that
    minimizes the KL given that it cannot exceed the target's K-th probability (`_waterfill_kl`).
    Coarse-graining cannot increase KL (data-processing inequality), and the minimum over feasible
    shares is below the true shares' value, so the result is a lower bound of the true KL.
    """
    parts = [_topk_parts(r, t) for r, t in zip(ref, tgt, strict=True)]
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    known, lp_a, lq_a = cat["q_known"], cat["lp_a"], cat["lq_a"]
    neg_inf = torch.full_like(lp_a, -math.inf)
    kl_known = _bucket_kl(torch.where(known, lp_a, neg_inf), torch.where(known, lq_a, neg_inf))
    kl_known = kl_known + _bucket_kl(cat["lp_b"], cat["lq_b"])
    p_ind = lp_a.exp().sum(-1) + cat["lp_b"].exp().sum(-1)  # ref mass in individual buckets
    q_ind = torch.where(known, lq_a, neg_inf).exp().sum(-1) + cat["lq_b"].exp().sum(-1)
    p_rest = (1.0 - p_ind).clamp_min(REST_FLOOR)
    pool = (1.0 - q_ind).clamp_min(REST_FLOOR)  # target mass for unknown tokens + rest
    p_unknown = torch.where(known, torch.zeros_like(lp_a), lp_a.exp())  # [N, Ka]
    return kl_known + _waterfill_kl(p_unknown, p_rest, pool, cat["cap"])


# ---------------------------------------------------------------- statistics


def _quantile(sorted_values: torch.Tensor, q: float) -> float:
    """Linear-interpolation quantile of an ascending 1-D tensor (torch.quantile caps input size)."""
    n = sorted_values.numel()
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    a, b = float(sorted_values[lo]), float(sorted_values[hi])
    return a if lo == hi or a == b else a + (b - a) * (pos - lo)


def bootstrap_mean_ci(sums: torch.Tensor, counts: torch.Tensor, replicates: int, seed: int,
                      level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of sum(sums)/sum(counts), resampling the units (sequences or tokens)."""
    units = sums.numel()
    gen = torch.Generator().manual_seed(seed)
    block = max(1, _BOOT_ELEMS // units)
    means = []
    for start in range(0, replicates, block):
        idx = torch.randint(units, (min(block, replicates - start), units), generator=gen)  # [B, U]
        means.append(sums[idx].sum(1) / counts[idx].sum(1))
    values, _ = torch.cat(means).sort()
    alpha = (1.0 - level) / 2
    return _quantile(values, alpha), _quantile(values, 1.0 - alpha)


def _per_position(kls: list[torch.Tensor]) -> list[float]:
    """Mean KL at each position index over the sequences that reach it."""
    longest = max(k.numel() for k in kls)
    sums = torch.zeros(longest, dtype=torch.float64)
    counts = torch.zeros(longest, dtype=torch.float64)
    for k in kls:
        sums[: k.numel()] += k
        counts[: k.numel()] += 1
    return (sums / counts).tolist()


def _top5_overlap(ref: list[TokenScores], tgt: list[TokenScores]) -> tuple[float | None, str | None]:
    k = min(min(s.top_ids.shape[1] for s in ref), min(s.top_ids.shape[1] for s in tgt))
    if k < 5:
        return None, f"needs top-K >= 5 from both sides (got K = {k})"
    a = torch.cat([s.top_ids[:, :5] for s in ref])  # [N, 5]
    b = torch.cat([s.top_ids[:, :5] for s in tgt])
    shared = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1)  # [N]
    return float(shared.double().mean() / 5), None


def _ppl(scores: list[TokenScores]) -> float:
    lp = torch.cat([s.token_logprobs.reshape(-1).double() for s in scores])
    return math.exp(-float(lp.mean())) if bool(torch.isfinite(lp).all()) else math.inf


def _kl_per_token(ref: list[TokenScores], tgt: list[TokenScores]) -> tuple[torch.Tensor, str, dict[str, str]]:
    """Per-token KL over all positions, with the method used and why exact KL was not possible."""
    ref_full = [r.logprobs for r in ref if r.logprobs is not None]
    tgt_full = [t.logprobs for t in tgt if t.logprobs is not None]
    full = len(ref_full) == len(ref) and len(tgt_full) == len(tgt)
    if full and all(a.shape[1] == b.shape[1] for a, b in zip(ref_full, tgt_full, strict=True)):
        return exact_kl(ref_full, tgt_full), KL_EXACT, {}
    if full:
        why = "the sides' vocabulary sizes differ (padded embeddings?): KL over top-K + rest is a lower bound"
    else:
        why = "a side returns only top-K logprobs: KL over top-K + rest is a lower bound"
    return topk_rest_kl(ref, tgt), KL_TOPK, {"kl_exact": why}


def distribution_metrics(ref: list[TokenScores], tgt: list[TokenScores], *, bootstrap: int = 1000,
                         seed: int = 0) -> DistributionMetrics:
    """Teacher-forced metrics of target against ref (both must have scored the same target ids)."""
    _validate_scores(ref, tgt)
    kl, method, unavailable = _kl_per_token(ref, tgt)  # [N]
    lengths = [r.target_ids.numel() for r in ref]
    per_seq = list(kl.split(lengths))
    kl_sorted, _ = kl.sort()
    kl_mean = float(kl.mean())
    if bootstrap <= 0 or not math.isfinite(kl_mean):
        ci, unit = (kl_mean, kl_mean), "none"
    elif len(per_seq) >= 2:
        # Whole sequences: tokens within a sequence are correlated, so resampling them alone understates
        # the uncertainty.
        sums = torch.stack([k.sum() for k in per_seq])
        ci, unit = bootstrap_mean_ci(sums, torch.tensor(lengths, dtype=torch.float64), bootstrap, seed), "sequences"
    else:
        ci, unit = bootstrap_mean_ci(kl, torch.ones_like(kl), bootstrap, seed), "tokens"
    top1 = torch.cat([(r.top_ids[:, 0] == t.top_ids[:, 0]) for r, t in zip(ref, tgt, strict=True)])
    top5, why5 = _top5_overlap(ref, tgt)
    if why5:
        unavailable["top5_overlap"] = why5
    ppl_ref, ppl_tgt = _ppl(ref), _ppl(tgt)
    return DistributionMetrics(
        kl_method=method, kl_mean=kl_mean, kl_p99=_quantile(kl_sorted, 0.99), kl_max=float(kl_sorted[-1]),
        kl_mean_ci=ci, ci_resampled=unit, bootstrap=bootstrap, top1_agreement=float(top1.double().mean()),
        top5_overlap=top5, ppl_ref=ppl_ref, ppl_tgt=ppl_tgt, ppl_ratio=_ratio(ppl_tgt, ppl_ref),
        tokens=kl.numel(), sequences=len(per_seq), per_position_kl=_per_position(per_seq),
        kl_values=kl.tolist(), unavailable=unavailable,
    )


def _ratio(a: float, b: float) -> float:
    if math.isinf(a) and math.isinf(b):
        return math.nan
    return a / b if b else math.inf


# ---------------------------------------------------------------- greedy


def _top_set(top: list[dict[int, float]], pos: int, n: int) -> set[int] | None:
    """The n most likely token ids at a generated position, or None when the side recorded none there."""
    if pos >= len(top) or not top[pos]:
        return None
    return {tok for tok, _ in sorted(top[pos].items(), key=lambda kv: -kv[1])[:n]}


def _greedy_row(i: int, r: GreedyRun, t: GreedyRun, top_n: int) -> GreedyRow:
    common = min(len(r.tokens), len(t.tokens))
    div = next((j for j in range(common) if r.tokens[j] != t.tokens[j]), None)
    base = {"prompt": i, "ref_tokens": len(r.tokens), "tgt_tokens": len(t.tokens),
            "ref_text": r.text, "tgt_text": t.text}
    if div is None:
        if len(r.tokens) == len(t.tokens):
            return GreedyRow(**base, first_divergence=None, matched=common, vllm_close=True,
                             ref_token=None, tgt_token=None)
        # vLLM compares zip(ref, tgt): a side that stopped early (EOS) is not a mismatch there.
        return GreedyRow(**base, first_divergence=common, matched=common, vllm_close=True, ref_token=None,
                         tgt_token=None, note="one side stopped early; checked over the common length (as vLLM)")
    ref_tok, tgt_tok = r.tokens[div], t.tokens[div]
    ref_top, tgt_top = _top_set(r.top, div, top_n), _top_set(t.top, div, top_n)
    if ref_top is None or tgt_top is None:
        return GreedyRow(**base, first_divergence=div, matched=div, vllm_close=False, ref_token=ref_tok,
                         tgt_token=tgt_tok, note="no top-N logprobs recorded at the divergence")
    notes = []
    if ref_tok not in tgt_top:
        notes.append(f"ref token {ref_tok} not in target's top-{top_n}")
    if tgt_tok not in ref_top:
        notes.append(f"target token {tgt_tok} not in ref's top-{top_n}")
    return GreedyRow(**base, first_divergence=div, matched=div, vllm_close=not notes, ref_token=ref_tok,
                     tgt_token=tgt_tok, note="; ".join(notes))


def greedy_metrics(ref: list[GreedyRun], tgt: list[GreedyRun], top_n: int) -> GreedyMetrics:
    """Per-prompt first divergence and vLLM's closeness check, aggregated over prompts."""
    if top_n < 1:
        raise CrosschipError(f"top-N must be >= 1 (got {top_n})", "pass a positive top-N")
    if len(ref) != len(tgt):
        raise CrosschipError(f"ref has {len(ref)} greedy runs but target has {len(tgt)}",
                             "run greedy generation on the same prompts on both sides")
    for i, (r, t) in enumerate(zip(ref, tgt, strict=True)):
        if list(r.prompt_ids) != list(t.prompt_ids):
            raise CrosschipError(f"greedy prompt {i} differs between ref and target",
                                 "run greedy generation on the same prompt ids on both sides")
    rows = [_greedy_row(i, r, t, top_n) for i, (r, t) in enumerate(zip(ref, tgt, strict=True))]
    return GreedyMetrics(
        prompts=len(rows),
        identical=sum(row.first_divergence is None for row in rows),
        mean_matched=sum(row.matched for row in rows) / len(rows) if rows else 0.0,
        all_vllm_close=all(row.vllm_close for row in rows),
        top_n=top_n,
        rows=rows,
    )
