"""The paged KV cache's bookkeeping and the flat token batch one engine step runs.

Blocks: the KV cache of every layer is one pool of fixed-size blocks (`block_size` token positions
each). A sequence owns a block table, the list of its blocks in position order, grown on demand as
its tokens are computed and returned to the pool when it finishes, is aborted or is preempted. So
capacity follows the tokens actually held, not `max_context` per sequence (vLLM's PagedAttention
design; the runners keep the tensors, this module only the block ids).

A step (`StepBatch`) is vLLM V1's flat batch: the tokens of every scheduled sequence concatenated,
single-token chunks (decodes) first, then prefill chunks. A runner runs the projections and MLPs
over all N tokens at once, so the weights are read once per step whatever mixes of prompts and
decodes share it; only attention is per sequence. Everything a runner needs to index the cache is
built here once per step, on the host, and shared by all layers.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import torch

from crosschip.errors import CrosschipError

DEFAULT_BLOCK_SIZE = 16  # vLLM's default on GPUs and CPUs


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` positions."""
    return -(-tokens // block_size)


# A full block's identity for prefix caching: (the previous block's (id, generation) or None, its tokens). Keying
# on the physical parent block (not a hash of the tokens before it) makes a match exact, never a hash collision;
# the generation, bumped whenever a block is handed out anew, keeps a key from outliving its parent's content.
BlockKey = tuple[tuple[int, int] | None, tuple[int, ...]]


class BlockAllocator:
    """A pool of cache blocks with reference counts; block tables are plain lists owned by the sequences.

    With prefix caching, full blocks are registered under their `BlockKey` once computed: a later sequence
    whose prompt starts with the same tokens shares them (`match`) instead of recomputing them. A cached block
    nobody holds stays in an LRU list and is evicted only when a free block is needed (vLLM's design).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise CrosschipError(f"a KV cache needs >= 1 block of >= 1 token, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack of uncached blocks: the lowest ids go out first
        self._refs = [0] * num_blocks
        self._gen = [0] * num_blocks
        self._key_of: dict[int, BlockKey] = {}
        self._cached: dict[BlockKey, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; least recently used first

    @property
    def num_free(self) -> int:
        """Blocks a sequence can take now (free, or cached and evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def missing(self, table: list[int], tokens: int) -> int:
        """Blocks `table` still needs to hold `tokens` positions."""
        return max(0, blocks_for(tokens, self.block_size) - len(table))

    def grow(self, table: list[int], tokens: int) -> bool:
        """Extend `table` to hold `tokens` positions; False (and no change) when the pool is short."""
        need = self.missing(table, tokens)
        if need > self.num_free:
            return False
        table.extend(self._take() for _ in range(need))
        return True

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # evict the least recently used cached block
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._key_of.pop(block)]
        self._refs[block], self._gen[block] = 1, self._gen[block] + 1
        return block

    def release(self, table: list[int]) -> None:
        """Drop the table's reference to each of its blocks and empty it."""
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        table.clear()

    def key(self, table: list[int], index: int, tokens: list[int]) -> BlockKey:
        """The key of full block `index` of a sequence with this table and tokens."""
        parent = None if index == 0 else (table[index - 1], self._gen[table[index - 1]])
        size = self.block_size
        return parent, tuple(tokens[index * size : (index + 1) * size])

    def register(self, table: list[int], index: int, tokens: list[int]) -> None:
        """Offer full block `index` of this sequence to later sequences (a first registration wins)."""
        block, key = table[index], self.key(table, index, tokens)
        if key not in self._cached and block not in self._key_of:
            self._cached[key], self._key_of[block] = block, key

    def match(self, tokens: list[int], limit: int) -> list[int]:
        """The longest run of cached blocks holding tokens' first full blocks (at most `limit`), now referenced."""
        table: list[int] = []
        while len(table) < limit:
            block = self._cached.get(self.key(table, len(table), tokens))
            if block is None:
                break
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            table.append(block)
        return table


@dataclass
class Chunk:
    """One sequence's share of a step: `tokens` go at positions start..start+len-1 of its cache."""

    key: int  # the engine's id for the sequence (HF-cache runners keep per-sequence state under it)
    tokens: list[int]
    start: int
    block_table: list[int]
    logits: str  # "none" (a prefill chunk before the last), "last", or "all" (prompt logprobs)


@dataclass
class PrefillChunk:
    """A multi-token chunk of a step: what its attention reads, built on first use and shared by all layers."""

    lo: int  # its tokens are the flat batch's rows lo..hi-1
    hi: int
    start: int  # the position of its first token; 0: the chunk is the whole context so far
    table: list[int]
    block_size: int
    device: torch.device

    @property
    def context(self) -> int:
        """T: positions cached once this chunk is written."""
        return self.start + self.hi - self.lo

    @cached_property
    def rows(self) -> torch.Tensor:
        """Cache rows of positions 0..T-1, its whole context: [T] long."""
        blocks = torch.tensor(self.table[: blocks_for(self.context, self.block_size)], dtype=torch.long)
        return _block_rows(blocks, self.block_size)[: self.context].to(self.device)

    @cached_property
    def mask(self) -> torch.Tensor:
        """Causal mask of its tokens over that context, offset by `start`: [S, T] bool."""
        keys = torch.arange(self.context, device=self.device)
        return keys[None, :] <= (self.start + torch.arange(self.hi - self.lo, device=self.device))[:, None]


def _block_rows(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache rows of every position of the given blocks, in order: [..., nb] -> [..., nb * block_size]."""
    return (blocks[..., None] * block_size + torch.arange(block_size)).flatten(-2)


@dataclass
class StepBatch:
    """A flat batch of N tokens from B sequences; sequences 0..num_decodes-1 have one token each.

    Tensors live on the runner's device; lists are host-side copies, so no runner needs a device sync.
    """

    keys: list[int]  # [B]
    tokens: torch.Tensor  # [N] long
    positions: torch.Tensor  # [N] long
    slot_mapping: torch.Tensor  # [N] long: cache row (block * block_size + offset) each token's K/V goes to
    query_starts: list[int]  # [B + 1]: sequence b's tokens are tokens[query_starts[b]:query_starts[b + 1]]
    starts: list[int]  # [B]: the position of each sequence's first token in this step
    context_lens: list[int]  # [B]: cached positions of each sequence once this step has written its K/V
    block_tables: list[list[int]]  # [B][blocks]
    num_decodes: int
    # The block tables of sequences 0..D-1 on the host, padded with block 0 to the longest: [D, blocks] long.
    decode_tables: torch.Tensor | None
    logits_rows: torch.Tensor  # [R] long: the token rows whose logits the step returns, in chunk order
    logits_counts: list[int]  # [B]: how many of those rows belong to each sequence (0, 1 or its length)
    prefills: list[PrefillChunk]  # sequences num_decodes..B-1
    block_size: int
    device: torch.device

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    # Decode attention for sequences 0..D-1 through torch ops: the cache rows of their contexts, padded to T,
    # and a mask (None when one sequence needs no padding). T is the longest decode context, so padding is
    # masked. Built on first use: a runner that reads the block tables itself never pays for them.
    @cached_property
    def decode_rows(self) -> torch.Tensor | None:
        """[D, T] long, on the device."""
        if self.decode_tables is None:
            return None
        width = max(self.context_lens[: self.num_decodes])
        return _block_rows(self.decode_tables, self.block_size)[:, :width].contiguous().to(self.device)

    @cached_property
    def decode_mask(self) -> torch.Tensor | None:
        """[D, 1, 1, T] bool, on the device; None for a single decode."""
        if self.num_decodes < 2:
            return None
        lens = torch.tensor(self.context_lens[: self.num_decodes])
        return (torch.arange(int(lens.max()))[None, :] < lens[:, None])[:, None, None].to(self.device)


def build_step(chunks: list[Chunk], block_size: int, device: torch.device) -> StepBatch:
    """The StepBatch for `chunks`, which must list every single-token chunk before any longer one."""
    num_decodes = 0
    while num_decodes < len(chunks) and len(chunks[num_decodes].tokens) == 1:
        num_decodes += 1
    if any(len(c.tokens) == 1 for c in chunks[num_decodes:]) or any(not c.tokens for c in chunks):
        raise CrosschipError("a step batch lists its single-token chunks first and has no empty chunk")
    tokens, positions, slots, starts, logits_rows, counts = [], [], [], [0], [], []
    for c in chunks:
        n, first = len(c.tokens), len(tokens)
        if blocks_for(c.start + n, block_size) > len(c.block_table):
            raise CrosschipError(f"sequence {c.key}: its block table does not cover position {c.start + n - 1}")
        tokens.extend(c.tokens)
        pos = range(c.start, c.start + n)
        positions.extend(pos)
        slots.extend(c.block_table[p // block_size] * block_size + p % block_size for p in pos)
        starts.append(len(tokens))
        rows = {"none": [], "last": [first + n - 1], "all": list(range(first, first + n))}[c.logits]
        logits_rows.extend(rows)
        counts.append(len(rows))
    context_lens = [c.start + len(c.tokens) for c in chunks]
    decode_tables = None
    if num_decodes:
        nblocks = blocks_for(max(context_lens[:num_decodes]), block_size)
        padded = []
        for b, c in enumerate(chunks[:num_decodes]):
            used = c.block_table[: blocks_for(context_lens[b], block_size)]
            padded.append(used + [0] * (nblocks - len(used)))  # padding reads block 0, masked out
        decode_tables = torch.tensor(padded, dtype=torch.long)

    def long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(device)

    return StepBatch(
        keys=[c.key for c in chunks],
        tokens=long(tokens),
        positions=long(positions),
        slot_mapping=long(slots),
        query_starts=starts,
        starts=[c.start for c in chunks],
        context_lens=context_lens,
        block_tables=[c.block_table for c in chunks],
        num_decodes=num_decodes,
        decode_tables=decode_tables,
        logits_rows=long(logits_rows),
        logits_counts=counts,
        prefills=[PrefillChunk(starts[b], starts[b + 1], c.start, c.block_table, block_size, device)
                  for b, c in enumerate(chunks) if b >= num_decodes],
        block_size=block_size,
        device=device,
    )
