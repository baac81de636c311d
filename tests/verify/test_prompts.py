"""Verify prompts: the shipped defaults, content-based format detection, errors with file:line, tokenization."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from crosschip.errors import CrosschipError
from crosschip.verify.prompts import (
    GREEDY_PREFIX_TOKENS,
    PromptSet,
    load_prompts,
    prompt_digest,
    tokenize_prompts,
)


def test_defaults_are_shipped_prose_and_chats() -> None:
    prompts = load_prompts(None)
    assert 12 <= len(prompts.texts) <= 16 and len(prompts.chats) == 6
    assert all(40 <= len(t.split()) <= 120 for t in prompts.texts)
    assert not any('"""' in t or ">>>" in t for t in prompts.texts)  # prose, not docstrings
    assert all(chat[0]["role"] == "user" and chat[0]["content"] for chat in prompts.chats)
    assert prompts.source == "crosschip:verify/data"
    assert len(prompts.sha256) == 64
    assert load_prompts(None).sha256 == prompts.sha256 == prompt_digest(prompts.texts, prompts.chats)


def test_digest_changes_with_content() -> None:
    base = prompt_digest(["a b"], [[{"role": "user", "content": "hi"}]])
    assert base != prompt_digest(["a  b"], [[{"role": "user", "content": "hi"}]])
    assert base != prompt_digest(["a b"], [[{"role": "user", "content": "hi!"}]])
    assert base != prompt_digest(["a b", ""], [[{"role": "user", "content": "hi"}]])


def test_plain_text_paragraphs(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"  # the name says JSONL; the content is prose
    path.write_text('First paragraph,\nwrapped over two lines.\n\n  \n\nSecond one.\n{"text": "not alone"}\n')
    prompts = load_prompts(path)
    assert prompts.texts == ["First paragraph,\nwrapped over two lines.", 'Second one.\n{"text": "not alone"}']
    assert prompts.chats == [] and prompts.source == str(path)


def test_jsonl_detected_by_content(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"  # the name says text; every line is a JSON object
    records = [
        {"text": "A text to score."},
        {"prompt": "A prompt to score.", "id": 3},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n" + json.dumps(records[2]) + "\n")
    prompts = load_prompts(path)
    assert prompts.texts == ["A text to score.", "A prompt to score."]
    assert prompts.chats == [records[2]["messages"]]
    assert prompts.sha256 == prompt_digest(prompts.texts, prompts.chats)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"label": 1}\n', ":2: a record needs 'text', 'prompt' or 'messages' (it has label)"),
        ('{"text": "ok"}\n\n{"text": ""}\n', ":3: 'text' must be a non-empty string"),
        ('{"messages": []}\n', ":1: 'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user"}]}\n', ":1: messages[0] must be an object"),
        ("\n   \n", "no prompts in the file"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(CrosschipError) as err:
        load_prompts(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_not_utf8_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("line one\nline two caf\u00e9\n".encode("latin-1"))
    with pytest.raises(CrosschipError, match=r"latin1\.txt:2: not UTF-8"):
        load_prompts(path)
    with pytest.raises(CrosschipError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
    with pytest.raises(CrosschipError, match="is a directory"):
        load_prompts(tmp_path)


def _set(texts: list[str], chats: list[list[dict[str, str]]] | None = None) -> PromptSet:
    return PromptSet(texts, chats or [], "test", prompt_digest(texts, chats or []))


def test_tokenize_limits_and_bos(tiny_tokenizer: Any) -> None:
    long_text = " ".join(["numbers round to nearest even"] * 40)
    prompts = _set([long_text, "tiny", "A short sentence about caches and memory."])
    sequences, _ = tokenize_prompts(prompts, tiny_tokenizer, max_tokens=64, min_tokens=8)
    bos = tiny_tokenizer.bos_token_id
    body = tiny_tokenizer(long_text, add_special_tokens=False)["input_ids"]
    assert sequences[0] == [bos, *body][:64]  # cut to max_tokens, BOS first (as training packs documents)
    assert len(sequences) == 2  # "tiny" is under min_tokens
    assert sequences[1][0] == bos and sequences[1].count(bos) == 1
    with pytest.raises(CrosschipError, match="min_tokens"):
        tokenize_prompts(prompts, tiny_tokenizer, max_tokens=4, min_tokens=8)
    with pytest.raises(CrosschipError, match="at least 8 tokens"):
        tokenize_prompts(_set(["tiny"]), tiny_tokenizer)


def test_tokenize_uses_chat_template(tiny_tokenizer: Any) -> None:
    chats = [[{"role": "user", "content": "What is bfloat16?"}], [{"role": "user", "content": "Hi"}]]
    prompts = _set(["A short sentence about caches and memory."], chats)
    _, greedy = tokenize_prompts(prompts, tiny_tokenizer)
    rendered = tiny_tokenizer.apply_chat_template(chats[0], add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|assistant|>\n")
    assert greedy[0] == tiny_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert len(greedy) == 2 and all(g[0] == tiny_tokenizer.bos_token_id for g in greedy)


def test_tokenize_without_chat_template_uses_text_prefixes(tiny_tokenizer: Any) -> None:
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    prompts = load_prompts(None)
    sequences, greedy = tokenize_prompts(prompts, plain)
    assert len(sequences) == len(prompts.texts) and all(len(s) > GREEDY_PREFIX_TOKENS for s in sequences)
    assert greedy == [s[:GREEDY_PREFIX_TOKENS] for s in sequences]
