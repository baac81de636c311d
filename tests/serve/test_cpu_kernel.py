"""DenseRunner's CPU decode kernel (serve/csrc/dense_decode.cpp), built here as `crosschip serve` builds it.

It runs every step in which all sequences decode one token; it must give HF's logits, write the same K/V
the torch path reads back, and give a sequence bitwise the same logits whichever batch it shares.
"""

from __future__ import annotations

import pytest
import torch
from test_runner import FP32_ATOL, _tiny, check_against_hf, preset_model, prompts, scrambled_allocator
from transformers import LlamaConfig, MistralConfig, PreTrainedModel, Qwen2Config

from crosschip.errors import CrosschipError
from crosschip.serve import cpu_kernel
from crosschip.serve.paged import BlockAllocator, Chunk, build_step
from crosschip.serve.runner import DenseRunner, make_runner

CPU = torch.device("cpu")


def kernel_runner(model: PreTrainedModel, max_batch: int = 4, block_size: int = 4) -> DenseRunner:
    runner = make_runner(model, max_batch=max_batch, max_context=64, block_size=block_size, kernel="cpp")
    assert isinstance(runner, DenseRunner) and runner.decode_kernel is not None
    return runner


@pytest.mark.parametrize(
    "make",
    [
        lambda: preset_model("tiny"),
        lambda: preset_model("small"),
        lambda: _tiny(MistralConfig, sliding_window=None),
        lambda: _tiny(Qwen2Config),  # q/k/v biases
        # Widths that are no multiple of the 8 vector lanes or the 4-row tiles: head_dim 10, 6 query heads on
        # 2 KV heads, intermediate 50, vocab 401, untied lm_head.
        lambda: _tiny(LlamaConfig, hidden_size=60, num_attention_heads=6, num_key_value_heads=2,
                       intermediate_size=50, vocab_size=401, tie_word_embeddings=False),
    ],
    ids=["tiny", "small", "mistral", "qwen2-qkv-bias", "odd-widths"],
)
def test_kernel_matches_hf(make: object) -> None:
    """Mixed prefill/decode steps (torch ops) and then pure decode steps (the kernel) against HF's forward."""
    model = make()
    check_against_hf(model, kernel_runner(model), FP32_ATOL)


def _decode_alone_and_in_batches(runner: DenseRunner, batch_sizes: list[int]) -> dict[int, list[torch.Tensor]]:
    """Sequence 0's logits over 6 decode steps, decoded beside n - 1 other sequences for each n."""
    seqs = prompts(3, [9 + 3 * i for i in range(max(batch_sizes))])
    out = {}
    for n in batch_sizes:
        alloc, tables = scrambled_allocator(runner, seed=n), [[] for _ in range(n)]
        for k in range(n):
            assert alloc.grow(tables[k], len(seqs[k]) + 6)
            runner.forward(build_step([Chunk(k, seqs[k].tolist(), 0, tables[k], "last")], runner.block_size, CPU))
        logits = []
        for i in range(6):
            chunks = [Chunk(k, [int(seqs[k][i])], len(seqs[k]) + i, tables[k], "last") for k in range(n)]
            logits.append(runner.forward(build_step(chunks, runner.block_size, CPU))[0])
        out[n] = logits
    return out


def test_kernel_logits_do_not_depend_on_the_batch() -> None:
    """Bitwise: the same sequence alone, with 2 others (4 weight streams per thread) and 9 (4-row tiles)."""
    runner = kernel_runner(preset_model("tiny"), max_batch=10)
    out = _decode_alone_and_in_batches(runner, [1, 3, 10])
    for n in (3, 10):
        for alone, batched in zip(out[1], out[n], strict=True):
            assert torch.equal(alone, batched), n


def test_kernel_returns_only_the_rows_asked_for() -> None:
    """One-token chunks whose logits are not wanted (a prompt's chunk before its last) are dropped."""
    model = preset_model("tiny")
    runner = kernel_runner(model)
    seqs = prompts(4, [6, 6])
    alloc, tables = BlockAllocator(runner.num_blocks, runner.block_size), [[], []]
    for k in range(2):
        assert alloc.grow(tables[k], 7)
        runner.forward(build_step([Chunk(k, seqs[k][:5].tolist(), 0, tables[k], "last")], runner.block_size, CPU))
    step = build_step([Chunk(0, [int(seqs[0][5])], 5, tables[0], "none"),
                       Chunk(1, [int(seqs[1][5])], 5, tables[1], "last")], runner.block_size, CPU)
    got = runner.forward(step)
    with torch.no_grad():
        want = model(input_ids=seqs[1][None]).logits[0, -1]
    assert got.shape == (1, 400)
    torch.testing.assert_close(got[0], want, atol=FP32_ATOL, rtol=0)


def test_kernel_refuses_what_it_cannot_run() -> None:
    model = preset_model("tiny").to(torch.bfloat16)
    with pytest.raises(CrosschipError, match="float32"):
        make_runner(model, max_batch=1, max_context=64, kernel="cpp")
    assert make_runner(model, max_batch=1, max_context=64).decode_kernel is None  # auto: torch ops
    with pytest.raises(CrosschipError, match="decode kernel 'fast'"):
        make_runner(preset_model("tiny"), max_batch=1, max_context=64, kernel="fast")
    with pytest.raises(CrosschipError, match=r"\[out, in\]"):  # the nn layout stores weights transposed
        make_runner(preset_model("tiny"), max_batch=1, max_context=64, layout="nn", kernel="cpp")


def test_a_kernel_that_cannot_be_built_falls_back_to_torch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler() -> None:
        raise CrosschipError("cannot build the CPU decode kernel (no compiler)", "install one")

    monkeypatch.setattr(cpu_kernel, "load_extension", no_compiler)
    model = preset_model("tiny")
    runner = make_runner(model, max_batch=4, max_context=64, block_size=4)
    assert runner.decode_kernel is None
    check_against_hf(model, runner, FP32_ATOL)
    with pytest.raises(CrosschipError, match="no compiler"):
        make_runner(model, max_batch=1, max_context=64, kernel="cpp")
