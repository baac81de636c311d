"""MLARunner against Hugging Face's full-sequence DeepSeek-V3 forward, over a shuffled paged latent cache.

Every logit row a step returns must equal HF's forward over the whole sequence at that position.
Blocks are handed out in a shuffled order and sequences grow their tables as they go, so each
sequence's context lies in non-contiguous blocks interleaved with other sequences' blocks.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from transformers import PreTrainedModel

from crosschip import models
from crosschip.errors import CrosschipError
from crosschip.serve.mla import MLARunner, mla_kv_bytes_per_token, mla_problem
from crosschip.serve.paged import BlockAllocator, Chunk, build_step

VOCAB = 400
ATOL = 1e-4  # fp32; observed max abs logit differences are printed per test (pytest -s)
BLOCK = 4  # small, so every sequence spans several blocks
NUM_BLOCKS = 48
CPU = torch.device("cpu")
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "mscale": 0.5,  # unequal, so the rotary attention factor is not 1
    "mscale_all_dim": 1.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}


def deepseek(preset: str, **overrides: object) -> PreTrainedModel:
    """A preset model with random router correction biases (and linear biases, where enabled).

    Non-zero e_score_correction_bias checks it steers expert choice without weighting the experts.
    """
    config = models.get_preset(preset).build_config(VOCAB, 0, 1, 2)
    for name, value in overrides.items():
        setattr(config, name, value)
    model = models.build_model(config, seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                bias = module.e_score_correction_bias
                bias.copy_(torch.randn(bias.shape, generator=gen) * 0.05)
            elif isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.05)
    return model


MODELS: dict[str, Callable[[], PreTrainedModel]] = {
    "deepseek-tiny": lambda: deepseek("deepseek-tiny"),  # q_lora_rank None, one expert group
    "deepseek-small": lambda: deepseek("deepseek-small"),  # q_lora_rank set, group-limited routing
    # half-split RoPE, YaRN (rotary attention factor and mscale_all_dim softmax scale), unnormalised
    # top-k weights, group-limited routing, attention biases; larger weights make attention peaked
    # enough that a wrong softmax scale moves the logits by >1e-2
    "deepseek-tiny-variant": lambda: deepseek(
        "deepseek-tiny",
        rope_interleave=False,
        rope_parameters=dict(YARN),
        norm_topk_prob=False,
        n_group=2,
        topk_group=1,
        attention_bias=True,
        initializer_range=0.05,
    ),
}
_BUILT: dict[str, PreTrainedModel] = {}


def get_model(name: str) -> PreTrainedModel:
    if name not in _BUILT:
        _BUILT[name] = MODELS[name]()
    return _BUILT[name]


def shuffled_allocator(seed: int) -> BlockAllocator:
    """An allocator whose free list hands blocks out in a random order."""
    alloc = BlockAllocator(NUM_BLOCKS, BLOCK)
    table: list[int] = []
    assert alloc.grow(table, NUM_BLOCKS * BLOCK)
    random.Random(seed).shuffle(table)
    alloc.release(table)  # release pushes in reverse, so blocks come back out in `table` order
    return alloc


@dataclass
class Seq:
    """A test sequence: its whole token ids, HF's logits for them, and how much of it is cached."""

    key: int
    ids: torch.Tensor  # [S]
    ref: torch.Tensor  # [S, V]
    table: list[int] = field(default_factory=list)
    done: int = 0


def make_seqs(model: PreTrainedModel, lengths: list[int], seed: int) -> list[Seq]:
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for key, length in enumerate(lengths):
        ids = torch.randint(3, VOCAB, (length,), generator=gen)
        with torch.no_grad():
            ref = model(input_ids=ids[None]).logits[0].float()
        seqs.append(Seq(key, ids, ref))
    return seqs


def run_step(runner: MLARunner, alloc: BlockAllocator, plan: list[tuple[Seq, int, str]]) -> float:
    """One engine step in which each (seq, n, logits) computes n more tokens; checks every row against HF.

    Returns the largest absolute logit difference of the step.
    """
    chunks = []
    for seq, n, mode in plan:
        assert alloc.grow(seq.table, seq.done + n)
        chunks.append(Chunk(seq.key, seq.ids[seq.done : seq.done + n].tolist(), seq.done, seq.table, mode))
    batch = build_step(chunks, BLOCK, CPU)
    got = runner.forward(batch)
    assert got.dtype == torch.float32 and got.shape == (sum(batch.logits_counts), VOCAB)
    worst, row = 0.0, 0
    for (seq, n, _), count in zip(plan, batch.logits_counts, strict=True):
        end = seq.done + n
        if count:
            want = seq.ref[end - count : end]
            torch.testing.assert_close(got[row : row + count], want, atol=ATOL, rtol=0)
            worst = max(worst, (got[row : row + count] - want).abs().max().item())
        row, seq.done = row + count, end
    return worst


def finish(runner: MLARunner, alloc: BlockAllocator, seq: Seq) -> None:
    runner.free(seq.key)
    alloc.release(seq.table)


def new_runner(name: str) -> tuple[MLARunner, BlockAllocator]:
    return MLARunner(get_model(name), NUM_BLOCKS, BLOCK, max_context=64), shuffled_allocator(seed=7)


@pytest.mark.parametrize("name", list(MODELS))
def test_mixed_prefills_in_one_step(name: str) -> None:
    """Four prompts of different lengths prefilled in one step, then one decode step for all of them."""
    runner, alloc = new_runner(name)
    seqs = make_seqs(get_model(name), [8, 14, 5, 3], seed=1)
    worst = run_step(runner, alloc, [(s, len(s.ids) - 1, "all") for s in seqs])
    worst = max(worst, run_step(runner, alloc, [(s, 1, "all") for s in seqs]))
    print(f"{name} mixed prefills: max |logit diff| {worst:.2e}")


@pytest.mark.parametrize("name", list(MODELS))
def test_chunked_prefill_with_decodes(name: str) -> None:
    """A long prompt prefilled in chunks across steps while two other sequences decode in the same steps."""
    runner, alloc = new_runner(name)
    a, b, long = make_seqs(get_model(name), [16, 12, 34], seed=2)
    worst = run_step(runner, alloc, [(a, 9, "last"), (b, 6, "last")])
    for n, mode in [(8, "none"), (7, "all"), (10, "none"), (5, "last")]:  # 30 of the 34 tokens
        worst = max(worst, run_step(runner, alloc, [(a, 1, "all"), (b, 1, "all"), (long, n, mode)]))
    worst = max(worst, run_step(runner, alloc, [(long, 2, "none")]))  # a step that returns no logits
    for _ in range(2):
        worst = max(worst, run_step(runner, alloc, [(a, 1, "all"), (b, 1, "all"), (long, 1, "all")]))
    assert long.done == len(long.ids) and b.done == len(b.ids)
    print(f"{name} chunked prefill + decodes: max |logit diff| {worst:.2e}")


@pytest.mark.parametrize("name", list(MODELS))
def test_decode_batch_token_by_token(name: str) -> None:
    """Three sequences decoded together one token per step; finished ones leave and their blocks are reused.

    The last steps decode one sequence alone (no decode mask), over blocks other sequences held before.
    """
    runner, alloc = new_runner(name)
    seqs = make_seqs(get_model(name), [13, 24, 9], seed=3)
    prompts = [5, 11, 3]
    worst = run_step(runner, alloc, [(s, n, "all") for s, n in zip(seqs, prompts, strict=True)])
    live = list(seqs)
    while live:
        worst = max(worst, run_step(runner, alloc, [(s, 1, "all") for s in live]))
        for s in [s for s in live if s.done == len(s.ids)]:
            finish(runner, alloc, s)
            live.remove(s)
    print(f"{name} decode batch: max |logit diff| {worst:.2e}")


def test_latent_cache_holds_hf_latents() -> None:
    """The cache is [layers, rows, kv_lora_rank + rope_dim]: HF's normalised c_kv and RoPE'd k_pe, nothing more."""
    model = get_model("deepseek-small")
    config = model.config
    runner, alloc = new_runner("deepseek-small")
    width = config.kv_lora_rank + config.qk_rope_head_dim
    assert runner.kv_cache.shape == (config.num_hidden_layers, NUM_BLOCKS * BLOCK, width)
    assert runner.kv_cache.dtype == torch.float32
    assert runner.kv_bytes_per_token == mla_kv_bytes_per_token(model) == width * config.num_hidden_layers * 4
    full_kv = config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    assert width < full_kv
    (seq,) = make_seqs(model, [10], seed=4)
    run_step(runner, alloc, [(seq, 10, "last")])
    with torch.no_grad():
        cache = model(input_ids=seq.ids[None], use_cache=True).past_key_values
    rows = torch.tensor([seq.table[p // BLOCK] * BLOCK + p % BLOCK for p in range(10)])
    for i, layer in enumerate(cache.layers):
        hf = torch.cat((layer.keys[0, 0], layer.values[0, 0]), dim=-1)  # [S, C + R]: c_kv, k_pe
        torch.testing.assert_close(runner.kv_cache[i, rows], hf, atol=1e-5, rtol=0)


def test_mla_problem() -> None:
    llama = models.build_model(models.get_preset("tiny").build_config(VOCAB, 0, 1, 2), seed=0).eval()
    assert "not a DeepSeek-V3" in mla_problem(llama, 64)
    with pytest.raises(CrosschipError, match="cannot run"):
        MLARunner(llama, NUM_BLOCKS, BLOCK, 64)
    for name in MODELS:
        assert mla_problem(get_model(name), 64) is None
    config = models.get_preset("deepseek-tiny").build_config(VOCAB, 0, 1, 2)
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    assert "rescales" in mla_problem(models.build_model(config, seed=0), 64)


def test_context_beyond_max_context_is_refused() -> None:
    runner = MLARunner(get_model("deepseek-tiny"), NUM_BLOCKS, BLOCK, max_context=8)
    alloc = shuffled_allocator(seed=0)
    (seq,) = make_seqs(get_model("deepseek-tiny"), [9], seed=5)
    with pytest.raises(CrosschipError, match="max_context"):
        run_step(runner, alloc, [(seq, 9, "last")])
