"""Distribution and greedy metrics, and the gates, on small synthetic distributions (no models needed)."""

from __future__ import annotations

import math

import pytest
import torch

from crosschip.errors import CrosschipError
from crosschip.verify import gates as G
from crosschip.verify.metrics import (
    KL_EXACT,
    KL_TOPK,
    _waterfill_kl,
    distribution_metrics,
    exact_kl,
    greedy_metrics,
    topk_rest_kl,
)
from crosschip.verify.types import GreedyRun, TokenScores


def scores(logprobs: torch.Tensor, ids: torch.Tensor, k: int, full: bool = True) -> TokenScores:
    """A side's TokenScores from log-softmax rows [T, V] and the text's next-token ids [T]."""
    top_lp, top_ids = logprobs.topk(k, -1)
    token_lp = logprobs.gather(1, ids[:, None]).squeeze(1)
    return TokenScores(ids, token_lp, top_ids, top_lp, logprobs if full else None)


def random_pair(seed: int, t: int, v: int, noise: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ref and target log-softmax rows [T, V] (target = ref logits + Gaussian noise), and ids [T]."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, v, generator=g) * 2
    tgt = logits + torch.randn(t, v, generator=g) * noise
    ids = torch.randint(v, (t,), generator=g)
    return logits.log_softmax(-1), tgt.log_softmax(-1), ids


def split(lp: torch.Tensor, ids: torch.Tensor, parts: int, k: int, full: bool = True) -> list[TokenScores]:
    return [scores(a, b, k, full) for a, b in zip(lp.chunk(parts), ids.chunk(parts), strict=True)]


# ---------------------------------------------------------------- KL


def test_exact_kl_matches_hand_computation() -> None:
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    q = torch.tensor([[0.35, 0.45, 0.2], [0.2, 0.2, 0.6]])
    by_hand = [0.5 * math.log(0.5 / 0.35) + 0.3 * math.log(0.3 / 0.45),
               2 * 0.1 * math.log(0.1 / 0.2) + 0.8 * math.log(0.8 / 0.6)]
    ids = torch.tensor([0, 2])
    m = distribution_metrics([scores(p.log(), ids, 3)], [scores(q.log(), ids, 3)], bootstrap=50)
    assert m.kl_method == KL_EXACT
    assert m.kl_values == pytest.approx(by_hand, rel=1e-6)
    assert m.kl_mean == pytest.approx(sum(by_hand) / 2, rel=1e-6)
    assert m.kl_max == pytest.approx(max(by_hand), rel=1e-6)
    assert m.top1_agreement == 0.5  # row 0: argmax 0 vs 1; row 1: both 2
    ppl_ref = math.exp(-(math.log(0.5) + math.log(0.8)) / 2)
    ppl_tgt = math.exp(-(math.log(0.35) + math.log(0.6)) / 2)
    assert (m.ppl_ref, m.ppl_tgt) == (pytest.approx(ppl_ref, rel=1e-6), pytest.approx(ppl_tgt, rel=1e-6))
    assert m.ppl_ratio == pytest.approx(ppl_tgt / ppl_ref, rel=1e-6)


def test_identical_sides_are_perfect() -> None:
    lp, _, ids = random_pair(1, 64, 40, 0.0)
    ref, tgt = split(lp, ids, 4, 8), split(lp.clone(), ids, 4, 8)
    m = distribution_metrics(ref, tgt, bootstrap=200)
    assert m.kl_mean == 0.0 and m.kl_max == 0.0 and m.kl_mean_ci == (0.0, 0.0)
    assert m.top1_agreement == 1.0 and m.top5_overlap == 1.0
    assert m.ppl_ratio == pytest.approx(1.0)
    assert m.tokens == 64 and m.sequences == 4 and len(m.per_position_kl) == 16


@pytest.mark.parametrize("ref_full,tgt_full", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("noise", [0.05, 1.0, 4.0])
def test_topk_rest_kl_is_a_lower_bound(ref_full: bool, tgt_full: bool, noise: float) -> None:
    lr, lt, ids = random_pair(2, 300, 50, noise)
    exact = exact_kl([lr], [lt])
    for k in (1, 5, 20):
        bound = topk_rest_kl([scores(lr, ids, k, ref_full)], [scores(lt, ids, k, tgt_full)])
        assert bool((bound <= exact + 1e-6).all()), (k, float((bound - exact).max()))
        assert bool((bound >= -1e-9).all())
        # It is a useful bound, not a trivial 0: with K = 20 of 50 it recovers most of the KL.
        if k == 20:
            assert float(bound.sum()) > 0.75 * float(exact.sum())


def test_topk_rest_kl_equals_exact_when_k_is_the_vocabulary() -> None:
    lr, lt, ids = random_pair(3, 100, 30, 1.0)
    m = distribution_metrics([scores(lr, ids, 30, full=False)], [scores(lt, ids, 30, full=False)], bootstrap=10)
    assert m.kl_method == KL_TOPK and "kl_exact" in m.unavailable
    exact = exact_kl([lr], [lt])
    assert torch.tensor(m.kl_values, dtype=torch.float64) == pytest.approx(exact, abs=1e-5)


def test_waterfill_matches_brute_force_minimum() -> None:
    # One ref token outside the target's top-K: p = 0.3 on it, w = 0.1 ref rest; the target's pool 0.2
    # must be split between that token (at most cap) and its rest.
    for cap in (0.01, 0.05, 0.15, 0.5):
        got = float(_waterfill_kl(torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([0.1], dtype=torch.float64),
                                  torch.tensor([0.2], dtype=torch.float64), torch.tensor([cap], dtype=torch.float64)))
        grid = torch.linspace(1e-9, min(cap, 0.2 - 1e-9), 200_001, dtype=torch.float64)
        brute = float((0.3 * (0.3 / grid).log() + 0.1 * (0.1 / (0.2 - grid)).log()).min())
        assert got == pytest.approx(brute, abs=1e-7), cap


def test_zero_target_probability_gives_infinite_kl_and_fails() -> None:
    ref = torch.tensor([[0.5, 0.5, 0.0]]).log()
    tgt = torch.tensor([[1.0, 0.0, 0.0]]).log()
    ids = torch.tensor([0])
    m = distribution_metrics([scores(ref, ids, 3)], [scores(tgt, ids, 3)], bootstrap=10)
    assert math.isinf(m.kl_mean)
    results = G.evaluate(m, None, G.resolve_gates("int8", {}))
    assert not {r.name: r for r in results}["kl_mean"].passed


def test_bootstrap_ci_contains_mean_and_is_deterministic() -> None:
    lr, lt, ids = random_pair(4, 640, 40, 0.3)
    ref, tgt = split(lr, ids, 20, 5), split(lt, ids, 20, 5)
    a = distribution_metrics(ref, tgt, bootstrap=500, seed=7)
    b = distribution_metrics(ref, tgt, bootstrap=500, seed=7)
    c = distribution_metrics(ref, tgt, bootstrap=500, seed=8)
    assert a.ci_resampled == "sequences"
    lo, hi = a.kl_mean_ci
    assert lo < a.kl_mean < hi
    assert a.kl_mean_ci == b.kl_mean_ci
    assert a.kl_mean_ci != c.kl_mean_ci
    # Fewer tokens of the same data: a wider interval (the gate uses its upper bound).
    few = distribution_metrics(ref[:3], tgt[:3], bootstrap=500, seed=7)
    assert few.kl_mean_ci[1] - few.kl_mean_ci[0] > hi - lo
    one = distribution_metrics(ref[:1], tgt[:1], bootstrap=200)
    assert one.ci_resampled == "tokens" and one.kl_mean_ci[0] < one.kl_mean_ci[1]


def test_mismatched_target_ids_raise() -> None:
    lr, lt, ids = random_pair(5, 32, 20, 0.1)
    ref, tgt = split(lr, ids, 2, 5), split(lt, ids, 2, 5)
    tgt[1].target_ids = tgt[1].target_ids.clone()
    tgt[1].target_ids[3] = (tgt[1].target_ids[3] + 1) % 20
    with pytest.raises(CrosschipError, match="sequence 1, position 3"):
        distribution_metrics(ref, tgt)
    with pytest.raises(CrosschipError, match="sequences"):
        distribution_metrics(ref, tgt[:1])


def test_top5_needs_k5_and_per_position_handles_ragged_sequences() -> None:
    lr, lt, ids = random_pair(6, 30, 20, 0.5)
    ref = [scores(lr[:20], ids[:20], 3), scores(lr[20:], ids[20:], 3)]
    tgt = [scores(lt[:20], ids[:20], 3), scores(lt[20:], ids[20:], 3)]
    m = distribution_metrics(ref, tgt, bootstrap=20)
    assert m.top5_overlap is None and "top5_overlap" in m.unavailable
    kl = exact_kl([lr], [lt])
    assert len(m.per_position_kl) == 20
    assert m.per_position_kl[0] == pytest.approx(float(kl[0] + kl[20]) / 2)
    assert m.per_position_kl[15] == pytest.approx(float(kl[15]))


# ---------------------------------------------------------------- greedy


def run(tokens: list[int], top: list[dict[int, float]] | None = None) -> GreedyRun:
    return GreedyRun([1, 2, 3], tokens, top if top is not None else [{t: -0.1} for t in tokens])


def test_greedy_identical_runs() -> None:
    g = greedy_metrics([run([5, 6, 7]), run([8])], [run([5, 6, 7]), run([8])], top_n=3)
    assert g.identical == 2 and g.all_vllm_close and g.mean_matched == 2.0
    assert all(r.first_divergence is None for r in g.rows)


def test_greedy_divergence_passes_vllm_check_when_tokens_are_in_each_others_top_n() -> None:
    ref = run([5, 6, 7, 9], [{5: -0.1}, {6: -0.1}, {7: -0.6, 8: -0.8, 1: -3.0}, {9: -0.1}])
    tgt = run([5, 6, 8, 4], [{5: -0.1}, {6: -0.1}, {8: -0.6, 7: -0.7, 2: -3.0}, {4: -0.1}])
    g = greedy_metrics([ref], [tgt], top_n=2)
    row = g.rows[0]
    assert row.first_divergence == 2 and row.matched == 2 and row.vllm_close
    assert (row.ref_token, row.tgt_token) == (7, 8)
    assert g.identical == 0 and g.all_vllm_close


def test_greedy_divergence_fails_vllm_check_outside_top_n() -> None:
    # ref's token 7 is only third in the target's top-3: fails with N = 2, passes with N = 3.
    ref = run([7], [{7: -0.5, 8: -0.9}])
    tgt = run([8], [{8: -0.3, 2: -1.0, 7: -2.0}])
    g2 = greedy_metrics([ref], [tgt], top_n=2)
    assert not g2.all_vllm_close and "ref token 7 not in target's top-2" in g2.rows[0].note
    assert greedy_metrics([ref], [tgt], top_n=3).all_vllm_close
    results = {r.name: r for r in G.evaluate(None, g2, G.resolve_gates("bf16", {}))}
    assert results["greedy_vllm_close"].passed is False


def test_greedy_validates_prompts() -> None:
    with pytest.raises(CrosschipError, match="greedy prompt 0"):
        greedy_metrics([GreedyRun([1], [2], [{2: 0.0}])], [GreedyRun([9], [2], [{2: 0.0}])], top_n=1)


# ---------------------------------------------------------------- gates


def test_bf16_gates_pass_small_kl_and_fail_large() -> None:
    bf16 = G.resolve_gates("bf16", {})
    lr, lt, ids = random_pair(7, 1024, 64, 0.02)
    small = distribution_metrics(split(lr, ids, 16, 8), split(lt, ids, 16, 8), bootstrap=300)
    results = G.evaluate(small, None, bf16)
    assert all(r.passed for r in results if r.passed is not None), results
    assert G.verdict(results, layer_fail=False)
    assert not G.verdict(results, layer_fail=True)
    lr, lt, ids = random_pair(7, 1024, 64, 1.0)
    large = distribution_metrics(split(lr, ids, 16, 8), split(lt, ids, 16, 8), bootstrap=300)
    failed = {r.name for r in G.evaluate(large, None, bf16) if r.passed is False}
    assert {"kl_mean", "kl_p99", "top1_agreement"} <= failed


def test_kl_gate_uses_the_upper_ci_bound() -> None:
    lr, lt, ids = random_pair(8, 256, 40, 0.1)
    m = distribution_metrics(split(lr, ids, 8, 5), split(lt, ids, 8, 5), bootstrap=300)
    between = (m.kl_mean + m.kl_mean_ci[1]) / 2  # above the point estimate, below the CI's upper bound
    kl_gate = {r.name: r for r in G.evaluate(m, None, G.resolve_gates("bf16", {"kl_mean_max": between}))}["kl_mean"]
    assert kl_gate.value == m.kl_mean_ci[1] and kl_gate.passed is False


def test_overrides_and_validation() -> None:
    g = G.resolve_gates("bf16", {"kl_mean_max": 0.5, "top1_min": None, "greedy_vllm_close": False})
    assert g.kl_mean_max == 0.5 and g.top1_min == G.DEFAULT_GATES["bf16"].top1_min
    assert not g.greedy_vllm_close and "Overridden" in g.source
    with pytest.raises(CrosschipError, match="unknown gate"):
        G.resolve_gates("bf16", {"kl_max": 1.0})
    with pytest.raises(CrosschipError, match="precision class"):
        G.resolve_gates("int4", {})
    with pytest.raises(CrosschipError, match="top1_min"):
        G.resolve_gates("fp16", {"top1_min": 2.0})


def test_ppl_ratio_gate_is_two_sided_and_nan_fails() -> None:
    lr, _, ids = random_pair(9, 64, 20, 0.0)
    m = distribution_metrics([scores(lr, ids, 5)], [scores(lr, ids, 5)], bootstrap=10)
    gates = G.resolve_gates("fp32", {})
    for ratio, ok in ((1.0005, True), (1.01, False), (1 / 1.01, False), (math.nan, False)):
        m.ppl_ratio = ratio
        assert {r.name: r for r in G.evaluate(m, None, gates)}["ppl_ratio"].passed is ok, ratio


def test_verdict_needs_something_measured() -> None:
    skipped = G.evaluate(None, None, G.resolve_gates("bf16", {}))
    assert all(r.passed is None for r in skipped)
    assert not G.verdict(skipped, layer_fail=False)
    assert G.verdict(skipped, layer_fail=False, checked_layers=True)


@pytest.mark.parametrize("dtype,fmt,cls", [
    ("bf16", None, "bf16"), ("torch.bfloat16", None, "bf16"), ("float16", None, "fp16"), ("fp32", None, "fp32"),
    (None, "int8-w8a8-dynamic", "int8"), (None, "int8-w8a16", "int8"), (None, "fp8-block", "fp8"),
    ("bf16", "int8-w8a16", "int8"), ("fp32", "bf16", "bf16"), ("tf32", None, "fp16"), (None, None, "fp32"),
])
def test_precision_class(dtype: str | None, fmt: str | None, cls: str) -> None:
    assert G.precision_class(dtype, fmt) == cls


def test_precision_class_rejects_unknown() -> None:
    with pytest.raises(CrosschipError, match="--precision"):
        G.precision_class("int4-awq", None)


def test_every_class_documents_its_source() -> None:
    for cls in G.PRECISION_CLASSES:
        gates = G.DEFAULT_GATES[cls]
        assert "engineering choice" in gates.source
        assert 0 < gates.kl_mean_max <= gates.kl_p99_max and 0 < gates.top1_min < 1 and gates.ppl_ratio_max > 1


def test_to_dict_samples_kl_values_as_quantiles() -> None:
    lr, lt, ids = random_pair(10, 64, 20, 0.5)
    m = distribution_metrics(split(lr, ids, 4, 5), split(lt, ids, 4, 5), bootstrap=20)
    d = m.to_dict(max_kl_values=10)
    assert len(d["kl_values"]) == 10 and d["kl_values_sampled"]
    assert d["kl_values"] == sorted(d["kl_values"])
    assert (d["kl_values"][0], d["kl_values"][-1]) == (min(m.kl_values), max(m.kl_values))
    assert len(m.to_dict()["kl_values"]) == 64 and "kl_values_sampled" not in m.to_dict()
