"""Text generation with a KV cache: prefill once, then decode one token per step.

Works with any transformers causal LM whose forward takes a cache (Llama, DeepSeek-V3 MLA+MoE,
...), on whatever device the model lives on. Streaming text comes from `TextStreamer`, which
turns token ids into printable increments without splitting multi-byte characters.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from crosschip.errors import CrosschipError

_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """Anything with a `decode(ids, skip_special_tokens=...)`: transformers or `tokenizers` tokenizers."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature 0 means greedy (top_k/top_p are then unused)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise CrosschipError(
                f"max_new_tokens must be >= 1, got {self.max_new_tokens}", "pass --max-new-tokens 1 or more"
            )
        if not self.temperature >= 0:  # also rejects NaN
            raise CrosschipError(
                f"temperature must be >= 0, got {self.temperature}", "use 0 for greedy or a positive value"
            )
        if not 0 < self.top_p <= 1:
            raise CrosschipError(f"top_p must be in (0, 1], got {self.top_p}", "use 1.0 to disable top_p")
        if self.top_k < 0:
            raise CrosschipError(f"top_k must be >= 0, got {self.top_k}", "use 0 to disable top_k")


def _filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Set everything below the k-th largest logit of each row to -inf."""
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of top tokens whose probability mass reaches top_p (nucleus)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Mass strictly before each token: a token is dropped once the mass before it already
    # reaches top_p, so the most likely token always survives.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick next-token ids [B] from logits [B, V]: greedy, or temperature + top-k + top-p sampling.

    Pure: `logits` is not modified. `generator` may live on another device than `logits`
    (some backends lack device generators); sampling then happens on the generator's device.
    """
    if logits.ndim != 2:
        raise CrosschipError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if params.temperature == 0:
        return torch.argmax(logits, dim=-1)
    scaled = logits.float() / params.temperature
    if params.top_k > 0:
        scaled = _filter_top_k(scaled, params.top_k)
    if params.top_p < 1.0:
        scaled = _filter_top_p(scaled, params.top_p)
    probs = torch.softmax(scaled, dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    ids = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    return ids.to(logits.device)


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    if param is None:
        raise CrosschipError(f"{type(model).__name__} has no parameters", "load a model checkpoint")
    return param.device


def _make_generator(device: torch.device, seed: int | None) -> torch.Generator | None:
    """Seeded generator on the model's device; CPU when the backend has no device generators."""
    if seed is None:
        return None
    try:
        generator = torch.Generator(device=device)
    except RuntimeError:
        generator = torch.Generator()
    return generator.manual_seed(seed)


def _prompt_ids(model: torch.nn.Module, input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Validated [1, T] prompt on the model's device."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise CrosschipError(
            f"generate takes one prompt, got ids of shape {tuple(ids.shape)}", "pass [T] or [1, T]"
        )
    if ids.shape[1] == 0:
        raise CrosschipError("the prompt is empty (0 tokens)", "pass a non-empty --prompt")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise CrosschipError(
            f"prompt token ids must be in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]",
            "use the tokenizer that belongs to this checkpoint",
        )
    return ids.to(_model_device(model))


def cache_kwargs(model: torch.nn.Module) -> tuple[str, dict[str, int]]:
    """Name of the forward's cache argument and optional extras, across transformers versions.

    transformers 5.24 renamed `past_key_values` to `cache` (the old name warns). `logits_to_keep=1`
    skips the full-vocab projection of every prompt position during prefill.
    """
    params = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    extras = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return name, extras


def new_cache(model: torch.nn.Module) -> object:
    from transformers import DynamicCache  # local: keeps `import crosschip.generate` light

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers without the config argument
        return DynamicCache()


def _eos_set(eos_token_id: int | Iterable[int] | None) -> frozenset[int]:
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset({eos_token_id})
    return frozenset(int(t) for t in eos_token_id)


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor | Sequence[int],
    params: SamplingParams,
    eos_token_id: int | Iterable[int] | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Generate up to `params.max_new_tokens` new token ids after a single prompt.

    Prefill runs one forward over the whole prompt and fills a DynamicCache; each decode step
    then feeds only the newest token. Stops at `eos_token_id` (an int or several; the eos token
    is neither returned nor passed to `on_token`) or after max_new_tokens. The model is put in
    eval mode for the call (dropout would make decoding random) and restored afterwards.
    """
    ids = _prompt_ids(model, input_ids)
    device = ids.device
    generator = _make_generator(device, params.seed)
    stop = _eos_set(eos_token_id)
    cache_arg, extras = cache_kwargs(model)
    cache = new_cache(model)
    was_training = model.training
    model.eval()
    out: list[int] = []
    try:
        step_input = ids
        for step in range(params.max_new_tokens):
            kwargs = extras if step == 0 else {}
            result = model(input_ids=step_input, use_cache=True, **{cache_arg: cache}, **kwargs)
            next_id = sample_next(result.logits[:, -1, :], params, generator)
            token = int(next_id.item())
            if token in stop:
                break
            out.append(token)
            if on_token is not None:
                on_token(token)
            step_input = next_id.view(1, 1)
    finally:
        model.train(was_training)
    return out


class TextStreamer:
    """Turns token ids into printable text increments, safe for byte-level BPE.

    Each `push` decodes a short window (the last emitted token for context plus the new ones)
    and returns only the text not printed yet. While the window ends in an incomplete UTF-8
    sequence (decoded as U+FFFD) nothing is returned; `flush` returns whatever is left.
    Concatenating every returned piece gives `tokenizer.decode(all_ids)`.

    `context_ids` (e.g. the prompt) are decoded as context but never emitted, so the first
    generated word keeps its leading space with SentencePiece-style tokenizers.
    Works with `transformers` tokenizers and raw `tokenizers.Tokenizer` (both have `decode`).
    """

    def __init__(self, tokenizer: Decoder, context_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = [int(t) for t in context_ids][-4:]  # a few tokens suffice as context
        self._prefix = 0  # window start: already-printed context
        self._read = len(self._ids)  # everything before this has been printed

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _pending(self) -> str:
        """Text of the not-yet-printed tokens, given the window's context."""
        printed = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        return full[len(printed) :]

    def push(self, token_id: int) -> str:
        """Add one token id; return the newly printable text (possibly '')."""
        self._ids.append(int(token_id))
        text = self._pending()
        if not text or text.endswith(_REPLACEMENT):
            return ""  # incomplete character (or a token that prints nothing yet): wait
        self._prefix, self._read = self._read, len(self._ids)
        return text

    def flush(self) -> str:
        """Return any text still held back (an unfinished character decodes as U+FFFD)."""
        text = self._pending()
        self._prefix, self._read = self._read, len(self._ids)
        return text


def stream_text(
    tokenizer: Decoder, ids_iter: Iterable[int], context_ids: Sequence[int] = ()
) -> Iterator[str]:
    """Yield printable, non-empty text pieces for a stream of token ids (see `TextStreamer`)."""
    streamer = TextStreamer(tokenizer, context_ids=context_ids)
    for token_id in ids_iter:
        piece = streamer.push(token_id)
        if piece:
            yield piece
    tail = streamer.flush()
    if tail:
        yield tail


def generate_text(
    ckpt: Path, prompt: str, params: SamplingParams, device: str = "auto",
    on_text: Callable[[str], object] | None = None,
) -> str:
    """Load a checkpoint (validated) with its tokenizer and continue `prompt`; stream via on_text."""
    from crosschip.checkpoint import load_model, load_tokenizer_if_present
    from crosschip.devices import resolve_device

    tokenizer = load_tokenizer_if_present(ckpt)
    if tokenizer is None:
        raise CrosschipError(f"checkpoint {ckpt} has no tokenizer files", "copy the tokenizer files into it")
    model, _ = load_model(ckpt, resolve_device(device))
    # As the tokenizer encodes (crosschip's adds BOS, as every training document starts with it), so
    # `generate` sees what vLLM and `transformers` users send.
    prompt_ids = tokenizer(prompt)["input_ids"]
    streamer = TextStreamer(tokenizer, context_ids=prompt_ids)
    pieces: list[str] = []

    def emit(token: int) -> None:
        piece = streamer.push(token)
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)

    generate(model, prompt_ids, params, eos_token_id=tokenizer.eos_token_id, on_token=emit)
    tail = streamer.flush()
    if tail and on_text is not None:
        on_text(tail)
    return "".join(pieces) + tail
