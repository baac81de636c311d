"""Generation with a KV cache, sampling and streaming text, on tiny real models and tokenizers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM

from crosschip.errors import CrosschipError
from crosschip.generate import SamplingParams, TextStreamer, generate, sample_next, stream_text

VOCAB = 300


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).float().eval()


def tiny_deepseek() -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    config = DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        kv_lora_rank=32,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        n_group=1,
        topk_group=1,
        max_position_embeddings=128,
    )
    return DeepseekV3ForCausalLM(config).float().eval()


@pytest.fixture(scope="module", params=["llama", "deepseek_v3"])
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return tiny_llama() if request.param == "llama" else tiny_deepseek()


PROMPT = torch.tensor([[5, 17, 42, 99, 250, 3, 7]])


@torch.inference_mode()
def greedy_without_cache(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> list[int]:
    """Reference: recompute the full forward over the whole sequence every step."""
    ids = prompt.clone()
    out = []
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1, :]
        nxt = int(logits.argmax(-1))
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_greedy_with_cache_matches_full_recompute(model: torch.nn.Module) -> None:
    steps = 12
    got = generate(model, PROMPT, SamplingParams(max_new_tokens=steps))
    assert got == greedy_without_cache(model, PROMPT, steps)
    assert len(got) == steps


def test_prefill_then_one_token_per_step(model: torch.nn.Module) -> None:
    seen: list[int] = []

    def record(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(kwargs["input_ids"].shape[1])

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        generate(model, PROMPT[0].tolist(), SamplingParams(max_new_tokens=5))
    finally:
        handle.remove()
    assert seen == [PROMPT.shape[1], 1, 1, 1, 1]


def test_eos_stops_and_on_token_streams(model: torch.nn.Module) -> None:
    full = generate(model, PROMPT, SamplingParams(max_new_tokens=10))
    eos = full[3]
    first = full.index(eos)
    streamed: list[int] = []
    got = generate(
        model, PROMPT, SamplingParams(max_new_tokens=10), eos_token_id=eos, on_token=streamed.append
    )
    assert got == full[:first]
    assert streamed == got
    # Several eos ids (Llama-3 style generation configs) work too.
    assert generate(model, PROMPT, SamplingParams(max_new_tokens=10), eos_token_id=[999, eos]) == got


def test_generate_restores_training_mode() -> None:
    model = tiny_llama().train()
    generate(model, PROMPT, SamplingParams(max_new_tokens=2))
    assert model.training


def test_generate_rejects_bad_prompts() -> None:
    model = tiny_llama()
    with pytest.raises(CrosschipError, match="empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), SamplingParams())
    with pytest.raises(CrosschipError, match="one prompt"):
        generate(model, torch.zeros(2, 3, dtype=torch.long), SamplingParams())
    with pytest.raises(CrosschipError, match="token ids"):
        generate(model, torch.tensor([1, VOCAB]), SamplingParams())


def test_seeded_sampling_is_reproducible(model: torch.nn.Module) -> None:
    params = SamplingParams(max_new_tokens=15, temperature=1.5, seed=123)
    a = generate(model, PROMPT, params)
    b = generate(model, PROMPT, params)
    c = generate(model, PROMPT, SamplingParams(max_new_tokens=15, temperature=1.5, seed=7))
    assert a == b
    assert a != c  # 15 tokens from a near-flat distribution over 300: a collision would be absurd


def test_top_k_one_and_tiny_top_p_equal_greedy(model: torch.nn.Module) -> None:
    greedy = generate(model, PROMPT, SamplingParams(max_new_tokens=8))
    top_k = generate(model, PROMPT, SamplingParams(max_new_tokens=8, temperature=2.0, top_k=1, seed=1))
    top_p = generate(model, PROMPT, SamplingParams(max_new_tokens=8, temperature=2.0, top_p=1e-6, seed=1))
    assert top_k == greedy
    assert top_p == greedy


def test_sample_next_is_batched_pure_and_filters() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    before = logits.clone()
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, SamplingParams(), None), logits.argmax(-1))
    top3 = set(logits.topk(3, dim=-1).indices.flatten().tolist())
    for _ in range(20):
        ids = sample_next(logits, SamplingParams(temperature=1.0, top_k=3), gen)
        assert ids.shape == (4,)
        for row, idx in enumerate(ids.tolist()):
            assert idx in logits[row].topk(3).indices.tolist()
            assert idx in top3
    assert torch.equal(logits, before)


def test_top_p_keeps_the_nucleus() -> None:
    # probs 0.5, 0.3, 0.2: top_p=0.7 needs the first two tokens, never the third.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    gen = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, SamplingParams(temperature=1.0, top_p=0.7), gen)) for _ in range(200)}
    assert picks == {0, 1}


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("max_new_tokens", {"max_new_tokens": 0}),
        ("temperature", {"temperature": -0.1}),
        ("temperature", {"temperature": float("nan")}),
        ("top_p", {"top_p": 0.0}),
        ("top_p", {"top_p": 1.5}),
        ("top_k", {"top_k": -1}),
    ],
)
def test_invalid_sampling_params_raise(field: str, kwargs: dict) -> None:
    with pytest.raises(CrosschipError, match=field):
        SamplingParams(**kwargs)


# --- streaming text -------------------------------------------------------------------------

CORPUS = [
    "hello world, this is a tiny corpus",
    "the quick brown fox jumps over the lazy dog",
    "café naïve résumé",
    "日本語のテキスト and emoji 🚀🎉",
]


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    """A real byte-level BPE with few merges, so multi-byte characters span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


TEXTS = ["hello 日本 🚀 café!", "🎉🎉 naïve fox", "plain ascii only", "末尾が途中"]


@pytest.mark.parametrize("text", TEXTS)
def test_streamer_reproduces_text_with_multibyte_chars(byte_bpe: Tokenizer, text: str) -> None:
    ids = byte_bpe.encode(text).ids
    assert len(ids) > len(text.split())  # really split below word level
    streamer = TextStreamer(byte_bpe)
    pieces = [streamer.push(i) for i in ids]
    pieces.append(streamer.flush())
    assert "".join(pieces) == byte_bpe.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 1  # it streamed, rather than holding everything to the end


def test_streamer_splits_a_character_across_tokens(byte_bpe: Tokenizer) -> None:
    ids = byte_bpe.encode("🚀").ids
    assert len(ids) > 1  # the rocket's four bytes are separate tokens in this tiny vocab
    streamer = TextStreamer(byte_bpe)
    assert [streamer.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🚀"]


def test_streamer_flush_emits_unfinished_character(byte_bpe: Tokenizer) -> None:
    ids = byte_bpe.encode("ok🚀").ids[:-1]  # generation stopped mid-character
    pieces = list(stream_text(byte_bpe, ids))
    assert "".join(pieces) == byte_bpe.decode(ids)
    assert pieces[-1].endswith("\ufffd")


def test_stream_text_with_context_and_special_tokens(byte_bpe: Tokenizer) -> None:
    prompt = byte_bpe.encode("hello ").ids
    gen = byte_bpe.encode("world 日本").ids + [byte_bpe.token_to_id("<eos>")]
    pieces = list(stream_text(byte_bpe, gen, context_ids=prompt))
    assert all(pieces)
    assert "".join(pieces) == "world 日本"  # the special token is skipped, the prompt is not re-printed


def test_streamer_with_transformers_tokenizer(byte_bpe: Tokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_object=byte_bpe, eos_token="<eos>")
    ids = hf_tok.encode("café 🎉 fox")
    assert "".join(stream_text(hf_tok, ids)) == hf_tok.decode(ids) == "café 🎉 fox"


def test_generate_text_encodes_the_prompt_as_the_tokenizer_does(
    make_checkpoint: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`crosschip generate` feeds `tokenizer(prompt)`: BOS once (the tokenizer adds it, as training packed it)."""
    import crosschip.generate as gen
    from crosschip.checkpoint import load_model, load_tokenizer_if_present

    ckpt = make_checkpoint("tiny", tmp_path / "ckpt")
    tok = load_tokenizer_if_present(ckpt)
    prompts: list[list[int]] = []
    real = gen.generate

    def recording(model: torch.nn.Module, input_ids: Any, *args: Any, **kwargs: Any) -> list[int]:
        prompts.append([int(t) for t in input_ids])
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(gen, "generate", recording)
    text = gen.generate_text(ckpt, "Return the value", SamplingParams(max_new_tokens=6), "cpu")
    ids = tok("Return the value")["input_ids"]
    assert prompts == [ids] and ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    model, _ = load_model(ckpt)
    expected = greedy_without_cache(model, torch.tensor([ids]), 6)
    eos = expected.index(tok.eos_token_id) if tok.eos_token_id in expected else len(expected)
    assert text == tok.decode(expected[:eos], skip_special_tokens=True)
