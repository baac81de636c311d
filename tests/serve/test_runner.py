"""Model runners against Hugging Face's own forward: prefill and step-by-step decode logits."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, PreTrainedModel, Qwen2Config

from crosschip import models
from crosschip.errors import CrosschipError
from crosschip.serve.paged import BlockAllocator, Chunk, build_step
from crosschip.serve.proj import LAYOUTS, SPLIT_MAX_ROWS, Proj, _onednn_linear, pick_layouts
from crosschip.serve.runner import (
    DenseRunner,
    HFRunner,
    dense_kv_bytes_per_token,
    fast_path_problem,
    make_runner,
    measure_kv_bytes_per_token,
    plan_blocks,
)

VOCAB = 400
FP32_ATOL = 2e-5  # observed ~5e-7: a wrong mask, RoPE or GQA mapping is off by >1e-2


def preset_model(preset: str, seed: int = 0) -> PreTrainedModel:
    return models.build_model(models.get_preset(preset).build_config(VOCAB, 0, 1, 2), seed=seed).eval()


@torch.no_grad()
def hf_logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """HF's full-sequence forward: logits [S, V] for ids [S]."""
    return model(input_ids=ids[None]).logits[0].float()


def prompts(n: int, lengths: list[int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    return [torch.randint(3, VOCAB, (length,), generator=gen) for length in lengths]


def scrambled_allocator(runner: object, seed: int = 0) -> BlockAllocator:
    """The runner's block pool handed out in a shuffled order, so block tables are far from contiguous."""
    alloc = BlockAllocator(runner.num_blocks, runner.block_size)
    random.Random(seed).shuffle(alloc._free)  # noqa: SLF001 - the test scrambles the pool on purpose
    return alloc


def check_against_hf(model: PreTrainedModel, runner: object, atol: float) -> None:
    """Three sequences through mixed steps: whole and chunked prefills beside decodes, then decodes alone.

    Step 1 prefills seq 0 whole and the first 8 tokens of seq 2; step 2 decodes seq 0 beside seq 2's second
    chunk and seq 1's whole prompt; then all three decode together. Every returned logit row must equal HF's
    forward over the whole sequence at that position.
    """
    seqs = prompts(1, [20, 16, 26])
    refs = [hf_logits(model, s) for s in seqs]
    alloc, tables = scrambled_allocator(runner), [[], [], []]
    done = [0, 0, 0]  # positions computed per sequence

    def step(plan: list[tuple[int, int, str]]) -> None:
        chunks = []
        for k, n, mode in plan:
            assert alloc.grow(tables[k], done[k] + n)
            chunks.append(Chunk(k, seqs[k][done[k] : done[k] + n].tolist(), done[k], tables[k], mode))
        got = runner.forward(build_step(chunks, runner.block_size, torch.device("cpu")))
        want = []
        for k, n, mode in plan:
            rows = {"none": [], "last": [done[k] + n - 1], "all": list(range(done[k], done[k] + n))}[mode]
            want += [refs[k][r] for r in rows]
            done[k] += n
        torch.testing.assert_close(got, torch.stack(want), atol=atol, rtol=0)

    step([(0, 9, "all"), (2, 8, "none")])
    step([(0, 1, "last"), (2, 7, "all"), (1, 4, "all")])
    for _ in range(10):
        step([(k, 1, "last") for k in range(3)])


ONEDNN = pytest.mark.skipif(_onednn_linear() is None, reason="this torch build has no oneDNN linear")


@pytest.mark.parametrize(
    ("preset", "layout"),
    [
        ("tiny", "nt"),
        ("tiny", "nn"),
        pytest.param("tiny", "dnn", marks=ONEDNN),
        ("tiny", "split"),
        ("small", "nt"),
        ("small", "nn"),
        pytest.param("small", "dnn", marks=ONEDNN),
        ("small", "split"),
    ],
)
def test_dense_runner_matches_hf_fp32(preset: str, layout: str) -> None:
    model = preset_model(preset)  # torch ops throughout; tests/serve/test_cpu_kernel.py covers the decode kernel
    runner = make_runner(model, max_batch=4, max_context=64, layout=layout, block_size=4, kernel="torch")
    assert isinstance(runner, DenseRunner)
    check_against_hf(model, runner, FP32_ATOL)


def test_generic_runner_matches_hf_fp32_on_deepseek() -> None:
    model = preset_model("deepseek-tiny")
    assert fast_path_problem(model, 64) is not None  # MLA + MoE: no dense fast path
    runner = make_runner(model, max_batch=4, max_context=64, generic=True, block_size=4)
    assert isinstance(runner, HFRunner)
    check_against_hf(model, runner, FP32_ATOL)


def test_generic_runner_also_runs_llama() -> None:
    model = preset_model("tiny")
    runner = make_runner(model, max_batch=4, max_context=64, generic=True, block_size=4)
    assert isinstance(runner, HFRunner)
    check_against_hf(model, runner, FP32_ATOL)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_dense_runner_bf16_within_bf16_tolerance(preset: str) -> None:
    model = preset_model(preset)
    ids = prompts(2, [30])[0]
    ref32 = hf_logits(model, ids)
    model = model.to(torch.bfloat16)
    ref16 = hf_logits(model, ids)
    runner = make_runner(model, max_batch=2, max_context=64, layout="nt")
    table: list[int] = []
    assert scrambled_allocator(runner).grow(table, 30)
    got = [runner.forward(build_step([Chunk(0, ids[:20].tolist(), 0, table, "all")], runner.block_size, ids.device))]
    for p in range(20, 30):
        chunk = Chunk(0, [int(ids[p])], p, table, "last")
        got.append(runner.forward(build_step([chunk], runner.block_size, ids.device)))
    got_all = torch.cat(got)
    # Same bf16 arithmetic as HF up to summation order: well within one bf16 ulp of the logit scale,
    # and no further from the fp32 truth than HF's own bf16 forward (plus a little).
    assert (got_all - ref16).abs().max() < 0.03
    assert (got_all - ref32).abs().max() < 2 * (ref16 - ref32).abs().max() + 5e-3


def test_hf_module_still_matches_after_weight_fusion() -> None:
    """The runner rebinds HF's q/k/v and gate/up weights to views of fused tensors: same values."""
    model = preset_model("tiny")
    ids = prompts(5, [16])[0]
    before = hf_logits(model, ids)
    make_runner(model, max_batch=1, max_context=32, layout="nn")
    torch.testing.assert_close(hf_logits(model, ids), before, atol=FP32_ATOL, rtol=0)


def _tiny(config_cls: type, **overrides: object) -> PreTrainedModel:
    """A 2-layer GQA model of `config_cls` (64 wide, vocab VOCAB) with any field overridden."""
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    config = config_cls(**{**fields, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.mark.parametrize(
    "make",
    [lambda: _tiny(MistralConfig, sliding_window=None), lambda: _tiny(Qwen2Config)],
    ids=["mistral", "qwen2-qkv-bias"],
)
def test_dense_runner_covers_llama_like_archs(make: object) -> None:
    model = make()
    runner = make_runner(model, max_batch=4, max_context=64, layout="nt", block_size=4, kernel="torch")
    assert isinstance(runner, DenseRunner)
    check_against_hf(model, runner, FP32_ATOL)


def test_sliding_window_shorter_than_context_uses_generic_runner() -> None:
    model = _tiny(MistralConfig, sliding_window=16)
    assert "sliding_window" in fast_path_problem(model, 64)
    assert isinstance(make_runner(model, max_batch=1, max_context=64), HFRunner)


def test_kv_accounting() -> None:
    llama = preset_model("tiny")  # 2 layers, 2 KV heads of 16 dims, fp32
    assert dense_kv_bytes_per_token(llama) == 2 * 2 * 2 * 16 * 4
    assert measure_kv_bytes_per_token(llama) == dense_kv_bytes_per_token(llama)
    runner = make_runner(llama, max_batch=8, max_context=64, kv_budget_bytes=3 * 64 * 512 + 100, layout="nt")
    assert runner.num_blocks * runner.block_size == 3 * 64 and runner.kv_bytes_per_token == 512
    # the pool holds what the budget buys, never more than max_batch full-context sequences
    assert plan_blocks(4, 64, 512, 10**9, 16) == 4 * 4
    assert plan_blocks(4, 64, 512, 64 * 512 + 16 * 512, 16) == 5  # one full sequence and a block more
    # MLA caches the compressed latent + RoPE key: (kv_lora_rank 32 + rope 8) * 2 layers * 4 bytes
    assert measure_kv_bytes_per_token(preset_model("deepseek-tiny")) == (32 + 8) * 2 * 4
    assert plan_blocks(16, 2048, 1000, None, 16) == 16 * 128
    with pytest.raises(CrosschipError, match="KV budget"):
        plan_blocks(4, 2048, 1000, 2048 * 1000 - 1, 16)


@pytest.mark.parametrize("rows", [1, 2, SPLIT_MAX_ROWS, SPLIT_MAX_ROWS + 1, 33])
def test_split_layout_equals_linear_at_every_batch_size(rows: int) -> None:
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 40, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(rows, 40, generator=gen)
    for b in (None, bias):
        got = Proj(weight, b, "split")(x)
        assert got.shape == (rows, 96) and got.is_contiguous()
        torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, b), atol=1e-5, rtol=0)


def test_split_layout_refuses_rows_that_do_not_split() -> None:
    with pytest.raises(CrosschipError, match="do not split"):
        Proj(torch.randn(7, 8), None, "split")


def test_pick_layouts_measures_every_shape() -> None:
    layouts = pick_layouts({(48, 32), (32, 96)}, torch.float32, torch.device("cpu"), probe_bytes=2**16)
    assert set(layouts) == {(48, 32), (32, 96)}
    assert set(layouts.values()) <= set(LAYOUTS)
    with pytest.raises(CrosschipError, match="layout"):
        make_runner(preset_model("tiny"), max_batch=1, max_context=32, layout="tn")


def test_compiled_runner_matches_hf_fp32() -> None:
    """--compile: the token-parallel parts run as inductor graphs (dynamic token count) on the nt layout."""
    model = preset_model("tiny")
    runner = make_runner(model, max_batch=4, max_context=64, compile=True, block_size=4)
    check_against_hf(model, runner, FP32_ATOL)
    with pytest.raises(CrosschipError, match="compile"):
        make_runner(preset_model("tiny"), max_batch=1, max_context=32, compile=True, layout="split")
