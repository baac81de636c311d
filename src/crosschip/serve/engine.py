"""`BatchEngine`: continuous batching with chunked prefill over a paged KV cache (`engine_api.Engine`).

One scheduler thread owns the model, the KV cache and every running sequence. Each iteration it
(1) takes new requests and aborts from a lock-protected inbox, (2) aborts timed-out requests,
(3) schedules one step under a token budget (`max_num_batched_tokens`), as vLLM's V1 scheduler
does: every running decode gets its one token, then unfinished prompts continue, then waiting
requests are admitted FIFO while blocks and budget last, a long prompt being split into chunks
over several steps, (4) runs the whole step as ONE forward (`runner.forward`) and samples every
sequence that reached the end of its tokens in one batched call: the only host sync of the step.

A sequence holds KV cache blocks (`paged.BlockAllocator`) for the tokens it has computed, grown
on demand and freed when it finishes or is aborted. When the pool runs dry, the newest running
sequence is preempted: its blocks are freed and it waits to be recomputed (prompt + tokens so far),
so its output continues unchanged. Outputs reach each request's `asyncio.Queue` through
`loop.call_soon_threadsafe`, one call per event loop and step, so the server's event loop never
waits on model work (torch ops release the GIL).
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crosschip.devices import memory_info, resolve_device
from crosschip.serve.engine_api import (
    EngineStats,
    FinishReason,
    GenerationRequest,
    QueueFullError,
    RequestOutput,
)
from crosschip.serve.paged import DEFAULT_BLOCK_SIZE, BlockAllocator, Chunk, build_step
from crosschip.serve.runner import make_runner
from crosschip.serve.sampling import SamplingTable, prompt_logprobs, token_logprobs
from crosschip.serve.sequence import RequestStream, Sequence, validate_request

DEFAULT_MAX_CONTEXT = 2048
# Default KV budget when none is given: this share of the device memory not yet allocated.
DEFAULT_KV_MEMORY_FRACTION = 0.4
# Tokens one step may run (vLLM's max_num_batched_tokens): decodes first, then prompt chunks up to this budget.
# Larger steps read the weights fewer times per token; smaller ones keep running decodes from stalling behind
# long prompts (decode latency <= one step).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512


class EngineClosedError(QueueFullError):
    """The engine is shutting down (or has stopped) and takes no new requests: the server answers 429/503."""

    def __init__(self, reason: str = "the engine is shutting down") -> None:
        super().__init__(retry_after_s=5.0)
        self.args = (reason,)


class BatchEngine:
    """Continuous-batching inference engine for one model on one device (see the module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any | None,
        model_name: str,
        device: torch.device | str | None = None,
        max_batch: int = 16,
        max_queue: int = 64,
        max_context: int | None = None,
        kv_budget_bytes: int | None = None,
        compile: bool = False,
        layout: str = "auto",
        generic: bool = False,
        max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
        block_size: int = DEFAULT_BLOCK_SIZE,
        int8: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        prefix_caching: bool = True,
        decode_kernel: str = "auto",
    ) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer, self.model_name = tokenizer, model_name
        limit = int(getattr(model.config, "max_position_embeddings", DEFAULT_MAX_CONTEXT))
        self.max_context = min(limit, DEFAULT_MAX_CONTEXT) if max_context is None else int(max_context)
        if not 1 <= self.max_context <= limit:
            raise ValueError(f"max_context must be in [1, {limit}] for this model, got {self.max_context}")
        budget = kv_budget_bytes if kv_budget_bytes is not None else _default_kv_budget(self.device)
        if min(max_batch, max_num_batched_tokens, block_size) < 1:
            raise ValueError(f"max_batch, max_num_batched_tokens and block_size must be >= 1, got {max_batch}, "
                             f"{max_num_batched_tokens}, {block_size}")
        self.runner = make_runner(model, max_batch, self.max_context, budget, compile, generic, layout, block_size,
                                  int8, decode_kernel)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.vocab_size = self.runner.vocab_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self._blocks = BlockAllocator(self.runner.num_blocks, self.runner.block_size)
        # Admission keeps this many blocks free for running sequences to grow into (vLLM's watermark).
        self._watermark = self.runner.num_blocks // 100
        # Prefix caching needs a runner that reads K/V from the shared blocks (not one that keeps its own caches).
        self.prefix_caching = prefix_caching and getattr(self.runner, "shares_blocks", False)
        self._table = SamplingTable(max_batch, self.device)
        self._rows = list(range(max_batch - 1, -1, -1))  # free sampling-table rows
        self._rng = random.Random()
        # Reentrant: a stream's __del__ may run (garbage collection) on a thread that holds the lock.
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._inbox: deque[Sequence] = deque()
        self._aborts: list[Sequence] = []
        self._live: dict[str, Sequence] = {}
        self._pending = 0  # submitted, not yet running (guarded by _lock)
        self._occupied = 0  # running sequences (guarded by _lock)
        self._closing = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._init_scheduler_state()
        self._stats = self._snapshot()

    def _init_scheduler_state(self) -> None:
        """What only the scheduler thread touches once it runs."""
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # in admission order
        self._next_deadline = math.inf
        self._preemptions = 0
        self._prefix = [0, 0]  # prompt tokens looked up in the prefix cache, and found there
        self._times = [0, 0.0, 0.0, 0.0]  # steps, schedule + build, forward, sample + emit (seconds)

    @classmethod
    def from_checkpoint(
        cls, path: Path | str, device: str = "auto", dtype: torch.dtype | None = None, **kwargs: Any
    ) -> BatchEngine:
        """Load a crosschip (or plain HF) checkpoint with its tokenizer; dtype defaults to float32.

        model_name defaults to the name of the directory given (a training run's name, not `model`).
        """
        from crosschip.checkpoint import load_model, load_tokenizer_if_present
        from crosschip.serve.int8 import load_int8_weights

        target = resolve_device(device)
        model, ckpt = load_model(Path(path), target, dtype or torch.float32)
        kwargs.setdefault("model_name", Path(path).resolve().name)
        kwargs.setdefault("int8", load_int8_weights(ckpt))
        return cls(model, load_tokenizer_if_present(ckpt.path), device=target, **kwargs)

    # ------------------------------------------------------------------ public API (event loop side)

    async def start(self) -> None:
        self._ensure_thread()

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Queue a request and return its output stream; raises before any output when it cannot run."""
        validate_request(request, self.vocab_size, self.max_context)
        loop = asyncio.get_running_loop()
        opts = request.sampling
        seed = self._rng.getrandbits(64) if opts.seed is None else opts.seed
        deadline = math.inf if request.timeout_s is None else time.monotonic() + request.timeout_s
        stop = frozenset(opts.stop_token_ids)
        seq = Sequence(request, loop, asyncio.Queue(), time.monotonic(), deadline, seed, stop,
                        tokens=list(request.prompt_ids))
        with self._lock:
            if self._error is not None:
                raise EngineClosedError(f"the engine stopped after an error: {self._error!r}")
            if self._closing:
                raise EngineClosedError()
            if request.request_id in self._live:
                raise ValueError(f"request id {request.request_id!r} is already running")
            free_slots = self.max_batch - self._occupied
            if self._pending - free_slots >= self.max_queue:
                raise QueueFullError(retry_after_s=1.0)
            self._pending += 1
            self._live[request.request_id] = seq
            self._inbox.append(seq)
        self._ensure_thread()
        self._wake.set()
        return RequestStream(seq, self._abort_sequence)

    def abort(self, request_id: str) -> None:
        with self._lock:
            seq = self._live.get(request_id)
        if seq is not None:
            self._abort_sequence(seq)

    def stats(self) -> EngineStats:
        with self._lock:
            return self._stats

    async def shutdown(self, drain: bool = True) -> None:
        """Stop accepting work; with drain, finish running and queued requests first, then stop the thread."""
        with self._lock:
            self._closing = True
            if not drain:
                self._aborts.extend(self._live.values())
        self._wake.set()
        thread = self._thread
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join)

    # ------------------------------------------------------------------ validation

    # ------------------------------------------------------------------ cross-thread plumbing

    def _abort_sequence(self, seq: Sequence) -> None:
        with self._lock:
            if seq.finished or self._thread is None:
                return
            self._aborts.append(seq)
        self._wake.set()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="crosschip-engine", daemon=True)
            self._thread.start()

    def _deliver(self, items: list[tuple[Sequence, RequestOutput | BaseException]]) -> None:
        """Hand outputs to their event loops: one thread-safe callback per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for seq, out in items:
            by_loop[seq.loop].append((seq.queue, out))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                continue

    # ------------------------------------------------------------------ scheduler thread

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._iteration():
                    pass
        except Exception as exc:  # noqa: BLE001 - reported to every live request, then the engine stops
            self._fail_all(exc)

    def _iteration(self) -> bool:
        """One scheduler iteration; False once closing and nothing is left to do."""
        outputs: list[tuple[Sequence, RequestOutput | BaseException]] = []
        closing = self._take_inbox(outputs)
        self._expire(outputs)
        if closing and not self._waiting and not self._running:
            self._publish_stats()
            self._deliver(outputs)
            return False
        start = time.perf_counter()
        plan = self._schedule()
        if plan:
            self._step(plan, outputs, start)
        self._publish_stats()  # before delivery: a consumer that sees an output sees stats at least as new
        self._deliver(outputs)
        if not self._running and not outputs:
            self._idle_wait()
        return True

    def _take_inbox(self, outputs: list) -> bool:
        with self._lock:
            arrived = list(self._inbox)
            self._inbox.clear()
            aborts, self._aborts = self._aborts, []
            closing = self._closing
        self._waiting.extend(arrived)
        self._next_deadline = min([self._next_deadline, *(seq.deadline for seq in arrived)])
        for seq in aborts:
            self._drop(seq, "abort", outputs)
        return closing

    def _idle_wait(self) -> None:
        timeout = (
            None if math.isinf(self._next_deadline) else max(0.0, self._next_deadline - time.monotonic())
        )
        self._wake.wait(timeout)
        self._wake.clear()

    def _expire(self, outputs: list) -> None:
        now = time.monotonic()
        if now < self._next_deadline:
            return
        for seq in [s for s in (*self._waiting, *self._running) if s.deadline <= now]:
            self._drop(seq, "abort", outputs)
        live = [s.deadline for s in (*self._waiting, *self._running)]
        self._next_deadline = min(live, default=math.inf)

    def _drop(self, seq: Sequence, reason: FinishReason, outputs: list) -> None:
        """Finish a waiting or running sequence now (abort / timeout)."""
        if seq.finished:
            return
        if seq in self._waiting:  # never admitted, or preempted
            self._waiting.remove(seq)
            with self._lock:
                self._pending -= 1
        else:
            self._leave_batch(seq)
        self._finish(seq, reason, outputs)

    def _finish(
        self, seq: Sequence, reason: FinishReason, outputs: list, out: RequestOutput | None = None
    ) -> None:
        seq.finished = True
        with self._lock:
            if self._live.get(seq.id) is seq:
                del self._live[seq.id]
        out = out or RequestOutput(seq.id, num_prompt_tokens=len(seq.request.prompt_ids))
        out.finished, out.finish_reason, out.num_generated_tokens = True, reason, seq.generated
        outputs.append((seq, out))

    def _fail(self, seq: Sequence, exc: BaseException, outputs: list) -> None:
        """End one request with an error its consumer raises (the server answers 500)."""
        seq.finished = True
        with self._lock:
            if self._live.get(seq.id) is seq:
                del self._live[seq.id]
        outputs.append((seq, RuntimeError(f"request {seq.id} failed in the engine: {exc!r}")))

    def _release(self, seq: Sequence) -> None:
        """Give back seq's blocks, sampling row and any runner state."""
        self._blocks.release(seq.blocks)
        self.runner.free(seq.key)
        if seq.row >= 0:
            self._rows.append(seq.row)
            seq.row = -1
        seq.computed = seq.registered = 0

    def _leave_batch(self, seq: Sequence) -> None:
        """Take a running sequence out of the batch and free its blocks."""
        self._running.remove(seq)
        self._release(seq)
        with self._lock:
            self._occupied -= 1

    def _preempt(self, seq: Sequence) -> None:
        """Out of blocks: free a running sequence's cache; it waits first in line to be recomputed."""
        self._leave_batch(seq)
        self._preemptions += 1
        self._waiting.appendleft(seq)
        with self._lock:
            self._pending += 1

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """This step's (sequence, token count) pairs under the token budget; decodes come first."""
        budget = self.max_num_batched_tokens
        plan: dict[Sequence, int] = {}
        # Running sequences with one token left (decodes) first, then unfinished prompts, oldest first.
        for seq in sorted(self._running, key=lambda s: len(s.tokens) - s.computed > 1):
            if budget == 0 or seq not in self._running:  # out of budget, or preempted below
                continue
            n = self._chunk(seq, budget)
            while not self._blocks.grow(seq.blocks, seq.computed + n):
                victim = self._running[-1]  # the newest
                budget += plan.pop(victim, 0)
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                plan[seq] = n
                budget -= n
        while self._waiting and budget > 0 and len(self._running) < self.max_batch:
            seq = self._waiting[0]
            cached = self._reuse_prefix(seq)
            n = self._chunk(seq, budget)
            reserve = self._watermark if self._running else 0
            if self._blocks.missing(seq.blocks, seq.computed + n) + reserve > self._blocks.num_free:
                if cached:  # give the shared blocks back: the sequence waits whole
                    self._release(seq)
                break
            self._prefix[0] += len(seq.tokens)
            self._prefix[1] += cached
            self._waiting.popleft()
            self._blocks.grow(seq.blocks, seq.computed + n)
            seq.row = self._rows.pop()
            self._table.set(seq.row, seq.request.sampling, seq.seed, self.vocab_size,
                            seq.tokens[len(seq.request.prompt_ids):])
            self._running.append(seq)
            with self._lock:
                self._pending -= 1
                self._occupied += 1
            plan[seq] = n
            budget -= n
        return sorted(plan.items(), key=lambda item: item[1] > 1)  # single-token chunks first

    def _reuse_prefix(self, seq: Sequence) -> int:
        """Share the cached blocks that hold seq's leading full blocks; returns the tokens so skipped.

        The block holding the last token is always computed (its logits are needed), and a prompt whose
        logprobs are asked for is computed whole.
        """
        if not self.prefix_caching or seq.computed or seq.wants_prompt_logits:
            return 0
        seq.blocks = self._blocks.match(seq.tokens, (len(seq.tokens) - 1) // self.runner.block_size)
        seq.registered = len(seq.blocks)
        seq.computed = seq.registered * self.runner.block_size
        return seq.computed

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens of seq to run now: all that are left, or what the budget allows (a prompt chunk).

        A prompt whose logprobs are asked for runs whole, in one step: its logits are needed together.
        """
        left = len(seq.tokens) - seq.computed
        if seq.wants_prompt_logits:
            return left
        return min(left, budget)

    def _step(self, plan: list[tuple[Sequence, int]], outputs: list, start: float | None = None) -> None:
        """Run one step's forward, then sample every sequence that computed all its tokens.

        `start`: when scheduling began, for the step timings (`EngineStats.schedule_s` ...).
        """
        chunks = []
        for seq, n in plan:
            end = seq.computed + n
            mode = "none" if end < len(seq.tokens) else "all" if seq.wants_prompt_logits else "last"
            chunks.append(Chunk(seq.key, seq.tokens[seq.computed:end], seq.computed, seq.blocks, mode))
        try:
            batch = build_step(chunks, self.runner.block_size, self.device)
            built = time.perf_counter()
            logits = self.runner.forward(batch)  # [R, V]
            forwarded = time.perf_counter()
        except RuntimeError as exc:  # e.g. out of device memory: fail the requests that cause it, keep serving
            if len(plan) > 1:  # find them: each alone (rewriting the same cache positions is harmless)
                for item in plan:
                    self._step([item], outputs)
                return
            self._leave_batch(plan[0][0])
            self._fail(plan[0][0], exc, outputs)
            return
        done, last, offset = [], [], 0
        for (seq, n), count in zip(plan, batch.logits_counts, strict=True):
            seq.computed += n
            while self.prefix_caching and seq.registered < seq.computed // self.runner.block_size:
                self._blocks.register(seq.blocks, seq.registered, seq.tokens)
                seq.registered += 1
            if count:
                done.append((seq, offset, count))
                last.append(offset + count - 1)
            offset += count
        if done:
            self._sample(done, logits, last, outputs)
        if start is not None:
            self._times[0] += 1
            self._times[1] += built - start
            self._times[2] += forwarded - built
            self._times[3] += time.perf_counter() - forwarded

    def _sample(self, done: list[tuple[Sequence, int, int]], logits: torch.Tensor, last: list[int],
                outputs: list) -> None:
        """Sample the next token of each finished chunk's sequence in one call, then emit them."""
        rows = np.array([seq.row for seq, _, _ in done], dtype=np.int64)
        final = logits[torch.tensor(last, device=logits.device)] if len(last) < logits.shape[0] else logits
        ids = self._table.sample(final, rows)  # [n]
        self._table.record(rows, ids)
        want = [i for i, (seq, _, _) in enumerate(done) if seq.request.sampling.logprobs is not None]
        lps: dict[int, Any] = {}
        if want:
            pick = torch.tensor(want, device=final.device)
            ks = [done[i][0].request.sampling.logprobs for i in want]
            lps = dict(zip(want, token_logprobs(final[pick], ids[pick], ks), strict=True))
        for i, ((seq, offset, count), token) in enumerate(zip(done, ids.tolist(), strict=True)):
            out = RequestOutput(seq.id, num_prompt_tokens=len(seq.request.prompt_ids))
            if seq.wants_prompt_logits:
                prompt = torch.tensor(seq.request.prompt_ids, device=logits.device)
                k = min(seq.request.sampling.prompt_logprobs, self.vocab_size)
                out.prompt_logprobs = prompt_logprobs(logits[offset : offset + count], prompt, k)
            seq.prompt_done = True
            self._emit(seq, token, lps.get(i), out, outputs)

    def _emit(self, seq: Sequence, token: int, logprob: Any, out: RequestOutput, outputs: list) -> None:
        """Append a sampled token to seq's output and finish seq when it is done.

        A stop token (EOS) is returned too, then ends the sequence: vLLM's token_ids and logprobs carry it
        (its text prints nothing), and scorers rely on that, e.g. lm-eval drops the last echoed entry as
        the generated one (`parse_logprobs`: token_logprobs[ctxlen:-1]).
        """
        seq.generated += 1
        seq.tokens.append(token)
        out.token_ids, out.num_generated_tokens = [token], seq.generated
        out.logprobs = None if logprob is None else [logprob]
        if not seq.first_token_sent:
            seq.first_token_sent = True
            out.time_to_first_token_s = time.monotonic() - seq.submitted
        # computed + 1 > max_context: the pending token would have no cache position left.
        if token in seq.stop_ids:
            self._leave_batch(seq)
            self._finish(seq, "stop", outputs, out)
        elif seq.generated >= seq.request.sampling.max_tokens or seq.computed >= self.max_context:
            self._leave_batch(seq)
            self._finish(seq, "length", outputs, out)
        else:
            outputs.append((seq, out))

    def _snapshot(self) -> EngineStats:
        return EngineStats(
            queue_depth=self._pending,
            running=len(self._running),
            kv_used_tokens=sum(seq.computed for seq in self._running),
            kv_capacity_tokens=self.runner.num_blocks * self.runner.block_size,
            max_batch=self.max_batch,
            max_queue=self.max_queue,
            kv_blocks_used=self._blocks.num_used,
            kv_blocks_total=self.runner.num_blocks,
            kv_block_size=self.runner.block_size,
            preemptions=self._preemptions,
            prefix_queries=self._prefix[0],
            prefix_hits=self._prefix[1],
            steps=int(self._times[0]),
            schedule_s=self._times[1],
            forward_s=self._times[2],
            sample_s=self._times[3],
        )

    def _publish_stats(self) -> None:
        with self._lock:
            self._stats = self._snapshot()

    def _fail_all(self, exc: BaseException) -> None:
        """The scheduler crashed: every live request gets the error, new requests are refused."""
        with self._lock:
            self._error = exc
            live = list(self._live.values())
            self._live.clear()
        for seq in live:
            seq.finished = True
        self._deliver([(seq, RuntimeError(f"the inference engine failed: {exc!r}")) for seq in live])


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput | BaseException]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


def _default_kv_budget(device: torch.device) -> int | None:
    """A share of the device memory not yet allocated; None (max_batch full-context sequences) if unknown."""
    info = memory_info(device)
    total, used = info.get("total_bytes"), info.get("allocated_bytes")
    if total is None or used is None:
        return None
    return int(max(0, total - used) * DEFAULT_KV_MEMORY_FRACTION)
