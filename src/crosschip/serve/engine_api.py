"""The contract between the OpenAI serving layer and an inference engine (vLLM's `EngineClient` role).

The serving layer turns HTTP requests into `GenerationRequest`s (token ids + sampling options) and
consumes `RequestOutput`s; it never touches the model. The engine owns the model, the KV cache,
continuous batching and sampling. Text-level concerns (chat templates, stop strings, detokenizing,
`n` > 1 as n requests) stay in the serving layer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "abort"]


class QueueFullError(Exception):
    """The admission queue is full: the server answers 429 with Retry-After."""

    def __init__(self, retry_after_s: float = 1.0) -> None:
        super().__init__("the request queue is full")
        self.retry_after_s = retry_after_s


class RequestTooLongError(ValueError):
    """Prompt (+ max_tokens) exceeds the engine's context: the server answers 400."""


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # per-request generator: the same seed gives the same sample, batched or not
    stop_token_ids: tuple[int, ...] = ()  # e.g. EOS; the stop token is returned (as vLLM does), then ends it
    logprobs: int | None = None  # None: off; K >= 0: logprob of each sampled token plus the top-K
    prompt_logprobs: int | None = None  # None: off; K >= 0: logprob of each prompt token (echo) plus top-K
    # OpenAI's penalties over the tokens generated so far, as vLLM applies them (model_executor/layers/utils.py
    # `apply_penalties`): logits -= frequency * count + presence * (count > 0), before sampling and greedy.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), OpenAI's logit_bias
    # Prompt scoring (`echo` with `max_tokens: 0`): the one token decoded is dropped, so it needs no cache slot
    # and the prompt may fill the whole context.
    score_only: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float  # log-softmax of the raw model logits (before temperature/top-p), float32
    top: tuple[tuple[int, float], ...] = ()  # the top-K (token id, logprob), highest first


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingOptions
    timeout_s: float | None = None  # engine aborts with finish_reason "abort" once exceeded


@dataclass
class RequestOutput:
    """An increment of one request's output; the last one has `finished=True`."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)  # new tokens since the previous output
    logprobs: list[TokenLogprob] | None = None  # one per new token when requested
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first output only; entry 0 is None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0  # cumulative
    finished: bool = False
    finish_reason: FinishReason | None = None
    time_to_first_token_s: float | None = None  # set on the output that carries the first token


@dataclass(frozen=True)
class EngineStats:
    queue_depth: int  # admitted to the queue, waiting for a batch slot
    running: int  # sequences in the running batch
    kv_used_tokens: int  # KV cache positions held by live sequences
    kv_capacity_tokens: int  # the memory budget, in token positions
    max_batch: int
    max_queue: int
    kv_blocks_used: int = 0  # paged KV cache blocks held by live sequences
    kv_blocks_total: int = 0  # blocks in the pool
    kv_block_size: int = 0  # token positions per block
    preemptions: int = 0  # running sequences sent back to wait for blocks (recomputed later), since start
    prefix_queries: int = 0  # prompt tokens of admitted sequences looked up in the prefix cache, since start
    prefix_hits: int = 0  # ... of which found there (their K/V shared, not computed)
    # Where the scheduler thread's time goes, since start: steps, then seconds scheduling + building batches,
    # in the model forward, and sampling + emitting (the per-step host overhead is schedule_s + sample_s).
    steps: int = 0
    schedule_s: float = 0.0
    forward_s: float = 0.0
    sample_s: float = 0.0


class Engine(Protocol):
    model_name: str
    max_context: int

    async def start(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream outputs. Raises QueueFullError / RequestTooLongError before the first output.

        If the consumer stops iterating (client disconnect: the generator is closed or its task
        cancelled), the request is aborted and its KV cache freed at the next token boundary.
        """
        ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    async def shutdown(self, drain: bool = True) -> None:
        """Stop accepting work; with drain, finish running and queued requests first."""
        ...
