"""Byte-level BPE tokenizer training, saving, loading and fingerprinting.

Design decisions:
  * Byte-level BPE: every byte string is encodable, so there is no unknown token and decoding is lossless.
  * Special tokens come first in the vocabulary (ids 0..6 in SPECIAL_TOKENS order).
  * Encoding never adds BOS/EOS by itself (``add_bos_token=False``). The shard packer wraps every
    document as BOS + ids + EOS explicitly, and the chat template starts with BOS, so callers that
    generate from plain text should prepend ``tokenizer.bos_token_id`` themselves to match training.
  * Chat turns are ``<|role|>\\n{content}<|eos|>\\n``; ending a turn with EOS means generation stops at the
    end of the assistant's turn with the ordinary ``eos_token_id``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crosschip.errors import CrosschipError
from crosschip.fsio import atomic_write_bytes

if TYPE_CHECKING:
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
    # Offsets only; it adds no tokens (BOS is added by the packer, see module docstring).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
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
    return tok


def _wrap(backend: Any, model_max_length: int) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(CHAT_TOKENS),
        add_bos_token=False,
        add_eos_token=False,
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def _save(tok: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """save_pretrained into a scratch dir, then publish each file atomically into out_dir.

    out_dir may be shared with other outputs (a checkpoint directory), so it is not replaced wholesale.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer-") as tmp:
        tok.save_pretrained(tmp)
        _portable_class_name(Path(tmp) / "tokenizer_config.json")
        for f in sorted(Path(tmp).iterdir()):
            if f.is_file():
                atomic_write_bytes(out_dir / f.name, f.read_bytes())


def _portable_class_name(config_path: Path) -> None:
    # transformers 5 records its internal "TokenizersBackend"; transformers 4.x (still common on serving
    # hosts) only knows "PreTrainedTokenizerFast", which 5.x also maps to the same class.
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


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
    _save(tok, Path(out_dir))
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
