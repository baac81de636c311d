"""BatchEngine: batch invariance, exact logprobs, seeded sampling, admission, cancellation, shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from crosschip import models
from crosschip.serve.engine import BatchEngine, EngineClosedError
from crosschip.serve.engine_api import (
    GenerationRequest,
    QueueFullError,
    RequestOutput,
    RequestTooLongError,
    SamplingOptions,
)
from crosschip.serve.paged import StepBatch
from crosschip.serve.sampling import filter_top_k_rows, sample_rows, uniforms

VOCAB = 400
ATOL = 2e-5


def make_engine(preset: str = "tiny", **kwargs: Any) -> BatchEngine:
    config = models.get_preset(preset).build_config(VOCAB, 0, 1, 2)
    kwargs.setdefault("layout", "nt")
    kwargs.setdefault("max_context", 128)
    return BatchEngine(models.build_model(config, seed=0), None, preset, **kwargs)


def prompt(seed: int, length: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(3, VOCAB, (length,), generator=gen).tolist())


def request(rid: str, ids: tuple[int, ...], timeout_s: float | None = None, **opts: Any) -> GenerationRequest:
    opts.setdefault("temperature", 0.0)
    return GenerationRequest(rid, ids, SamplingOptions(**opts), timeout_s=timeout_s)


async def collect(
    engine: BatchEngine, req: GenerationRequest, seen: list[int] | None = None
) -> list[RequestOutput]:
    """All outputs of a request; `seen` records the running-batch size after each output."""
    outs = []
    async for out in engine.generate(req):
        outs.append(out)
        if seen is not None:
            seen.append(engine.stats().running)
    return outs


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for out in outs for t in out.token_ids]


def run(engine: BatchEngine, main: Callable[[], Any]) -> Any:
    """Run an async test body, always shutting the engine down."""

    async def wrapper() -> Any:
        try:
            return await main()
        finally:
            await engine.shutdown(drain=False)

    return asyncio.run(wrapper())


async def wait_idle(engine: BatchEngine, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.running == 0 and stats.queue_depth == 0 and stats.kv_used_tokens == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine not idle: {engine.stats()}")


@pytest.mark.parametrize(("preset", "layout"), [("tiny", "nt"), ("tiny", "auto"), ("deepseek-tiny", "nt")])
def test_greedy_output_does_not_depend_on_the_batch(preset: str, layout: str) -> None:
    """10 requests through 4 slots: sequences join and leave mid-flight; each equals its solo run."""
    engine = make_engine(preset, max_batch=4, layout=layout)
    reqs = [request(f"r{i}", prompt(i, 3 + 5 * i), max_tokens=6 + 3 * (i % 4), logprobs=2) for i in range(10)]

    async def main() -> tuple[list, list, list[int]]:
        seen: list[int] = []
        together = await asyncio.gather(*(collect(engine, r, seen) for r in reqs))
        alone = [await collect(engine, r) for r in reqs]
        return together, alone, seen

    together, alone, seen = run(engine, main)
    assert max(seen) == 4  # really batched
    for req, t_outs, a_outs in zip(reqs, together, alone, strict=True):
        assert tokens(t_outs) == tokens(a_outs)
        assert len(tokens(t_outs)) == req.sampling.max_tokens and t_outs[-1].finish_reason == "length"
        t_lps = [lp.logprob for o in t_outs for lp in o.logprobs or []]
        a_lps = [lp.logprob for o in a_outs for lp in o.logprobs or []]
        np.testing.assert_allclose(t_lps, a_lps, atol=ATOL, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_equal_hf_log_softmax(temperature: float) -> None:
    engine = make_engine(max_batch=2)
    ids = prompt(7, 12)
    req = request("lp", ids, max_tokens=8, temperature=temperature, seed=3, logprobs=3, prompt_logprobs=2)
    outs = run(engine, lambda: collect(engine, req))
    generated = tokens(outs)
    with torch.no_grad():
        full = torch.tensor([*ids, *generated])[None]
        ref = torch.log_softmax(engine.model(input_ids=full).logits[0].float(), dim=-1)  # [S+N, V]
    echo = outs[0].prompt_logprobs
    assert echo is not None and len(echo) == len(ids) and echo[0] is None
    assert all(o.prompt_logprobs is None for o in outs[1:])
    for i in range(1, len(ids)):
        assert echo[i].token_id == ids[i]
        assert echo[i].logprob == pytest.approx(ref[i - 1, ids[i]].item(), abs=ATOL)
        top = torch.topk(ref[i - 1], 2)
        assert [t for t, _ in echo[i].top] == top.indices.tolist()
        np.testing.assert_allclose([v for _, v in echo[i].top], top.values.tolist(), atol=ATOL)
    lps = [lp for o in outs for lp in o.logprobs]
    assert [lp.token_id for lp in lps] == generated
    for j, lp in enumerate(lps):
        row = ref[len(ids) - 1 + j]
        assert lp.logprob == pytest.approx(row[generated[j]].item(), abs=ATOL)  # raw, not temperature-scaled
        assert [t for t, _ in lp.top] == torch.topk(row, 3).indices.tolist()
        if temperature == 0:
            assert generated[j] == int(row.argmax())


def test_seeded_sampling_is_reproducible_whatever_the_batch() -> None:
    engine = make_engine(max_batch=8)
    ids = prompt(11, 9)
    opts = {"max_tokens": 12, "temperature": 0.9, "top_k": 50, "top_p": 0.95}

    async def main() -> tuple[list[int], ...]:
        alone = tokens(await collect(engine, request("a", ids, seed=1234, **opts)))
        others = [
            request(f"o{i}", prompt(i, 4 + i), temperature=1.0, max_tokens=9, seed=None) for i in range(6)
        ]
        batched = await asyncio.gather(
            *(collect(engine, r) for r in others[:3]),
            collect(engine, request("b", ids, seed=1234, **opts)),
            *(collect(engine, r) for r in others[3:]),
        )
        other_seed = tokens(await collect(engine, request("c", ids, seed=1235, **opts)))
        top1 = tokens(
            await collect(engine, request("k1", ids, seed=9, max_tokens=12, temperature=1.5, top_k=1))
        )
        greedy = tokens(await collect(engine, request("g", ids, max_tokens=12)))
        return alone, tokens(batched[3]), other_seed, top1, greedy

    alone, batched, other_seed, top1, greedy = run(engine, main)
    assert batched == alone
    assert other_seed != alone
    assert top1 == greedy  # top_k=1 leaves only the argmax, whatever the temperature


def test_stop_token_ends_the_request_and_is_returned() -> None:
    """The stop token is the last returned token (as in vLLM's token_ids), with finish_reason "stop"."""
    engine = make_engine()
    ids = prompt(5, 6)

    async def main() -> tuple[list[int], list[RequestOutput]]:
        free = tokens(await collect(engine, request("free", ids, max_tokens=20)))
        stop = free[5]
        return free, await collect(engine, request("stop", ids, max_tokens=20, stop_token_ids=(stop, 12345)))

    free, outs = run(engine, main)
    cut = free.index(free[5]) + 1
    assert tokens(outs) == free[:cut]
    assert outs[-1].finished and outs[-1].finish_reason == "stop" and outs[-1].token_ids == [free[5]]
    assert outs[-1].num_generated_tokens == cut and outs[0].time_to_first_token_s is not None


def test_admission_errors_are_raised_synchronously() -> None:
    engine = make_engine(max_batch=1, max_queue=1, max_context=64)

    async def main() -> None:
        with pytest.raises(RequestTooLongError):
            engine.generate(request("long", prompt(1, 64), max_tokens=1))
        with pytest.raises(RequestTooLongError):
            engine.generate(request("long2", prompt(1, 40), max_tokens=25))
        with pytest.raises(ValueError, match="empty"):
            engine.generate(request("empty", (), max_tokens=1))
        with pytest.raises(ValueError, match="token ids"):
            engine.generate(request("oov", (1, VOCAB), max_tokens=1))
        running = engine.generate(request("a", prompt(1, 40), max_tokens=24))  # fits exactly
        queued = engine.generate(request("b", prompt(2, 4), max_tokens=2))
        with pytest.raises(ValueError, match="already running"):
            engine.generate(request("a", prompt(3, 4), max_tokens=2))
        with pytest.raises(QueueFullError):
            engine.generate(request("c", prompt(3, 4), max_tokens=2))
        assert [o async for o in running][-1].finish_reason == "length"
        assert [o async for o in queued][-1].finish_reason == "length"

    run(engine, main)


def test_explicit_abort_frees_the_slot() -> None:
    engine = make_engine("small", max_batch=2, max_context=512)

    async def main() -> list[RequestOutput]:
        outs = []
        async for out in engine.generate(request("x", prompt(1, 8), max_tokens=500)):
            outs.append(out)
            if len(outs) == 1:
                assert engine.stats().running == 1 and engine.stats().kv_used_tokens >= 8
                engine.abort("x")
        await wait_idle(engine)
        return outs

    outs = run(engine, main)
    assert outs[-1].finish_reason == "abort" and len(tokens(outs)) < 500


async def consume_then_stall(
    engine: BatchEngine, req: GenerationRequest, got_one: asyncio.Event, sent: list
) -> None:
    """A client that reads one output, then stops reading until its task is cancelled (disconnect).

    Closes the stream on the way out, as a server's response generator does; `sent` receives the
    request's output queue so the test can see what the engine sent after the client left.
    """
    stream = engine.generate(req)
    sent.append(stream._seq.queue)  # noqa: SLF001 - white-box: the final output nobody reads
    try:
        async for _ in stream:
            got_one.set()
            await asyncio.sleep(3600)
    finally:
        await stream.aclose()


def final_output(queue: asyncio.Queue) -> RequestOutput:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items[-1]


def test_client_disconnect_cancels_and_frees_the_cache() -> None:
    engine = make_engine("small", max_batch=1, max_context=512)

    async def main() -> tuple[RequestOutput, ...]:
        sent: list[asyncio.Queue] = []
        got_one = asyncio.Event()
        running = asyncio.create_task(
            consume_then_stall(engine, request("a", prompt(1, 8), max_tokens=500), got_one, sent)
        )
        await got_one.wait()
        # Cancelled while waiting inside the stream for its first output (queued behind "a").
        queued = asyncio.create_task(
            consume_then_stall(engine, request("b", prompt(2, 8), max_tokens=5), asyncio.Event(), sent)
        )
        while engine.stats().queue_depth == 0:
            await asyncio.sleep(0.001)
        queued.cancel()
        while engine.stats().queue_depth:
            await asyncio.sleep(0.001)
        assert engine.stats().running == 1
        # Cancelled while not reading: the client's `finally` closes the stream.
        running.cancel()
        await asyncio.gather(running, queued, return_exceptions=True)
        await wait_idle(engine)
        # `break` out of `async for` drops the iterator the same way.
        async for _ in engine.generate(request("c", prompt(3, 8), max_tokens=500)):
            break
        await wait_idle(engine)
        return final_output(sent[0]), final_output(sent[1])

    out_a, out_b = run(engine, main)
    assert out_a.finish_reason == "abort" and out_a.num_generated_tokens < 500
    assert out_b.finish_reason == "abort" and out_b.num_generated_tokens == 0


def test_timeouts_abort_running_and_waiting_requests() -> None:
    engine = make_engine("small", max_batch=1, max_context=512)

    async def main() -> tuple[list[RequestOutput], list[RequestOutput]]:
        running = asyncio.create_task(
            collect(engine, request("run", prompt(1, 8), max_tokens=500, timeout_s=0.3))
        )
        await asyncio.sleep(0.05)
        waiting = await collect(engine, request("wait", prompt(2, 8), max_tokens=5, timeout_s=0.1))
        return await running, waiting

    running, waiting = run(engine, main)
    assert running[-1].finish_reason == "abort" and len(tokens(running)) < 500
    assert waiting[-1].finish_reason == "abort" and tokens(waiting) == []


def test_shutdown_drains_running_and_queued_then_refuses() -> None:
    engine = make_engine(max_batch=2)

    async def main() -> list[list[RequestOutput]]:
        tasks = [
            asyncio.create_task(collect(engine, request(f"d{i}", prompt(i, 5), max_tokens=10)))
            for i in range(5)
        ]
        await asyncio.sleep(0)  # let every task submit its request
        await engine.shutdown(drain=True)
        with pytest.raises(EngineClosedError):
            engine.generate(request("late", prompt(9, 5), max_tokens=2))
        return await asyncio.gather(*tasks)

    results = run(engine, main)
    assert all(len(tokens(outs)) == 10 and outs[-1].finish_reason == "length" for outs in results)


def test_shutdown_without_drain_aborts() -> None:
    engine = make_engine("small", max_batch=1, max_context=512)

    async def main() -> list[list[RequestOutput]]:
        tasks = [
            asyncio.create_task(collect(engine, request(f"n{i}", prompt(i, 5), max_tokens=500)))
            for i in range(3)
        ]
        await asyncio.sleep(0.05)
        await engine.shutdown(drain=False)
        return await asyncio.gather(*tasks)

    assert all(outs[-1].finish_reason == "abort" for outs in run(engine, main))


def test_from_checkpoint(make_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    ckpt = make_checkpoint("tiny", tmp_path / "tiny-ckpt")
    engine = BatchEngine.from_checkpoint(ckpt, device="cpu", max_batch=2, max_context=64, layout="nt")
    assert engine.model_name == "tiny-ckpt" and engine.tokenizer is not None and engine.max_context == 64
    ids = tuple(engine.tokenizer("hello world", add_special_tokens=False)["input_ids"])
    outs = run(engine, lambda: collect(engine, request("ck", ids, max_tokens=3)))
    assert outs[-1].num_generated_tokens == len(tokens(outs)) <= 3


def test_sample_rows_follows_the_filtered_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(4000, 1)
    u = torch.from_numpy(uniforms(np.arange(4000, dtype=np.uint64), np.zeros(4000, dtype=np.uint64)))
    ones = torch.ones(4000)
    plain = sample_rows(logits, ones, torch.zeros(4000, dtype=torch.long), ones, u, max_k=0, any_top_p=False)
    freq = torch.bincount(plain, minlength=5).float() / 4000
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.03, rtol=0)
    top2 = sample_rows(logits, ones, torch.full((4000,), 2), ones, u, max_k=2, any_top_p=False)
    assert set(top2.tolist()) == {0, 1}
    # top_p 0.5: p(token 0) = 0.64 already reaches it, so only the argmax survives
    nucleus = sample_rows(logits, ones, torch.zeros(4000, dtype=torch.long), ones * 0.5, u, max_k=0)
    assert set(nucleus.tolist()) == {0}
    greedy = sample_rows(logits, torch.zeros(4000), torch.zeros(4000, dtype=torch.long), ones, u)
    assert set(greedy.tolist()) == {0}
    mixed_k = filter_top_k_rows(logits[:2], torch.tensor([0, 3]), 3)
    assert torch.isinf(mixed_k[0]).sum() == 0 and torch.isinf(mixed_k[1]).sum() == 2
    assert uniforms(np.array([5], dtype=np.uint64), np.array([3], dtype=np.uint64)) == uniforms(
        np.array([5], dtype=np.uint64), np.array([3], dtype=np.uint64)
    )


def test_a_failing_prefill_fails_only_its_request() -> None:
    engine = make_engine(max_batch=2)
    real_forward = engine.runner.forward

    def forward(batch: StepBatch) -> torch.Tensor:
        ids = batch.tokens.tolist()
        firsts = [ids[batch.query_starts[b]] for b, start in enumerate(batch.starts) if start == 0]
        if 7 in firsts:  # fault injection: the prompt starting with 7 does not fit in device memory
            raise RuntimeError("out of memory")
        return real_forward(batch)

    engine.runner.forward = forward

    async def main() -> list[Any]:
        results = await asyncio.gather(
            collect(engine, request("bad", (7, 8, 9), max_tokens=3)),
            collect(engine, request("good", (9, 8, 7), max_tokens=3)),
            return_exceptions=True,
        )
        await wait_idle(engine)
        return results

    bad, good = run(engine, main)
    assert isinstance(bad, RuntimeError) and "out of memory" in str(bad)
    assert good[-1].finish_reason == "length" and len(tokens(good)) == 3


def test_a_crashed_scheduler_fails_live_requests_and_refuses_new_ones() -> None:
    engine = make_engine(max_batch=2)

    def decode(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise ValueError("kernel failure")  # fault injection: not a per-request error

    engine.runner.forward = decode

    async def main() -> list[Any]:
        results = await asyncio.gather(
            *(collect(engine, request(f"c{i}", prompt(i, 4), max_tokens=5)) for i in range(3)),
            return_exceptions=True,
        )
        with pytest.raises(EngineClosedError, match="error"):
            engine.generate(request("after", prompt(9, 4), max_tokens=5))
        return results

    assert all(isinstance(r, RuntimeError) and "kernel failure" in str(r) for r in run(engine, main))


# ---------------------------------------------------------------- penalties, logit_bias, prompt scoring (issue 14)


def reference_greedy(model: Any, ids: tuple[int, ...], steps: int, frequency: float = 0.0, presence: float = 0.0,
                     bias: dict[int, float] | None = None) -> list[int]:
    """OpenAI's definition spelled out on full forwards: logits + bias - frequency * count - presence * (count > 0),
    counts over the generated tokens only, then argmax."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([list(ids) + out])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
            for token, b in (bias or {}).items():
                logits[token] += b
            out.append(int(torch.argmax(logits - frequency * counts - presence * (counts > 0).float())))
    return out


def test_frequency_and_presence_penalties_follow_openai_and_batch_independently() -> None:
    engine = make_engine(max_batch=4)
    ids = prompt(7, 6)
    steps = 24
    cases = {"f": {"frequency_penalty": 1.5}, "p": {"presence_penalty": 2.0}, "fp": {"frequency_penalty": 0.5,
             "presence_penalty": -0.5}, "none": {}}
    # The references first: the engine's runner re-lays the model's weights for its kernels, after which the
    # plain forward is ~100x slower here.
    expected = {name: reference_greedy(engine.model, ids, steps, kw.get("frequency_penalty", 0.0),
                                       kw.get("presence_penalty", 0.0)) for name, kw in cases.items()}
    plain = expected["none"]
    assert len(set(plain)) < steps, "the random model must repeat tokens for penalties to matter"

    async def main() -> dict[str, list[int]]:
        reqs = {k: request(k, ids, max_tokens=steps, **kw) for k, kw in cases.items()}
        outs = await asyncio.gather(*(collect(engine, r) for r in reqs.values()))  # one batch: rows differ
        return {k: tokens(o) for k, o in zip(reqs, outs, strict=True)}

    got = run(engine, main)
    assert got == expected
    assert got["f"] != plain and got["p"] != plain


def test_logit_bias_steers_every_step_and_logprobs_stay_raw() -> None:
    engine = make_engine()
    ids = prompt(3, 5)
    favourite = 7
    expected = reference_greedy(engine.model, ids, 6, bias={favourite: 100.0})  # before the runner re-lays weights
    with torch.inference_mode():
        raw = torch.log_softmax(engine.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)

    async def main() -> list[RequestOutput]:
        return await collect(engine, request("b", ids, max_tokens=6, logprobs=0, logit_bias=((favourite, 100.0),)))

    outs = run(engine, main)
    assert tokens(outs) == expected == [favourite] * 6
    assert outs[0].logprobs[0].logprob == pytest.approx(float(raw[favourite]), abs=1e-4)  # not the biased one


def test_score_only_prompt_may_fill_the_context() -> None:
    """echo with max_tokens 0 (prompt scoring, lm-eval's rolling windows): a prompt of exactly the context runs."""
    engine = make_engine(max_context=64)
    ids = prompt(5, 64)

    async def main() -> list[RequestOutput]:
        with pytest.raises(RequestTooLongError):  # generating needs room for the token; scoring does not
            engine.generate(request("gen", ids, max_tokens=1))
        return await collect(engine, request("score", ids, max_tokens=1, prompt_logprobs=0, score_only=True))

    outs = run(engine, main)
    assert outs[-1].finished and len(outs[0].prompt_logprobs) == 64
