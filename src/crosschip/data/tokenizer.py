"""Byte-level BPE tokenizer training, saving, loading and fingerprinting.

Design decisions:
  * Byte-level BPE: every byte string is encodable, so there is no unknown token and decoding is lossless.
  * Special tokens come first in the vocabulary (ids 0..6 in SPECIAL_TOKENS order).
  * ``tokenizer(text)`` starts with BOS, as every document does in training: the shard packer wraps each
    document as BOS + ids + EOS, so the saved tokenizer's post-processor adds BOS (and tokenizer_config
    says ``add_bos_token: true``), and vLLM, lm-eval and `transformers` users get the trained distribution.
    It never adds EOS. The chat template renders BOS itself, so rendered chat text is encoded with
    ``add_special_tokens=False`` (as ``apply_chat_template(tokenize=True)`` and vLLM do): one BOS, not two.
  * Chat turns are ``<|role|>\\n{content}<|eos|>\\n``; ending a turn with EOS means generation stops at the
    end of the assistant's turn with the ordinary ``eos_token_id``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crosschip.errors import CrosschipError
from crosschip.fsio import atomic_write_bytes, scratch_dir

if TYPE_CHECKING:
    from tokenizers.processors import PostProcessor
    from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *CHAT_TOKENS)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
MAX_VOCAB_SIZE = 1 << 20

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{- raise_exception('unknown chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def _counted(docs: Iterable[str], counter: list[int]) -> Iterator[str]:
    for doc in docs:
        counter[0] += 1
        yield doc


def _build_backend(docs: Iterable[str], vocab_size: int) -> Any:
    """Train the raw `tokenizers.Tokenizer` (byte-level BPE, specials first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    counter = [0]
    tok.train_from_iterator(_counted(docs, counter), trainer=trainer)
    if counter[0] == 0:
        raise CrosschipError("cannot train a tokenizer on zero documents", "pass a non-empty corpus")
    # BOS first, as the packer does; ByteLevel only maps offsets (it adds no tokens).
    offsets = processors.ByteLevel(trim_offsets=False)
    tok.post_processor = bos_post_processor(BOS_TOKEN, tok.token_to_id(BOS_TOKEN), [offsets])
    return tok


def bos_post_processor(bos: str, bos_id: int, then: Iterable[PostProcessor] = ()) -> PostProcessor:
    """BOS before each sequence (a pair is two documents, each after its BOS), then the `then` steps.

    The template is the one transformers' `TokenizersBackend.update_post_processor` builds for
    ``add_bos_token=True`` (tokenization_utils_tokenizers.py), so every reader agrees on the ids.
    """
    from tokenizers import processors

    template = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )
    return processors.Sequence([template, *then])


def adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer(text)`` starts with the tokenizer's BOS (False when it has none)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def packed_with_bos(provenance: Mapping[str, Any]) -> bool:
    """Whether a checkpoint was trained by `crosschip train` (its provenance, kept through convert, has a
    `train_config`): its packer put BOS before every training document, whatever the tokenizer added."""
    return isinstance(provenance, Mapping) and "train_config" in provenance


def needs_bos_repair(provenance: Mapping[str, Any], tokenizer: Any) -> bool:
    """A crosschip-trained checkpoint (its provenance has a `train_config`) whose tokenizer does not add BOS.

    crosschip's packer put BOS before every training document (data/tokenize.py), whatever the tokenizer,
    so text must be encoded after BOS to get the trained distribution. Tokenizers saved before
    crosschip's did so themselves need the repair `crosschip convert` makes (`add_bos_to_saved`).
    """
    if not packed_with_bos(provenance) or getattr(tokenizer, "bos_token_id", None) is None:
        return False
    return not adds_bos(tokenizer)


def _offset_steps(post_processor: dict[str, Any] | None) -> list[PostProcessor] | None:
    """The steps of a saved post-processor that add no tokens, to keep after BOS; None if one does.

    Seen in saved crosschip tokenizers: none, ByteLevel (offsets only) and transformers 5's token-free
    template (``$A`` / ``$A $B``, written for ``add_bos_token=False``). Anything that adds tokens is left
    alone: two token-adding templates cannot be chained (`tokenizers` panics on pairs).
    """
    from tokenizers import processors

    if post_processor is None:
        return []
    steps = post_processor["processors"] if post_processor.get("type") == "Sequence" else [post_processor]
    kept: list[PostProcessor] = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            options = ("add_prefix_space", "trim_offsets", "use_regex")
            kept.append(processors.ByteLevel(**{k: step[k] for k in options if k in step}))
        elif kind != "TemplateProcessing" or step.get("special_tokens") or any(
            "SpecialToken" in item for item in step.get("single", []) + step.get("pair", [])
        ):
            return None
    return kept


def add_bos_to_saved(directory: Path) -> bool:
    """Make the tokenizer saved in `directory` add BOS (tokenizer.json and tokenizer_config.json, atomically).

    Returns False, changing nothing, when it already adds BOS, has no BOS token, or its post-processor
    adds other tokens (see `_offset_steps`).
    """
    from tokenizers import Tokenizer

    directory = Path(directory)
    tok = load_tokenizer(directory)
    if tok.bos_token is None or adds_bos(tok):
        return False
    path = directory / "tokenizer.json"
    backend = Tokenizer.from_str(path.read_text(encoding="utf-8"))
    then = _offset_steps(json.loads(backend.to_str()).get("post_processor"))
    if then is None:
        return False
    backend.post_processor = bos_post_processor(str(tok.bos_token), int(tok.bos_token_id), then)
    atomic_write_bytes(path, backend.to_str(pretty=True).encode("utf-8"))
    config = directory / "tokenizer_config.json"
    if config.is_file():
        atomic_write_bytes(config, _config_json(config, adds_bos=True))
    return True


def _wrap(backend: Any, model_max_length: int) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(CHAT_TOKENS),
        # No add_bos_token/add_eos_token here: transformers 5 would then replace the backend's
        # post-processor with its own template. BOS comes from `bos_post_processor`, set in the backend.
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tok: Any, out_dir: Path) -> None:
    """save_pretrained into a scratch dir, then publish each file atomically into out_dir.

    out_dir may be shared with other outputs (a checkpoint directory), so it is not replaced wholesale.
    tokenizer_config.json is made portable and states whether the tokenizer adds BOS (see `_config_json`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with scratch_dir("tokenizer", parent=out_dir) as tmp:
        tok.save_pretrained(tmp)
        config = Path(tmp) / "tokenizer_config.json"
        if config.is_file():
            config.write_bytes(_config_json(config, adds_bos=adds_bos(tok)))
        for f in sorted(Path(tmp).iterdir()):
            if f.is_file():
                atomic_write_bytes(out_dir / f.name, f.read_bytes())


def _config_json(config_path: Path, adds_bos: bool) -> bytes:
    """tokenizer_config.json with a portable class name and `add_bos_token` as the tokenizer behaves.

    transformers 5 records its internal "TokenizersBackend"; transformers 4.x (still common on serving
    hosts) only knows "PreTrainedTokenizerFast", which 5.x also maps to the same class. transformers 5
    drops `add_bos_token` on save and ignores it on load when tokenizer.json exists (the post-processor
    rules: tokenization_utils_base.py), but 4.x and tools that read the config (llama.cpp's converter)
    use it, so it is written to match what tokenizer.json does.
    """
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["add_bos_token"] = adds_bos
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def train_tokenizer(
    docs: Iterable[str], vocab_size: int, out_dir: Path, model_max_length: int = 2048
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `docs`, save it to `out_dir` and return it."""
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise CrosschipError(
            f"vocab size {vocab_size} out of range: byte-level BPE needs 256 bytes + {len(SPECIAL_TOKENS)} "
            f"special tokens",
            f"pass a vocab size between {MIN_VOCAB_SIZE} and {MAX_VOCAB_SIZE}",
        )
    if model_max_length < 1:
        raise CrosschipError(f"model_max_length must be positive, got {model_max_length}", "pass a positive length")
    tok = _wrap(_build_backend(docs, vocab_size), model_max_length)
    save_tokenizer(tok, Path(out_dir))
    return tok


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast | Path | str) -> str:
    """sha256 of the tokenizer.json content, canonicalized; accepts a tokenizer or its directory.

    Runtime truncation/padding settings are dropped: transformers mutates them on the backend when called
    with ``truncation=True``/``padding=...``, and they do not change which ids a text maps to.
    """
    if isinstance(tok, (str, Path)):
        path = Path(tok) / "tokenizer.json"
        if not path.is_file():
            raise CrosschipError(f"no tokenizer.json in {tok}", "pass a directory written by save_pretrained")
        text = path.read_text(encoding="utf-8")
    else:
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            raise CrosschipError(f"{type(tok).__name__} is not a fast tokenizer", "use a tokenizer with tokenizer.json")
        text = backend.to_str()
    obj = json.loads(text)
    obj.pop("truncation", None)
    obj.pop("padding", None)
    canonical = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_tokenizer(directory: Path | str) -> PreTrainedTokenizerFast:
    """Load a saved fast tokenizer from a local directory (never touches the network)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise CrosschipError(
            f"no tokenizer found in {directory} (tokenizer.json missing)",
            "train one first or pass the directory that holds tokenizer.json",
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CrosschipError(f"cannot load tokenizer from {directory}: {e}", "re-create the tokenizer") from e
    if not getattr(tok, "is_fast", False):
        raise CrosschipError(f"tokenizer in {directory} is not a fast tokenizer", "save it with tokenizer.json")
    return tok
