"""A request's life in the engine: its state (`Sequence`), its output stream, and the checks it must pass first."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from crosschip.serve.engine_api import GenerationRequest, RequestOutput, RequestTooLongError

_KEYS = itertools.count()  # a sequence's runner key: unique for the process, unlike a client's request id


@dataclass(eq=False)
class Sequence:
    """One request's state; fields after `queue` are touched only by the scheduler thread."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float  # time.monotonic()
    deadline: float  # math.inf without a timeout
    seed: int
    stop_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)  # prompt + generated; the last may not be computed yet
    computed: int = 0  # tokens whose K/V is in the cache
    blocks: list[int] = field(default_factory=list)  # block table
    registered: int = 0  # full blocks offered to the prefix cache
    row: int = -1  # sampling table row while running
    key: int = field(default_factory=lambda: next(_KEYS))
    generated: int = 0  # tokens returned so far
    first_token_sent: bool = False
    prompt_done: bool = False  # prompt logprobs (if asked for) were returned
    finished: bool = False

    @property
    def id(self) -> str:
        return self.request.request_id

    @property
    def wants_prompt_logits(self) -> bool:
        """Prompt logprobs are asked for and not yet returned: the prompt runs whole, logits at every position."""
        return self.request.sampling.prompt_logprobs is not None and not self.prompt_done


class RequestStream:
    """The async iterator `generate` returns; closing, cancelling or dropping it aborts the request."""

    def __init__(self, seq: Sequence, abort: Callable[[Sequence], None]) -> None:
        self._seq, self._abort, self._done = seq, abort, False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._seq.queue.get()
        except asyncio.CancelledError:  # the consumer's task was cancelled: client gone
            self._close()
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._abort(self._seq)

    def __del__(self) -> None:
        self._close()  # dropped before the end (e.g. `break` out of `async for`): free its blocks


def validate_request(request: GenerationRequest, vocab_size: int, max_context: int) -> None:
    """Reject what cannot run, synchronously (the server answers 400)."""
    opts, prompt = request.sampling, request.prompt_ids
    if not prompt:
        raise ValueError("the prompt is empty: send at least one token")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    if opts.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {opts.max_tokens}")
    if len(prompt) + (0 if opts.score_only else opts.max_tokens) > max_context:
        raise RequestTooLongError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({opts.max_tokens}) exceeds the context of "
            f"{max_context} tokens"
        )
    if not (math.isfinite(opts.temperature) and opts.temperature >= 0):
        raise ValueError(f"temperature must be >= 0, got {opts.temperature}")
    if not 0 < opts.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {opts.top_p}")
    if opts.top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {opts.top_k}")
    if any(not 0 <= t < vocab_size or not -100 <= b <= 100 for t, b in opts.logit_bias):
        raise ValueError(f"logit_bias takes token ids in [0, {vocab_size}) and biases in [-100, 100]")
    for name in ("frequency_penalty", "presence_penalty"):
        if not -2.0 <= getattr(opts, name) <= 2.0:  # OpenAI's range, which vLLM enforces too
            raise ValueError(f"{name} must be in [-2, 2], got {getattr(opts, name)}")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(opts, name)
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if request.timeout_s is not None and not request.timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {request.timeout_s}")
