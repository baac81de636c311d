"""One API request in flight: its n choices, their merged engine streams, deadline and metrics.

`Run` consumes `RequestOutput`s from every choice's engine stream as they arrive, folds each into
its `Choice` (incremental detokenization, stop strings, logprobs), and maps engine errors to
OpenAI errors. Whatever ends the request (done, error, timeout, client gone), `Merger.close`
aborts the unfinished engine sequences so their KV cache is freed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from crosschip.serve.engine_api import (
    Engine,
    GenerationRequest,
    QueueFullError,
    RequestOutput,
    RequestTooLongError,
    TokenLogprob,
)
from crosschip.serve.metrics import ServerMetrics
from crosschip.serve.protocol import APIError, UsageInfo, bad_request
from crosschip.serve.text import StopTracker


def _timeout() -> APIError:
    return APIError(504, "the request timed out", code="timeout", type_="timeout_error")


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]  # what the engine sees and `echo` returns: the tokenizer's ids (BOS when it adds one)
    text: str  # the echoed text


@dataclass(eq=False)  # identity semantics: choices are deduplicated in sets
class Choice:
    """One engine sequence and everything derived from its outputs."""

    index: int
    prompt: Prompt
    request: GenerationRequest
    tracker: StopTracker
    token_ids: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # char offset of each token in the choice's text
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    sent_tokens: int = 0  # streaming: tokens whose logprobs were already sent
    last_token_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def update(self, out: RequestOutput) -> None:
        """Fold one engine output in; stop at a stop string (later tokens are dropped)."""
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        for k, token_id in enumerate(out.token_ids):
            if self.tracker.stopped:
                break
            self.offsets.append(self.tracker.push(token_id))
            self.token_ids.append(token_id)
            if out.logprobs is not None:
                self.logprobs.append(out.logprobs[k])
        if not self.tracker.stopped and out.finished:
            self.tracker.finish()
        if self.tracker.stopped:
            self.finish_reason = "stop"
        elif out.finished:
            self.finish_reason = out.finish_reason or "stop"

    def kept_tokens(self) -> int:
        """Tokens that contribute to the returned text (a stop string may cut the tail off)."""
        if not self.tracker.stopped:
            return len(self.token_ids)
        cut = len(self.tracker.text)
        return sum(1 for off in self.offsets if off < cut)

    def take_tokens(self) -> range:
        """Streaming: token positions whose text has been released (all kept ones once done)."""
        released = self.tracker.released
        end = self.kept_tokens() if self.done else sum(1 for o in self.offsets if o < released)
        span = range(self.sent_tokens, max(end, self.sent_tokens))
        self.sent_tokens = span.stop
        return span


class _Merger:
    """Runs n engine streams concurrently and yields (choice index, output) in arrival order.

    The deadline is a timer that drops a marker into the same queue: no `asyncio.wait_for` on the
    hot path, because before Python 3.12 it can swallow a cancellation that races with a result
    (a disconnected client's request would then run on).
    """

    _END = object()
    _TIMEOUT = object()

    def __init__(self, engine: Engine, requests: Sequence[GenerationRequest], timeout_s: float) -> None:
        self._engine = engine
        self._requests = list(requests)
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._live = len(self._requests)
        self._ended = [False] * len(self._requests)
        self._tasks = [asyncio.create_task(self._pump(i, r)) for i, r in enumerate(self._requests)]
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(timeout_s, self._queue.put_nowait, (-1, self._TIMEOUT))

    async def _pump(self, i: int, request: GenerationRequest) -> None:
        try:
            async for out in self._engine.generate(request):
                self._queue.put_nowait((i, out))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - forwarded to the consumer, which maps it to an HTTP error
            self._queue.put_nowait((i, e))
        finally:
            self._queue.put_nowait((i, self._END))

    async def next(self) -> tuple[int, RequestOutput] | None:
        """The next output, None once every stream ended; engine errors are re-raised here."""
        while self._live:
            i, item = await self._queue.get()
            if item is self._TIMEOUT:
                raise _timeout()
            if item is self._END:
                self._ended[i] = True
                self._live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                return i, item
        return None

    def stop(self, i: int) -> None:
        """Abort one stream (its stop string was found); its KV cache is freed by the engine."""
        if not self._ended[i]:
            self._engine.abort(self._requests[i].request_id)
            self._tasks[i].cancel()

    async def close(self) -> None:
        """Abort every unfinished stream (client gone, error, timeout) and wait for the pumps."""
        self._timer.cancel()
        for i, task in enumerate(self._tasks):
            if not task.done():
                self._engine.abort(self._requests[i].request_id)
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _engine_error(e: BaseException, prompt_param: str) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        retry = max(1, round(e.retry_after_s))
        return APIError(
            429,
            "the server is busy: the request queue is full; retry later",
            code="queue_full",
            type_="rate_limit_error",
            headers={"Retry-After": str(retry)},
        )
    if isinstance(e, RequestTooLongError):
        return bad_request(
            str(e) or "the prompt is too long for the model's context",
            prompt_param,
            code="context_length_exceeded",
        )
    if isinstance(e, ValueError):  # the engine's own input checks (the serving layer checks first)
        return bad_request(str(e), None)
    raise e


class Run:
    """One API request: its choices, the merged engine streams, metrics and the deadline."""

    def __init__(
        self,
        engine: Engine,
        metrics: ServerMetrics,
        choices: list[Choice],
        prompt_param: str,
        timeout_s: float,
    ) -> None:
        self.metrics = metrics
        self.choices = choices
        self.prompt_param = prompt_param
        self.start = time.monotonic()
        self.deadline = self.start + timeout_s
        self.merger = _Merger(engine, [c.request for c in choices], timeout_s)
        self._counted_prompts: set[int] = set()

    async def step(self) -> Choice | None:
        """Consume one engine output; the choice it updated, or None when all streams ended."""
        try:
            item = await self.merger.next()
        except Exception as e:  # noqa: BLE001 - mapped to OpenAI errors (re-raised if unknown)
            raise _engine_error(e, self.prompt_param) from e
        if item is None:
            for c in self.choices:
                if not c.done:  # the engine ended a stream without a final output
                    raise APIError(
                        503, "the engine ended the request early", code="aborted", type_="server_error"
                    )
            return None
        i, out = item
        choice = self.choices[i]
        if choice.done:
            return choice
        before = len(choice.token_ids)
        choice.update(out)
        self._observe(choice, out, len(choice.token_ids) - before)
        if choice.finish_reason == "abort":
            if time.monotonic() >= self.deadline - 0.05:
                raise _timeout()
            raise APIError(
                503, "the engine aborted the request (shutting down?)", code="aborted", type_="server_error"
            )
        if choice.done and not out.finished:
            self.merger.stop(i)  # stop string: free the sequence now
        return choice

    def _observe(self, choice: Choice, out: RequestOutput, new_tokens: int) -> None:
        metrics = self.metrics
        now = time.monotonic()
        if id(choice.prompt) not in self._counted_prompts:  # admitted: its prompt was processed
            self._counted_prompts.add(id(choice.prompt))
            metrics.prompt_tokens.inc(len(choice.prompt.ids))
        if new_tokens:
            metrics.generation_tokens.inc(new_tokens)
            if choice.last_token_at is None:
                ttft = (
                    out.time_to_first_token_s if out.time_to_first_token_s is not None else now - self.start
                )
                metrics.ttft.observe(ttft)
            else:
                gap = (now - choice.last_token_at) / new_tokens
                for _ in range(new_tokens):
                    metrics.itl.observe(gap)
            choice.last_token_at = now
        if choice.done:
            metrics.finished.inc(reason=choice.finish_reason or "stop")
            if all(c.done for c in self.choices):
                metrics.e2e.observe(now - self.start)

    async def admit(self) -> list[Choice]:
        """Wait until every choice produced its first output (or an error), before any byte is sent.

        Admission errors (queue full, too long) must become an HTTP status, which is only possible
        before the response starts. Returns the choices updated meanwhile, for the stream to report.
        """
        touched: list[Choice] = []
        waiting = {c.index for c in self.choices}
        while waiting:
            choice = await self.step()
            if choice is None:
                break
            touched.append(choice)
            waiting.discard(choice.index)
        return touched

    async def deltas(self, touched: list[Choice]) -> AsyncIterator[tuple[Choice, str, range, str | None]]:
        """Streaming: (choice, new text, new token positions, finish reason once) as outputs arrive.

        `touched` are the choices `admit` already updated; their pending text goes out first.
        """
        reported: set[int] = set()
        pending = touched
        while True:
            for c in dict.fromkeys(pending):
                text, span = c.tracker.release(), c.take_tokens()
                finish = c.finish_reason if c.done and c.index not in reported else None
                if text or span or finish:
                    yield c, text, span, finish
                if finish:
                    reported.add(c.index)
            choice = await self.step()
            if choice is None:
                return
            pending = [choice]

    async def run_to_end(self) -> None:
        while await self.step() is not None:
            pass

    def usage(self) -> UsageInfo:
        prompts = {id(c.prompt): len(c.prompt.ids) for c in self.choices}
        prompt_tokens = sum(prompts.values())
        completion = sum(len(c.token_ids) for c in self.choices)
        return UsageInfo(
            prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion
        )


async def guarded(run: Run, chunks: AsyncIterator[BaseModel]) -> AsyncIterator[BaseModel]:
    """Close the engine streams whatever ends the stream: done, error, or client gone (cancelled)."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        await run.merger.close()
