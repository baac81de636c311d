"""The engine over a paged KV cache: chunked prefill, block accounting, preemption, DeepSeek MLA in the batch."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import pytest
import torch
from test_engine import ATOL, collect, make_engine, prompt, request, run, tokens, wait_idle

from crosschip.errors import CrosschipError
from crosschip.serve.mla import MLARunner
from crosschip.serve.paged import BlockAllocator, Chunk, blocks_for, build_step
from crosschip.serve.runner import DenseRunner, dense_kv_bytes_per_token


def lps(outs: list) -> list[float]:
    return [lp.logprob for o in outs for lp in o.logprobs or []]


def test_block_allocator_grows_on_demand_and_frees() -> None:
    alloc = BlockAllocator(num_blocks=5, block_size=4)
    table: list[int] = []
    assert alloc.grow(table, 1) and table == [0] and alloc.num_free == 4
    assert alloc.grow(table, 4) and len(table) == 1  # still inside the first block
    assert alloc.grow(table, 9) and len(table) == 3
    other: list[int] = []
    assert not alloc.grow(other, 13) and other == []  # 4 blocks needed, 2 free: nothing taken
    assert alloc.missing(other, 8) == 2 and alloc.grow(other, 8)
    alloc.release(table)
    assert table == [] and alloc.num_free == 3 and alloc.num_used == 2
    with pytest.raises(CrosschipError):
        BlockAllocator(0, 16)


def test_build_step_orders_decodes_first_and_maps_every_token_to_its_block() -> None:
    chunks = [Chunk(0, [5], 6, [3, 1], "last"), Chunk(1, [7, 8, 9], 1, [2], "all"), Chunk(2, [4, 4], 0, [0], "none")]
    batch = build_step(chunks, block_size=4, device=torch.device("cpu"))
    assert batch.num_decodes == 1 and batch.query_starts == [0, 1, 4, 6]
    # position p of a sequence lives in row table[p // 4] * 4 + p % 4
    assert batch.slot_mapping.tolist() == [1 * 4 + 2, 2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 0, 1]
    assert batch.decode_rows.tolist() == [[12, 13, 14, 15, 4, 5, 6]]  # blocks 3 then 1, positions 0..6
    assert batch.decode_mask is None  # one decode: its exact context, no padding
    assert batch.logits_rows.tolist() == [0, 1, 2, 3] and batch.logits_counts == [1, 3, 0]
    with pytest.raises(CrosschipError, match="single-token chunks first"):
        build_step([chunks[1], chunks[0]], 4, torch.device("cpu"))
    with pytest.raises(CrosschipError, match="does not cover"):
        build_step([Chunk(0, [1, 2], 3, [0], "last")], 4, torch.device("cpu"))


def test_a_prompt_longer_than_the_step_budget_is_prefilled_in_chunks_beside_decodes() -> None:
    """Budget 8 tokens per step: a 45-token prompt takes 6 steps, and two running requests keep decoding
    through them (one token per step each). Every output equals its solo run, token for token."""
    engine = make_engine(max_batch=4, max_num_batched_tokens=8)
    long = request("long", prompt(1, 45), max_tokens=5, logprobs=1)
    short = [request(f"s{i}", prompt(10 + i, 3), max_tokens=20, logprobs=1) for i in range(2)]
    events: list[str] = []

    async def follow(req: Any, started: asyncio.Event | None = None) -> list:
        outs = []
        async for out in engine.generate(req):
            outs.append(out)
            events.append(req.request_id)
            if started is not None:
                started.set()
        return outs

    async def main() -> tuple[list, list]:
        started = [asyncio.Event() for _ in short]
        tasks = [asyncio.create_task(follow(r, e)) for r, e in zip(short, started, strict=True)]
        for e in started:
            await e.wait()
        events.append("submit")
        together = [await follow(long), *[await t for t in tasks]]
        alone = [await collect(engine, r) for r in (long, *short)]
        await wait_idle(engine)
        return together, alone

    together, alone = run(engine, main)
    for t_outs, a_outs in zip(together, alone, strict=True):
        assert tokens(t_outs) == tokens(a_outs)
        np.testing.assert_allclose(lps(t_outs), lps(a_outs), atol=ATOL, rtol=0)
    during = events[events.index("submit") : events.index("long")]
    assert during.count("s0") >= 5 and during.count("s1") >= 5  # decodes ran while the prompt was chunked


def test_abort_returns_every_block_and_metrics_count_blocks() -> None:
    engine = make_engine(max_batch=4, max_context=128, block_size=8)
    assert engine.stats().kv_blocks_total == engine.runner.num_blocks == 4 * 128 // 8
    seen: list[int] = []

    async def main() -> None:
        stream = engine.generate(request("a", prompt(3, 20), max_tokens=100))
        async for out in stream:
            seen.append(engine.stats().kv_blocks_used)
            if out.num_generated_tokens == 10:
                break
        await stream.aclose()
        await wait_idle(engine)

    run(engine, main)
    assert max(seen) == blocks_for(20 + 10, 8)  # blocks follow the tokens held, not max_context
    assert engine.stats().kv_blocks_used == 0 and engine.stats().kv_used_tokens == 0


def test_a_tight_kv_budget_preempts_and_recomputes_without_changing_the_output() -> None:
    """A pool of one full context (64 positions) for 4 sequences of up to 40: the newest are preempted,
    recomputed later, and every output still equals its solo run."""
    model_kv = dense_kv_bytes_per_token(make_engine(max_batch=1, max_context=64).model)
    engine = make_engine(max_batch=4, max_context=64, block_size=4, kv_budget_bytes=64 * model_kv)
    assert engine.runner.num_blocks == 16
    reqs = [request(f"p{i}", prompt(20 + i, 10), max_tokens=30, logprobs=1) for i in range(4)]
    peak: list[int] = []

    async def main() -> tuple[list, list]:
        together = await asyncio.gather(*(collect(engine, r, peak) for r in reqs))
        alone = [await collect(engine, r) for r in reqs]
        await wait_idle(engine)
        return together, alone

    together, alone = run(engine, main)
    assert max(peak) >= 2 and engine.stats().preemptions > 0  # several ran at once until the pool ran dry
    for t_outs, a_outs in zip(together, alone, strict=True):
        assert tokens(t_outs) == tokens(a_outs) and len(tokens(t_outs)) == 30
        np.testing.assert_allclose(lps(t_outs), lps(a_outs), atol=ATOL, rtol=0)
    assert engine.stats().kv_blocks_used == 0


def test_seeded_sampling_survives_preemption() -> None:
    model_kv = dense_kv_bytes_per_token(make_engine(max_batch=1, max_context=64).model)
    engine = make_engine(max_batch=4, max_context=64, block_size=4, kv_budget_bytes=64 * model_kv)
    reqs = [request(f"t{i}", prompt(30 + i, 10), max_tokens=30, temperature=0.9, seed=i,
                    frequency_penalty=0.5) for i in range(4)]

    async def main() -> tuple[list, list]:
        together = await asyncio.gather(*(collect(engine, r) for r in reqs))
        return together, [await collect(engine, r) for r in reqs]

    together, alone = run(engine, main)
    assert engine.stats().preemptions > 0
    assert [tokens(o) for o in together] == [tokens(o) for o in alone]


@pytest.mark.parametrize("preset", ["deepseek-tiny", "deepseek-small"])
def test_deepseek_runs_in_the_continuous_batch_with_a_latent_cache(preset: str) -> None:
    engine = make_engine(preset, max_batch=8, max_num_batched_tokens=16)
    runner = engine.runner
    assert isinstance(runner, MLARunner)
    cfg = engine.model.config
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4  # fp32 latent, not K/V
    assert runner.kv_bytes_per_token == per_token
    reqs = [request(f"d{i}", prompt(40 + i, 4 + 7 * i), max_tokens=8, logprobs=1) for i in range(6)]
    seen: list[int] = []

    async def main() -> tuple[list, list]:
        together = await asyncio.gather(*(collect(engine, r, seen) for r in reqs))
        return together, [await collect(engine, r) for r in reqs]

    together, alone = run(engine, main)
    assert max(seen) >= 4
    for req, t_outs, a_outs in zip(reqs, together, alone, strict=True):
        assert tokens(t_outs) == tokens(a_outs)
        np.testing.assert_allclose(lps(t_outs), lps(a_outs), atol=ATOL, rtol=0)
        with torch.no_grad():  # every generated token's logprob equals HF's own forward
            full = torch.tensor([[*req.prompt_ids, *tokens(t_outs)]])
            ref = torch.log_softmax(engine.model(input_ids=full).logits[0].float(), dim=-1)
        n = len(req.prompt_ids)
        want = [float(ref[n - 1 + i, t]) for i, t in enumerate(tokens(t_outs))]
        np.testing.assert_allclose(lps(t_outs), want, atol=1e-4, rtol=0)


def test_dense_runner_is_picked_for_llama_and_its_cache_is_paged() -> None:
    engine = make_engine(max_batch=2, max_context=100, block_size=16)
    runner: Any = engine.runner
    assert isinstance(runner, DenseRunner)
    assert runner.k_cache.shape[1] == runner.num_blocks * 16 == 2 * math.ceil(100 / 16) * 16


def test_step_timings_count_every_forward() -> None:
    """The scheduler's time split (schedule + build, forward, sample) covers each step once: /metrics exports it
    so the per-step host overhead can be measured on a live server."""
    engine = make_engine(max_batch=4, max_num_batched_tokens=8)
    forwards = []
    real = engine.runner.forward

    def counted(batch: Any) -> torch.Tensor:
        forwards.append(batch.num_tokens)
        return real(batch)

    engine.runner.forward = counted

    async def main() -> None:
        await asyncio.gather(*(collect(engine, request(f"m{i}", prompt(50 + i, 12), max_tokens=5)) for i in range(3)))
        await wait_idle(engine)

    run(engine, main)
    stats = engine.stats()
    assert stats.steps == len(forwards) and sum(forwards) == 3 * 12 + 3 * 4  # prompts + every sampled-then-fed token
    assert stats.schedule_s > 0 and stats.forward_s > 0 and stats.sample_s > 0


def test_block_allocator_shares_registered_prefix_blocks_and_evicts_lru() -> None:
    alloc = BlockAllocator(num_blocks=4, block_size=2)
    tokens = [5, 6, 7, 8, 9]
    table: list[int] = []
    assert alloc.grow(table, 5) and len(table) == 3
    alloc.register(table, 0, tokens)
    alloc.register(table, 1, tokens)
    shared = alloc.match([5, 6, 7, 8, 1, 1], limit=3)
    assert shared == table[:2] and alloc.num_free == 1  # two blocks referenced twice, one still free
    partial = alloc.match([5, 6, 0, 0], limit=2)
    assert partial == table[:1]  # the chain stops at the first differing block
    assert alloc.match([6, 6, 7, 8], limit=2) == []
    for held in (table, shared, partial):
        alloc.release(held)
    assert alloc.num_free == 4 and alloc.num_used == 0  # cached but unreferenced blocks count as free
    taken: list[int] = []
    assert alloc.grow(taken, 8)  # needs every block: the cached ones are evicted
    assert alloc.match(tokens, limit=2) == []  # evicted: no stale match


def test_a_shared_prompt_prefix_is_computed_once_and_outputs_are_unchanged() -> None:
    """Four requests share a 40-token prefix (2.5 blocks of 16): the later ones reuse the first's two full blocks.
    Their outputs equal the same requests served with prefix caching off."""
    prefix = prompt(60, 40)
    reqs = [request(f"x{i}", prefix + prompt(70 + i, 5), max_tokens=6, logprobs=1) for i in range(4)]

    def serve(caching: bool) -> tuple[list, Any]:
        engine = make_engine(max_batch=4, block_size=16, prefix_caching=caching)
        forwards: list[int] = []
        real = engine.runner.forward
        engine.runner.forward = lambda batch: forwards.append(batch.num_tokens) or real(batch)

        async def main() -> list:
            first = await collect(engine, reqs[0])
            rest = await asyncio.gather(*(collect(engine, r) for r in reqs[1:]))
            await wait_idle(engine)
            return [first, *rest]

        return run(engine, main), (engine.stats(), sum(forwards))

    cached, (stats, computed) = serve(True)
    plain, (plain_stats, plain_computed) = serve(False)
    for a, b in zip(cached, plain, strict=True):
        assert tokens(a) == tokens(b)
        np.testing.assert_allclose(lps(a), lps(b), atol=ATOL, rtol=0)
    assert stats.prefix_hits == 3 * 32 and stats.prefix_queries == 4 * 45  # 3 requests x 2 full blocks
    assert computed == plain_computed - 3 * 32 and plain_stats.prefix_hits == 0
    assert stats.kv_blocks_used == 0


def test_prompt_logprobs_requests_compute_their_whole_prompt() -> None:
    engine = make_engine(max_batch=2, block_size=4)
    ids = prompt(80, 20)

    async def main() -> tuple[list, list]:
        first = await collect(engine, request("a", ids, max_tokens=2))
        echo = await collect(engine, request("b", ids, max_tokens=2, prompt_logprobs=1))
        return first, echo

    first, echo = run(engine, main)
    assert engine.stats().prefix_hits == 0  # the second one needs logits at every prompt position
    assert echo[0].prompt_logprobs is not None and len(echo[0].prompt_logprobs) == 20
    assert tokens(first) == tokens(echo)


@pytest.mark.parametrize("setting", ["max_batch", "max_num_batched_tokens", "block_size"])
def test_engine_limits_below_one_are_refused(setting: str) -> None:
    with pytest.raises(ValueError, match="block_size must be >= 1, got"):
        make_engine(**{setting: 0})
