"""Deterministic, resumable, rank-sharded batches over a packed token stream.

The stream is cut into non-overlapping windows of seq_len + 1 tokens (stride seq_len, so window i's last
token is window i+1's first): x = window[:-1], y = window[1:]. Each epoch visits a permutation of the
windows drawn from ``np.random.default_rng((seed, epoch))``; global batches are consecutive slices of the
concatenated permutations, and every rank cuts its own micro-batches out of the same global batch.

Resume state is (epoch, position) in windows. It is identical on every rank and for every world size
after the same number of steps, so rank 0's state is saved once and loaded by any number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from crosschip.errors import CrosschipError


def num_windows(n_tokens: int, seq_len: int) -> int:
    """How many full windows of seq_len + 1 tokens (stride seq_len) fit in n_tokens."""
    return max(n_tokens - 1, 0) // seq_len


def _check_shape(tokens: np.ndarray, batch_size: int, seq_len: int) -> int:
    if batch_size < 1 or seq_len < 1:
        raise CrosschipError(
            f"batch size and sequence length must be >= 1 (got {batch_size}, {seq_len})",
            "pass positive values",
        )
    if tokens.ndim != 1:
        raise CrosschipError(f"token stream must be 1-D, got shape {tokens.shape}")
    n = num_windows(len(tokens), seq_len)
    if n == 0:
        raise CrosschipError(
            f"token stream of {len(tokens)} tokens is shorter than one window of {seq_len + 1} tokens",
            "pass a smaller --seq-len or more data",
        )
    return n


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy the windows out of the (memmapped) stream into fresh int64 tensors x, y of shape [B, S]."""
    buf = np.empty((len(starts), seq_len + 1), dtype=np.int64)
    for row, start in enumerate(starts):
        buf[row] = tokens[start : start + seq_len + 1]  # assignment copies: nothing aliases the memmap
    x = torch.from_numpy(np.ascontiguousarray(buf[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))
    return x, y


class PackedBatches:
    """Infinite shuffled training batches in a global order that does not depend on the world size.

    Each optimizer step consumes one global batch of ``batch_size * grad_accum * world_size`` windows,
    taken in order from the concatenated epoch permutations. Micro-batch ``m`` of rank ``r`` is slice
    ``r * grad_accum + m`` of it, so 2 ranks x 1 micro-batch see exactly the windows 1 rank x 2
    micro-batches sees, and a run resharded from N to M ranks neither repeats nor skips data.
    """

    def __init__(
        self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1,
        grad_accum: int = 1,
    ) -> None:
        self.n_windows = _check_shape(tokens, batch_size, seq_len)
        if world_size < 1 or not 0 <= rank < world_size:
            raise CrosschipError(f"invalid rank {rank} for world size {world_size}", "check the launcher settings")
        if grad_accum < 1:
            raise CrosschipError(f"grad_accum must be >= 1 (got {grad_accum})", "pass --grad-accum 1 or more")
        if seed < 0:
            raise CrosschipError(f"seed must be >= 0, got {seed}", "pass a non-negative --seed")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.grad_accum = grad_accum
        self.global_batch = batch_size * grad_accum * world_size
        self.epoch = 0
        self.position = 0  # windows of the current epoch consumed by completed global batches
        self._micro = 0  # micro-batches of the current global batch already handed out on this rank
        self._current = np.empty(0, dtype=np.int64)  # this rank's windows of the current global batch
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        """Global batches per epoch (at least 1: smaller epochs are wrapped into one batch)."""
        return max(1, self.n_windows // self.global_batch)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng((self.seed, epoch)).permutation(self.n_windows)
            self._order_epoch = epoch
        return self._order

    def _take_global(self) -> np.ndarray:
        """The next global batch's window indices; advances (epoch, position) past it."""
        windows = np.empty(self.global_batch, dtype=np.int64)
        filled = 0
        while filled < self.global_batch:
            if self.position >= self.n_windows:
                self.epoch += 1
                self.position = 0
            take = min(self.global_batch - filled, self.n_windows - self.position)
            windows[filled : filled + take] = self._epoch_order(self.epoch)[self.position : self.position + take]
            self.position += take
            filled += take
        return windows

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch (x, y), int64 of shape [batch_size, seq_len]."""
        if self._micro == 0:
            mine = self.rank * self.grad_accum * self.batch_size
            self._current = self._take_global()[mine : mine + self.grad_accum * self.batch_size]
        rows = self._current[self._micro * self.batch_size : (self._micro + 1) * self.batch_size]
        self._micro = (self._micro + 1) % self.grad_accum
        return _gather(self.tokens, rows * self.seq_len, self.seq_len)

    def state_dict(self) -> dict[str, int]:
        """Plain-int resume state, taken between optimizer steps; identical on every rank and world size."""
        if self._micro != 0:
            raise RuntimeError("loader state taken in the middle of a global batch")
        return {
            "epoch": int(self.epoch),
            "position": int(self.position),
            "seed": int(self.seed),
            "seq_len": int(self.seq_len),
            "n_windows": int(self.n_windows),
            "global_batch": int(self.global_batch),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where state_dict() was taken: same data, seed, seq_len and global batch; any world size."""
        if "global_batch" not in state and int(state.get("world_size", 1)) != 1:
            raise CrosschipError("cannot resume data order: the run was saved by a multi-rank crosschip "
                                 "before global batches", "start the run again with this crosschip")
        layout = {**state, "global_batch": state.get("global_batch", self.global_batch)}
        for key in ("seed", "seq_len", "n_windows", "global_batch"):
            if int(layout[key]) != getattr(self, key):
                raise CrosschipError(
                    f"cannot resume data order: {key} was {layout[key]}, now {getattr(self, key)}",
                    "resume with the same data, --seed, --seq-len and global batch "
                    "(--batch-size x --grad-accum x ranks)",
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.n_windows:
            raise CrosschipError(
                f"invalid data loader state epoch={epoch} position={position}", "use a valid checkpoint"
            )
        self.epoch, self.position, self._micro = epoch, position, 0


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windows in stream order, batch_size at a time (the last batch may be smaller); never shuffled."""
    n = _check_shape(tokens, batch_size, seq_len)
    starts = np.arange(n, dtype=np.int64) * seq_len
    for i, lo in enumerate(range(0, n, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        yield _gather(tokens, starts[lo : lo + batch_size], seq_len)
