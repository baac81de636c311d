"""Batched next-token sampling with per-row options and batch-independent seeded randomness.

Every row of a decode batch may have its own temperature, top-k, top-p and seed. Randomness is
counter-based: the uniform number a row draws at generation step t is a hash of (seed, t), so a
seeded request picks the same tokens whatever else is in the batch, in whatever order, on any
device, without one `torch.Generator` call per row. Sampling is by inverse CDF over the
filtered distribution (one uniform per row and step). Filters mean what `crosschip.generate`'s
mean: top-k keeps ties with the k-th logit, top-p keeps the smallest top set reaching p.
"""

from __future__ import annotations

import numpy as np
import torch

from crosschip.generate import _filter_top_p  # same nucleus rule as offline generation; accepts [B, 1] p
from crosschip.serve.engine_api import SamplingOptions, TokenLogprob

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer on uint64 arrays (numpy wraps uint64 arithmetic modulo 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def normalize_seed(seed: int) -> int:
    """Any Python int (OpenAI seeds may be negative) as a uint64 value."""
    return int(seed) & _MASK64


def uniforms(seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """One float32 in [0, 1) per row from (seed, step) uint64 arrays; the same inputs give the same output."""
    with np.errstate(over="ignore"):
        key = _splitmix(seeds.astype(np.uint64)) + (steps.astype(np.uint64) + np.uint64(1)) * _GOLDEN
        bits = _splitmix(key) >> np.uint64(40)  # 24 bits: exactly representable in float32
    return bits.astype(np.float32) / np.float32(1 << 24)


def filter_top_k_rows(logits: torch.Tensor, top_k: torch.Tensor, max_k: int) -> torch.Tensor:
    """Per-row top-k: logits [B, V], top_k [B] (0 = off, values <= V), max_k = max(top_k) >= 1."""
    kth_values = torch.topk(logits, max_k, dim=-1).values  # [B, max_k], descending
    kth = kth_values.gather(1, (top_k.clamp(1, max_k) - 1)[:, None])  # [B, 1]
    kth = torch.where(top_k[:, None] > 0, kth, torch.full_like(kth, float("-inf")))
    return logits.masked_fill(logits < kth, float("-inf"))


def sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
    max_k: int = 0,
    any_top_p: bool = True,
) -> torch.Tensor:
    """Next-token ids [B] from float32 logits [B, V]; rows with temperature 0 are greedy (argmax).

    temperature/top_p: float [B]; top_k: long [B]; uniform: float32 [B] in [0, 1). `max_k` (the
    largest top_k) and `any_top_p` come from the caller's host-side copy of the options, so no
    device sync is spent deciding which filters to run.
    """
    greedy = torch.argmax(logits, dim=-1)
    sampling = temperature > 0
    scaled = logits / torch.where(sampling, temperature, torch.ones_like(temperature))[:, None]
    if max_k > 0:
        scaled = filter_top_k_rows(scaled, top_k, max_k)
    if any_top_p:
        # p = inf never drops anything: rows with top_p 1.0 stay unfiltered, as in generate.
        p = torch.where(top_p < 1.0, top_p, torch.full_like(top_p, float("inf")))
        scaled = _filter_top_p(scaled, p[:, None])
    cdf = torch.softmax(scaled, dim=-1).cumsum(dim=-1)  # [B, V]
    target = (uniform.to(cdf.device) * cdf[:, -1])[:, None]  # [B, 1], below the total mass
    # right=True: the first index whose cdf exceeds the target, so zero-probability tokens never win.
    picked = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(logits.shape[-1] - 1)
    return torch.where(sampling, picked, greedy)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, ks: list[int]) -> list[TokenLogprob]:
    """Logprob of ids[b] under log_softmax(logits[b]) (raw float32, pre-temperature) + row b's top-ks[b]."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    chosen = logp.gather(1, ids.view(-1, 1).to(logp.device)).squeeze(1).tolist()
    k_max = min(max(ks, default=0), logp.shape[-1])
    if k_max == 0:
        return [TokenLogprob(int(t), lp) for t, lp in zip(ids.tolist(), chosen, strict=True)]
    top = torch.topk(logp, k_max, dim=-1)
    values, indices = top.values.tolist(), top.indices.tolist()
    return [
        TokenLogprob(int(t), lp, tuple(zip(indices[b][:k], values[b][:k], strict=True)))
        for b, (t, lp, k) in enumerate(zip(ids.tolist(), chosen, ks, strict=True))
    ]


def prompt_logprobs(logits: torch.Tensor, prompt: torch.Tensor, k: int) -> list[TokenLogprob | None]:
    """Echo logprobs: entry 0 is None, entry i is prompt[i] given prompt[:i] (from prefill logits [S, V])."""
    if prompt.shape[0] == 1:
        return [None]
    rest = token_logprobs(logits[:-1], prompt[1:], [k] * (prompt.shape[0] - 1))
    return [None, *rest]


class SamplingTable:
    """Per-sequence sampling options and state (host), one row per running sequence.

    The engine gives each running sequence a row and samples any subset of rows in one call.
    """

    def __init__(self, num_rows: int, device: torch.device) -> None:
        self.device = device
        self.temperature = np.zeros(num_rows, dtype=np.float32)
        self.top_k = np.zeros(num_rows, dtype=np.int64)
        self.top_p = np.ones(num_rows, dtype=np.float32)
        self.seed = np.zeros(num_rows, dtype=np.uint64)
        self.step = np.zeros(num_rows, dtype=np.uint64)  # tokens sampled so far
        self.frequency = np.zeros(num_rows, dtype=np.float32)
        self.presence = np.zeros(num_rows, dtype=np.float32)
        # [rows, V] counts of each row's generated tokens, and logit biases; allocated when first used.
        self.counts: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.biased = np.zeros(num_rows, dtype=bool)

    def set(self, row: int, opts: SamplingOptions, seed: int, vocab_size: int, generated: list[int]) -> None:
        """Give `row` to a sequence that has already generated `generated` (non-empty after a preemption)."""
        self.temperature[row] = opts.temperature
        self.top_k[row] = min(opts.top_k, vocab_size)
        self.top_p[row] = opts.top_p
        self.seed[row] = normalize_seed(seed)
        self.step[row] = len(generated)
        self.frequency[row], self.presence[row] = opts.frequency_penalty, opts.presence_penalty
        if self.counts is None and (opts.frequency_penalty or opts.presence_penalty):
            self.counts = torch.zeros(len(self.seed), vocab_size, dtype=torch.float32, device=self.device)
        if self.counts is not None:
            self.counts[row] = torch.bincount(
                torch.tensor(generated, dtype=torch.long), minlength=vocab_size
            ).to(self.counts)
        self.biased[row] = bool(opts.logit_bias)
        if self.bias is None and opts.logit_bias:
            self.bias = torch.zeros(len(self.seed), vocab_size, dtype=torch.float32, device=self.device)
        if self.bias is not None:
            self.bias[row] = 0
            for token, bias in opts.logit_bias:
                self.bias[row, token] = bias

    def record(self, rows: np.ndarray, ids: torch.Tensor) -> None:
        """After sampling ids [n] for `rows` [n]: count the tokens (penalties) and advance the seeds' steps."""
        self.step[rows] += np.uint64(1)
        if self.counts is not None:
            index = torch.from_numpy(rows).to(self.device)
            self.counts.index_put_((index, ids.to(self.device)), torch.ones(len(rows), device=self.device),
                                   accumulate=True)

    def penalize(self, logits: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Logits plus each row's logit_bias, less its frequency x count and presence x (count > 0) of its
        generated tokens.

        OpenAI's definitions, applied as vLLM does (`apply_penalties`, model_executor/layers/utils.py; logit bias
        in the v1 sampler): to the logits every sampler and greedy pick then sees; returned logprobs stay those
        of the raw logits."""
        frequency, presence = self.frequency[rows], self.presence[rows]
        index = None
        if self.bias is not None and self.biased[rows].any():
            index = torch.from_numpy(rows).to(self.device)
            logits = logits.float() + self.bias[index]
        if self.counts is None or not (frequency.any() or presence.any()):
            return logits
        counts = self.counts[torch.from_numpy(rows).to(self.device) if index is None else index]
        f = torch.from_numpy(frequency).to(logits.device)[:, None]
        p = torch.from_numpy(presence).to(logits.device)[:, None]
        return logits.float() - f * counts - p * (counts > 0).float()

    def sample(self, logits: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """Next ids [n] for the sequences in `rows` [n] (int64) from their logits [n, V]."""
        logits = self.penalize(logits, rows)
        temperature = self.temperature[rows]
        if not temperature.any():
            return torch.argmax(logits, dim=-1)  # all greedy: no filters, no randomness
        device = logits.device
        top_k, top_p = self.top_k[rows], self.top_p[rows]
        u = uniforms(self.seed[rows], self.step[rows])
        return sample_rows(
            logits,
            torch.from_numpy(temperature).to(device),
            torch.from_numpy(top_k).to(device),
            torch.from_numpy(top_p).to(device),
            torch.from_numpy(u).to(device),
            max_k=int(top_k.max()),
            any_top_p=bool((top_p < 1.0).any()),
        )
