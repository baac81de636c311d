"""The prompts `crosschip verify` scores: shipped defaults or a user file, and their token ids.

Defaults: `data/heldout.txt` (English prose about computing, hardware and numerics, written for
crosschip and never trained on: the demo trains on stdlib docstrings) and `data/chat.jsonl`
(short chat prompts for greedy decoding). A user file is read by its content, never its name:
JSONL when every non-blank line is a JSON object, plain text split into paragraphs otherwise.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from crosschip.errors import CrosschipError

GREEDY_PREFIX_TOKENS = 32  # greedy prompt length cut from a text when the tokenizer has no chat template
_TEXT_KEYS = ("text", "prompt")
_FORMAT_FIX = (
    'write paragraphs separated by blank lines, or JSONL records {"text": ...}, {"prompt": ...} '
    'or {"messages": [{"role": ..., "content": ...}]}'
)

Chat = list[dict[str, str]]


@dataclass
class PromptSet:
    """Texts for teacher-forced scoring and chats for greedy decoding, with a digest of both."""

    texts: list[str]
    chats: list[Chat]
    source: str  # where they came from: a file path, or "crosschip:verify/data" for the defaults
    sha256: str  # over a canonical JSON of texts + chats (see `prompt_digest`)


def prompt_digest(texts: list[str], chats: list[Chat]) -> str:
    """sha256 of a canonical JSON of the prompts: the same prompts give the same digest anywhere."""
    canonical = json.dumps({"chats": chats, "texts": texts}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise CrosschipError(f"{name}:{line}: not UTF-8 text (byte {e.start})", "save the file as UTF-8") from e


def _paragraphs(text: str) -> list[str]:
    """Blocks separated by blank (or whitespace-only) lines, stripped; line breaks inside a block are kept."""
    blocks: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.strip():
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    return ["\n".join(b).strip() for b in blocks if b]


def _json_objects(lines: list[str]) -> list[tuple[int, dict[str, Any]]] | None:
    """(line number, object) for every non-blank line, or None unless every one is a JSON object."""
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            return None
        if not isinstance(value, dict):
            return None
        records.append((number, value))
    return records


def _messages(value: Any, where: str) -> Chat:
    if not isinstance(value, list) or not value:
        raise CrosschipError(f"{where}: 'messages' must be a non-empty list", _FORMAT_FIX)
    chat = []
    for i, m in enumerate(value):
        ok = isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        if not ok or not m["role"]:
            raise CrosschipError(
                f"{where}: messages[{i}] must be an object with string 'role' and 'content'", _FORMAT_FIX
            )
        chat.append({"role": m["role"], "content": m["content"]})
    return chat


def _from_records(records: list[tuple[int, dict[str, Any]]], name: str) -> tuple[list[str], list[Chat]]:
    texts: list[str] = []
    chats: list[Chat] = []
    for number, record in records:
        where = f"{name}:{number}"
        if "messages" in record:
            chats.append(_messages(record["messages"], where))
            continue
        key = next((k for k in _TEXT_KEYS if k in record), None)
        if key is None:
            keys = ", ".join(sorted(record)) or "none"
            raise CrosschipError(f"{where}: a record needs 'text', 'prompt' or 'messages' (it has {keys})", _FORMAT_FIX)
        value = record[key]
        if not isinstance(value, str) or not value.strip():
            raise CrosschipError(f"{where}: '{key}' must be a non-empty string", _FORMAT_FIX)
        texts.append(value)
    return texts, chats


def parse_prompts(text: str, name: str) -> tuple[list[str], list[Chat]]:
    """(texts, chats) from a file's content: JSONL if every non-blank line is a JSON object, else paragraphs."""
    lines = text.splitlines()
    records = _json_objects(lines)
    texts, chats = _from_records(records, name) if records is not None else (_paragraphs(text), [])
    if not texts and not chats:
        raise CrosschipError(f"{name}: no prompts in the file (it is empty)", _FORMAT_FIX)
    return texts, chats


def _default_prompts() -> PromptSet:
    data = resources.files("crosschip.verify").joinpath("data")
    texts, _ = parse_prompts(_decode(data.joinpath("heldout.txt").read_bytes(), "heldout.txt"), "heldout.txt")
    _, chats = parse_prompts(_decode(data.joinpath("chat.jsonl").read_bytes(), "chat.jsonl"), "chat.jsonl")
    return PromptSet(texts, chats, "crosschip:verify/data", prompt_digest(texts, chats))


def load_prompts(path: Path | None) -> PromptSet:
    """The shipped defaults (None) or a user's text/JSONL file; bad input is a CrosschipError naming file:line."""
    if path is None:
        return _default_prompts()
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise CrosschipError(f"prompts file {path} {what}", "pass a text or JSONL file to --prompts")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CrosschipError(f"cannot read prompts file {path} ({e.strerror or e})", "check its permissions") from e
    texts, chats = parse_prompts(_decode(raw, str(path)), str(path))
    return PromptSet(texts, chats, str(path), prompt_digest(texts, chats))


def encode_text(text: str, tokenizer: Any) -> list[int]:
    """Token ids of a text as the tokenizer encodes by default, starting with BOS when it has one.

    Training packs every document after BOS, and crosschip's tokenizer adds it (as Llama's and DeepSeek's do);
    a tokenizer saved before it did gets BOS here, so scoring sees the trained distribution either way.
    """
    ids = [int(t) for t in tokenizer(text)["input_ids"]]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, int(bos))
    return ids


def _chat_ids(chat: Chat, tokenizer: Any) -> list[int]:
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    try:
        out = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    except (TemplateError, ValueError, TypeError, KeyError) as e:
        raise CrosschipError(
            f"a chat prompt does not fit the tokenizer's chat template ({e})", "fix the prompt's roles"
        ) from e
    if isinstance(out, Mapping):  # a BatchEncoding where return_dict is not honoured
        out = out["input_ids"]
    return [int(t) for t in out]


def tokenize_prompts(
    prompts: PromptSet, tokenizer: Any, max_tokens: int = 256, min_tokens: int = 8
) -> tuple[list[list[int]], list[list[int]]]:
    """(teacher-forced sequences, greedy prompt ids) for a tokenizer.

    Teacher-forced: each text encoded (see `encode_text`), cut to `max_tokens`, skipped when shorter
    than `min_tokens`. Greedy: each chat rendered by the chat template with the generation prompt;
    without a template, the first GREEDY_PREFIX_TOKENS tokens of each kept text.
    """
    if min_tokens < 2 or max_tokens < min_tokens:
        raise CrosschipError(
            f"need 2 <= min_tokens <= max_tokens, got min {min_tokens}, max {max_tokens}", "raise --max-tokens"
        )
    sequences = [ids[:max_tokens] for ids in (encode_text(t, tokenizer) for t in prompts.texts)]
    sequences = [ids for ids in sequences if len(ids) >= min_tokens]
    if getattr(tokenizer, "chat_template", None) and prompts.chats:
        greedy = [_chat_ids(chat, tokenizer) for chat in prompts.chats]
    else:
        greedy = [ids[:GREEDY_PREFIX_TOKENS] for ids in sequences]
    if not sequences and not greedy:
        raise CrosschipError(
            f"no prompt in {prompts.source} is at least {min_tokens} tokens long",
            "use longer prompts (paragraphs of a few sentences)",
        )
    return sequences, greedy
