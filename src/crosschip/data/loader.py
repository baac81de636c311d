"""Deterministic, resumable, rank-sharded batches over a packed token stream.

The stream is cut into non-overlapping windows of seq_len + 1 tokens (stride seq_len, so window i's last
token is window i+1's first): x = window[:-1], y = window[1:]. Each epoch visits a permutation of the
windows drawn from ``np.random.default_rng((seed, epoch))``; rank r takes ``perm[r::world_size]``, cut to
the same length on every rank so all ranks run the same number of steps (uneven counts hang DDP).

Resume state is (epoch, position) in windows. It is identical on every rank after the same number of
steps, so rank 0's state may be saved once and loaded by all ranks.
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
    """Infinite shuffled training batches; wraps into the next epoch automatically."""

    def __init__(
        self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.n_windows = _check_shape(tokens, batch_size, seq_len)
        if world_size < 1 or not 0 <= rank < world_size:
            raise CrosschipError(f"invalid rank {rank} for world size {world_size}", "check the launcher settings")
        if seed < 0:
            raise CrosschipError(f"seed must be >= 0, got {seed}", "pass a non-negative --seed")
        if self.n_windows < world_size:
            raise CrosschipError(
                f"only {self.n_windows} windows of {seq_len + 1} tokens for {world_size} ranks",
                "pass a smaller --seq-len, fewer ranks or more data",
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.windows_per_rank = self.n_windows // world_size
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        """Full batches per epoch on this rank (at least 1: smaller epochs are wrapped into one batch)."""
        return max(1, self.windows_per_rank // self.batch_size)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            perm = np.random.default_rng((self.seed, epoch)).permutation(self.n_windows)
            self._order = perm[self.rank :: self.world_size][: self.windows_per_rank]
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) int64 batch of shape [batch_size, seq_len]."""
        windows = np.empty(self.batch_size, dtype=np.int64)
        filled = 0
        while filled < self.batch_size:
            if self.position >= self.windows_per_rank:
                self.epoch += 1
                self.position = 0
            take = min(self.batch_size - filled, self.windows_per_rank - self.position)
            windows[filled : filled + take] = self._epoch_order(self.epoch)[self.position : self.position + take]
            self.position += take
            filled += take
        return _gather(self.tokens, windows * self.seq_len, self.seq_len)

    def state_dict(self) -> dict[str, int]:
        """Plain-int resume state; the layout fields let load_state_dict refuse a mismatched resume."""
        return {
            "epoch": int(self.epoch),
            "position": int(self.position),
            "seed": int(self.seed),
            "seq_len": int(self.seq_len),
            "n_windows": int(self.n_windows),
            "world_size": int(self.world_size),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly where state_dict() was taken (same data, seed, seq_len and world size)."""
        for key in ("seed", "seq_len", "n_windows", "world_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise CrosschipError(
                    f"cannot resume data order: {key} was {state[key]}, now {getattr(self, key)}",
                    "resume with the same data, --seed, --seq-len and number of devices",
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.windows_per_rank:
            raise CrosschipError(
                f"invalid data loader state epoch={epoch} position={position}", "use a valid checkpoint"
            )
        self.epoch, self.position = epoch, position


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
