"""Measured peaks and model FLOPs, checked against real timings and hand counts."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM

from crosschip.errors import CrosschipError
from crosschip.perf import (
    clear_perf_cache,
    matmul_params_per_token,
    measure_matmul_peak,
    measure_memory_bandwidth,
    mfu,
    model_flops_per_token,
)

CPU = torch.device("cpu")


def llama(tie: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config)


def deepseek(n_routed_experts: int = 4, top_k: int = 2) -> DeepseekV3ForCausalLM:
    config = DeepseekV3Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=n_routed_experts,
        num_experts_per_tok=top_k,
        n_shared_experts=1,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        n_group=1,
        topk_group=1,
    )
    return DeepseekV3ForCausalLM(config)


def test_matmul_peak_is_positive_sane_fast_and_cached() -> None:
    clear_perf_cache()
    start = time.perf_counter()
    peak = measure_matmul_peak(CPU, torch.float32, n=128, seconds=0.3)
    took = time.perf_counter() - start
    assert isinstance(peak, float)
    # Any CPU does more than 10 MFLOP/s and less than 1 PFLOP/s on fp32.
    assert 1e7 < peak < 1e15
    assert took < 2.0
    start = time.perf_counter()
    assert measure_matmul_peak(CPU, torch.float32, n=128, seconds=0.3) == peak
    assert time.perf_counter() - start < 0.01


def test_matmul_peak_threads_are_restored_and_keyed() -> None:
    before = torch.get_num_threads()
    one = measure_matmul_peak(CPU, torch.float32, n=96, seconds=0.2, threads=1)
    assert torch.get_num_threads() == before
    assert one > 0
    assert measure_matmul_peak(CPU, torch.float32, n=96, seconds=0.2, threads=1) == one


def test_memory_bandwidth_is_sane() -> None:
    bw = measure_memory_bandwidth(CPU, nbytes=16 * 2**20)
    # Between 100 MB/s and 10 TB/s for a host-memory copy.
    assert 1e8 < bw < 1e13


@pytest.mark.parametrize(
    "call",
    [
        lambda: measure_matmul_peak(CPU, torch.float32, n=0),
        lambda: measure_matmul_peak(CPU, torch.float32, seconds=0),
        lambda: measure_matmul_peak(CPU, torch.float32, threads=0),
        lambda: measure_memory_bandwidth(CPU, nbytes=0),
        lambda: mfu(100.0, 1e6, 0.0),
        lambda: model_flops_per_token(llama(), 0),
    ],
)
def test_bad_inputs_raise(call: Callable[[], object]) -> None:
    with pytest.raises(CrosschipError):
        call()


def llama_hand_count(seq_len: int) -> int:
    d, inter, vocab, layers, heads, kv_heads = 64, 128, 300, 2, 4, 2
    head_dim = d // heads
    attn = d * d + 2 * d * kv_heads * head_dim + d * d  # q, k, v, o
    mlp = 3 * d * inter  # gate, up, down
    n = layers * (attn + mlp) + d * vocab  # lm_head; the embedding lookup is excluded
    return 6 * n + 12 * layers * (heads * head_dim) * seq_len


@pytest.mark.parametrize("tie", [False, True])
def test_llama_flops_match_hand_count(tie: bool) -> None:
    model = llama(tie)
    assert model_flops_per_token(model, 256) == llama_hand_count(256)
    assert model_flops_per_token(model, 16) == llama_hand_count(16)


def test_deepseek_counts_active_experts_only() -> None:
    d, heads, layers, vocab, seq = 64, 4, 2, 300, 128
    attn = d * heads * 24 + d * (32 + 8) + 32 * heads * 32 + heads * 16 * d  # q, kv_a, kv_b, o (MLA)
    dense_mlp = 3 * d * 128
    router = 4 * d
    all_experts = 4 * (2 * 32 * d + d * 32)  # fused gate_up [E, 2I, D] and down [E, D, I]
    shared = 3 * d * 32
    active_n = layers * attn + dense_mlp + router + all_experts * 2 // 4 + shared + d * vocab
    attn_flops = 6 * layers * seq * heads * (24 + 16)  # q/k width 4*24, v width 4*16
    model = deepseek()
    assert matmul_params_per_token(model) == active_n
    assert model_flops_per_token(model, seq) == 6 * active_n + attn_flops
    # Routing every token to all experts costs more: the active count really is smaller.
    dense = deepseek(n_routed_experts=4, top_k=4)
    assert model_flops_per_token(model, seq) < model_flops_per_token(dense, seq)
    assert matmul_params_per_token(dense) == active_n + all_experts // 2


def test_flops_work_on_meta_device() -> None:
    with torch.device("meta"):
        model = llama()
    assert model_flops_per_token(model, 256) == llama_hand_count(256)


def test_mfu() -> None:
    assert mfu(1000.0, 6e9, 1.2e13) == pytest.approx(0.5)
    assert mfu(0.0, 6e9, 1e12) == 0.0
