"""Serve fixtures: a tiny checkpoint, reference logprobs, a real server process, an in-process engine.

`ReferenceEngine` is a small, slow, obviously-correct implementation of the `Engine` protocol (full
forward per token, no cache) used to test the serving layer in-process; the acceptance tests in
`test_server_process.py` start the real `BatchEngine` in a real server process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from crosschip.generate import SamplingParams, sample_next
from crosschip.serve.engine_api import (
    EngineStats,
    GenerationRequest,
    QueueFullError,
    RequestOutput,
    RequestTooLongError,
    TokenLogprob,
)
from serverkit import ServerProcess, start_server


@pytest.fixture(scope="session")
def serve_ckpt(make_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama checkpoint (random weights, the tiny BPE tokenizer with its chat template)."""
    return make_checkpoint("tiny", tmp_path_factory.mktemp("serve") / "tiny-llama")


@pytest.fixture(scope="session")
def ref_model(serve_ckpt: Path) -> Any:
    """The checkpoint loaded the plain Hugging Face way: the ground truth for logprobs."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(serve_ckpt, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def serve_tokenizer(serve_ckpt: Path) -> Any:
    from crosschip.checkpoint import load_tokenizer_if_present

    return load_tokenizer_if_present(serve_ckpt)


@torch.inference_mode()
def reference_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] float32: row i is log p(next token | ids[: i + 1])."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@torch.inference_mode()
def greedy_reference(model: Any, ids: list[int], max_tokens: int, eos: int | None) -> list[int]:
    out: list[int] = []
    for _ in range(max_tokens):
        token = int(reference_logprobs(model, ids + out)[-1].argmax())
        if token == eos:
            break
        out.append(token)
    return out


# ---------------------------------------------------------------- the in-process test double


def _entry(row: torch.Tensor, token_id: int, k: int) -> TokenLogprob:
    top = torch.topk(row, k) if k > 0 else None
    pairs = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else ()
    return TokenLogprob(token_id, float(row[token_id]), pairs)


@dataclass
class ReferenceEngine:
    """The Engine protocol, done the slow obvious way: a full forward per token, one sequence at a time.

    `step_delay_s` stretches each token so tests can observe queueing, cancellation and timeouts.
    """

    model: Any
    model_name: str
    max_context: int = 256
    max_batch: int = 4
    max_queue: int = 8
    step_delay_s: float = 0.0
    _live: dict[str, int] = field(default_factory=dict)  # request id -> tokens held (the "KV cache")
    _waiting: int = 0
    _aborted: set[str] = field(default_factory=set)
    _slots: asyncio.Semaphore | None = None
    started: bool = False
    shut_down: bool = False

    async def start(self) -> None:
        self._slots = asyncio.Semaphore(self.max_batch)
        self.started = True

    def stats(self) -> EngineStats:
        return EngineStats(
            self._waiting, len(self._live), sum(self._live.values()), 4096, self.max_batch, self.max_queue
        )

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    async def shutdown(self, drain: bool = True) -> None:
        while drain and (self._live or self._waiting):
            await asyncio.sleep(0.01)
        self.shut_down = True

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        opts = request.sampling
        if len(request.prompt_ids) + (0 if opts.score_only else opts.max_tokens) > self.max_context:
            raise RequestTooLongError(f"{len(request.prompt_ids)} + {opts.max_tokens} > {self.max_context}")
        assert self._slots is not None, "start() first"
        if self._slots.locked() and self._waiting >= self.max_queue:
            raise QueueFullError(retry_after_s=2.0)
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            self._live[request.request_id] = len(request.prompt_ids)
            async for out in self._decode(request):
                yield out
        finally:
            self._live.pop(request.request_id, None)
            self._slots.release()

    async def _decode(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        opts = request.sampling
        ids = list(request.prompt_ids)
        params = SamplingParams(opts.max_tokens, opts.temperature, opts.top_p, opts.top_k, opts.seed)
        gen = None if opts.seed is None else torch.Generator().manual_seed(opts.seed)
        start = time.monotonic()
        rows = reference_logprobs(self.model, ids)
        prompt_lp = None
        if opts.prompt_logprobs is not None:
            prompt_lp = [None] + [
                _entry(rows[i - 1], ids[i], opts.prompt_logprobs) for i in range(1, len(ids))
            ]
        for n in range(1, opts.max_tokens + 1):
            if request.request_id in self._aborted or (
                request.timeout_s and time.monotonic() - start > request.timeout_s
            ):
                yield RequestOutput(
                    request.request_id, num_generated_tokens=n - 1, finished=True, finish_reason="abort"
                )
                return
            row = rows[-1]
            token = int(sample_next(row[None], params, gen)[0]) if opts.temperature > 0 else int(row.argmax())
            stop = token in opts.stop_token_ids  # returned like any token, then it ends the sequence
            last = stop or n == opts.max_tokens
            lp = [_entry(row, token, opts.logprobs)] if opts.logprobs is not None else None
            yield RequestOutput(
                request.request_id,
                [token],
                lp,
                prompt_lp if n == 1 else None,
                len(request.prompt_ids),
                n,
                last,
                ("stop" if stop else "length") if last else None,
            )
            if last:
                return
            ids.append(token)
            self._live[request.request_id] = len(ids)
            if self.step_delay_s:
                await asyncio.sleep(self.step_delay_s)
            rows = reference_logprobs(self.model, ids)


# ---------------------------------------------------------------- a real server process


@pytest.fixture(scope="module")
def launch() -> Iterator[Callable[..., ServerProcess]]:
    """Factory: `launch(ckpt, *cli_args)` starts a server process; all are stopped at the end."""
    started: list[ServerProcess] = []

    def start(ckpt: Path, *args: str) -> ServerProcess:
        started.append(start_server(ckpt, *args))
        return started[-1]

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def ref_logprobs(ref_model: Any) -> Callable[[list[int]], torch.Tensor]:
    """`ref_logprobs(ids)`: [len(ids), V] log_softmax rows of the reference model."""
    return lambda ids: reference_logprobs(ref_model, ids)


@pytest.fixture
def ref_greedy(ref_model: Any, serve_tokenizer: Any) -> Callable[[list[int], int], list[int]]:
    """`ref_greedy(ids, max_tokens)`: greedy continuation by the reference model, stopping at EOS."""
    return lambda ids, n: greedy_reference(ref_model, ids, n, serve_tokenizer.eos_token_id)


@pytest.fixture(scope="session")
def make_reference_engine(ref_model: Any) -> Callable[..., ReferenceEngine]:
    """`make_reference_engine(**overrides)`: a ReferenceEngine over the tiny checkpoint's model (or `model=`)."""
    return lambda **kw: ReferenceEngine(kw.pop("model", ref_model), kw.pop("model_name", "tiny-llama"), **kw)
