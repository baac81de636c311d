"""Tests for crosschip.data: corpus reading, tokenizer, token streams and batch loading.

Tokenizing into datasets (`data tokenize`, `train --data`): tests/data/test_tokenize.py.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from crosschip.data import (
    PackedBatches,
    TokenStream,
    data_fingerprint,
    eval_batches,
    iter_documents,
    list_data_files,
    load_tokenizer,
    stdlib_docstring_corpus,
    tokenizer_fingerprint,
    train_tokenizer,
    unigram_entropy,
)
from crosschip.data.dataset import is_val_document, token_dtype
from crosschip.data.tokenizer import BOS_TOKEN, EOS_TOKEN, MIN_VOCAB_SIZE
from crosschip.errors import CrosschipError

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "tensor",
    "device",
    "checkpoint",
    "serve",
    "convert",
    "verify",
]


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + "." for _ in range(n)]


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(_sentences(300) + ["Grüße, 世界! 🤖 tabs\tand\nnewlines"], 400, out, model_max_length=128)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path):
    return load_tokenizer(tok_dir)


# --------------------------------------------------------------------------- corpus


def test_reads_txt_jsonl_parquet_directory(tmp_path: Path) -> None:
    (tmp_path / "a.TXT").write_text("doc from txt", encoding="utf-8")
    (tmp_path / "blank.txt").write_text("  \n", encoding="utf-8")  # skipped: empty document
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.jsonl").write_text('{"text": "j1"}\n\n{"text": "j2", "id": 3}\n{"text": ""}\n', encoding="utf-8")
    table = pa.table({"text": ["p1", None, "p2", "", "p3"], "other": [1, 2, 3, 4, 5]})
    pq.write_table(table, sub / "c.parquet", row_group_size=2)  # several row groups
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")

    files = list_data_files(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "a.TXT",
        "blank.txt",
        "sub/b.jsonl",
        "sub/c.parquet",
    ]
    assert list(iter_documents(tmp_path)) == ["doc from txt", "j1", "j2", "p1", "p2", "p3"]
    assert list(iter_documents(sub / "b.jsonl")) == ["j1", "j2"]


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, text the error must contain)."""
    (tmp / "empty").mkdir()
    (tmp / "only_md").mkdir()
    (tmp / "only_md" / "x.md").write_text("x", encoding="utf-8")
    (tmp / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    (tmp / "notext.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    pq.write_table(pa.table({"body": ["x"]}), tmp / "nocol.parquet")
    (tmp / "fake.parquet").write_text("a,b\n1,2\n" * 10, encoding="utf-8")
    (tmp / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp / "data.csv").write_text("text\nx\n", encoding="utf-8")
    return {
        "missing": (tmp / "nope", "does not exist"),
        "empty_dir": (tmp / "empty", "is empty"),
        "no_accepted": (tmp / "only_md", ".md"),
        "bad_json_line": (tmp / "bad.jsonl", "bad.jsonl:2"),
        "no_text_field": (tmp / "notext.jsonl", "notext.jsonl:1"),
        "parquet_no_text": (tmp / "nocol.parquet", 'no "text" column'),
        "not_parquet": (tmp / "fake.parquet", "PAR1"),
        "bad_utf8": (tmp / "latin1.txt", "latin1.txt"),
        "unsupported": (tmp / "data.csv", "unsupported"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty_dir",
        "no_accepted",
        "bad_json_line",
        "no_text_field",
        "parquet_no_text",
        "not_parquet",
        "bad_utf8",
        "unsupported",
    ],
)
def test_bad_inputs_raise_crosschip_error(tmp_path: Path, case: str) -> None:
    path, needle = _bad_inputs(tmp_path)[case]
    with pytest.raises(CrosschipError) as info:
        list(iter_documents(path))
    assert needle in str(info.value)
    assert info.value.fix  # every data error tells the user what to do


def test_data_fingerprint_content_and_location(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    (a / "x.txt").write_text("abc", encoding="utf-8")
    (a / "y.jsonl").write_text('{"text": "q"}\n', encoding="utf-8")
    fp = data_fingerprint(list_data_files(a))
    shutil.copytree(a, tmp_path / "b")
    assert data_fingerprint(list_data_files(tmp_path / "b")) == fp  # moving the corpus keeps the key
    (a / "x.txt").write_text("abd", encoding="utf-8")  # same size, different content
    assert data_fingerprint(list_data_files(a)) != fp


def test_stdlib_docstring_corpus(tmp_path: Path) -> None:
    out = stdlib_docstring_corpus(tmp_path / "c.jsonl", max_bytes=150_000)
    data = out.read_bytes()
    assert 100_000 < len(data) <= 150_000
    docs = list(iter_documents(out))
    assert len(docs) > 100
    assert all(len(d) >= 40 for d in docs)
    assert len(set(docs)) == len(docs)
    again = stdlib_docstring_corpus(tmp_path / "d.jsonl", max_bytes=150_000)
    assert again.read_bytes() == data  # deterministic


def test_unigram_entropy() -> None:
    assert unigram_entropy(np.array([0, 1, 2, 3] * 5, dtype=np.uint16), 10) == pytest.approx(math.log(4))
    assert unigram_entropy(np.array([7, 7, 7]), 10) == pytest.approx(0.0)
    with pytest.raises(CrosschipError):
        unigram_entropy(np.array([1, 10]), 10)
    with pytest.raises(CrosschipError):
        unigram_entropy(np.array([], dtype=np.int64), 10)


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_adds_bos_as_training(tok) -> None:
    text = "Grüße, 世界! 🤖 the lazy dog\n\ttabs  and  spaces ünseen ✓"
    ids = tok(text)["input_ids"]
    # BOS first (the packer puts it before every document), never EOS; the text is lossless after it.
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 and ids[-1] != tok.eos_token_id
    assert ids[1:] == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    pair = tok("the dog", "a fox")["input_ids"]  # two documents: each after its BOS
    assert pair == tok("the dog")["input_ids"] + tok("a fox")["input_ids"]
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert MIN_VOCAB_SIZE < len(tok) <= 400  # small corpora may run out of merges before the cap
    assert tok.model_max_length == 128


def test_tokenizer_loads_with_auto_tokenizer(tok, tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(tok_dir))
    text = "the quick brown fox 🤖"
    assert auto(text)["input_ids"] == tok(text)["input_ids"]
    assert auto(text).input_ids[0] == auto.bos_token_id  # what vLLM, lm-eval and HF users get
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["tokenizer_class"] == "PreTrainedTokenizerFast"
    # The raw `tokenizers` file adds BOS too (readers that skip transformers), with byte offsets intact.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).encode(text)
    assert raw.ids == auto(text).input_ids and raw.offsets[0] == (0, 0) and raw.offsets[1][0] == 0
    assert auto.bos_token == BOS_TOKEN and auto.eos_token == EOS_TOKEN
    assert tokenizer_fingerprint(auto) == tokenizer_fingerprint(tok) == tokenizer_fingerprint(tok_dir)


def test_chat_template(tok) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nhi<|eos|>\n<|assistant|>\n"
    plain = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert plain == text.removesuffix("<|assistant|>\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.convert_tokens_to_ids("<|assistant|>") in ids  # chat markers are single special tokens
    # The template renders BOS itself; tokenize=True (like vLLM's chat path) adds no second one.
    rendered = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert rendered["input_ids"] == ids and ids.count(tok.bos_token_id) == 1
    assert tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2  # why chat text is encoded without specials
    with pytest.raises(jinja2.TemplateError):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_tokenizer_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(CrosschipError):
        train_tokenizer(["abc"], MIN_VOCAB_SIZE - 1, tmp_path / "t")
    with pytest.raises(CrosschipError):
        train_tokenizer([], 300, tmp_path / "t")
    with pytest.raises(CrosschipError):
        load_tokenizer(tmp_path / "missing")


def test_tokenizer_fingerprint_ignores_runtime_truncation(tmp_path: Path, tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    fp = tokenizer_fingerprint(tok)
    tok("the dog " * 50, truncation=True, max_length=8, padding="max_length")  # mutates the backend
    assert tokenizer_fingerprint(tok) == fp
    other = train_tokenizer(_sentences(300, seed=1), 300, tmp_path / "other")
    assert tokenizer_fingerprint(other) != fp


# --------------------------------------------------------------------------- token datasets


def test_token_dtype_is_datatrove_s() -> None:
    assert token_dtype(400) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32


def test_val_split_is_a_seeded_hash_of_the_document_id() -> None:
    ids = [f"corpus.jsonl/{i}" for i in range(4000)]
    val = [i for i in ids if is_val_document(i, 0, 0.1)]
    assert 300 < len(val) < 500  # ~10%
    assert val == [i for i in ids if is_val_document(i, 0, 0.1)]  # deterministic
    assert val != [i for i in ids if is_val_document(i, 1, 0.1)]  # another seed, another split
    assert set(val) <= {i for i in ids if is_val_document(i, 0, 0.2)}  # a larger fraction keeps the smaller's


def test_token_stream_reads_several_files_as_one(tmp_path: Path) -> None:
    whole = np.arange(1000, dtype=np.uint16)
    parts = []
    for k, (a, b) in enumerate([(0, 7), (7, 300), (300, 301), (301, 301), (301, 1000)]):  # one empty, one 1-token
        whole[a:b].tofile(tmp_path / f"{k}.ds")
        parts.append(np.memmap(tmp_path / f"{k}.ds", dtype=np.uint16, mode="r", shape=(b - a,)) if b > a
                     else np.empty(0, dtype=np.uint16))
    stream = TokenStream(parts)
    assert len(stream) == 1000 and stream.dtype == np.uint16 and stream.ndim == 1
    for a, b in [(0, 1000), (5, 10), (3, 305), (299, 302), (300, 301), (10, 10), (999, 1000), (990, 2000)]:
        assert np.array_equal(stream[a:b], whole[a:b]), (a, b)
    assert int(stream[300]) == 300 and int(stream[-1]) == 999 and np.array_equal(np.asarray(stream), whole)
    with pytest.raises(IndexError):
        stream[1000]
    # The loader sees the same windows in the same order over the files as over one array.
    ours, ref = PackedBatches(stream, 3, 16, seed=2), PackedBatches(whole, 3, 16, seed=2)
    for _ in range(30):
        assert all(torch.equal(a, b) for a, b in zip(ours.next_batch(), ref.next_batch(), strict=True))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(eval_batches(stream, 4, 16), eval_batches(whole, 4, 16),
                                                       strict=True))
    assert unigram_entropy(stream, 1000) == pytest.approx(unigram_entropy(whole, 1000))


# --------------------------------------------------------------------------- loader


def _stream(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint16)


def test_batches_are_shifted_windows() -> None:
    loader = PackedBatches(_stream(1001), batch_size=4, seq_len=10, seed=0)
    assert loader.n_windows == 100 and len(loader) == 25
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 10) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)
    assert all(int(row[0]) % 10 == 0 for row in x)  # windows start on the stride grid
    x.zero_()  # a fresh copy: scribbling on it must not touch the stream
    assert int(loader.tokens[11]) == 11


def test_epoch_visits_every_window_once_and_is_seeded() -> None:
    a = PackedBatches(_stream(1001), batch_size=5, seq_len=10, seed=7)
    b = PackedBatches(_stream(1001), batch_size=5, seq_len=10, seed=7)
    c = PackedBatches(_stream(1001), batch_size=5, seq_len=10, seed=8)
    firsts = []
    for _ in range(len(a)):
        xa, _ = a.next_batch()
        xb, _ = b.next_batch()
        assert torch.equal(xa, xb)
        firsts.extend(int(v) // 10 for v in xa[:, 0])
    assert sorted(firsts) == list(range(100))
    assert firsts != sorted(firsts)  # shuffled
    assert not torch.equal(c.next_batch()[0], PackedBatches(_stream(1001), 5, 10, seed=7).next_batch()[0])
    assert a.state_dict()["epoch"] == 0 and a.next_batch() and a.state_dict()["epoch"] == 1


def test_state_dict_resume_is_exact() -> None:
    ref = PackedBatches(_stream(501), batch_size=3, seq_len=10, seed=1)  # 50 windows: epochs wrap mid-batch
    for _ in range(15):
        ref.next_batch()
    state = json.loads(json.dumps(ref.state_dict()))  # plain ints survive a JSON round trip
    expected = [ref.next_batch() for _ in range(30)]  # crosses an epoch boundary
    resumed = PackedBatches(_stream(501), batch_size=3, seq_len=10, seed=1)
    resumed.load_state_dict(state)
    for (ex, ey), (rx, ry) in zip(expected, (resumed.next_batch() for _ in range(30)), strict=True):
        assert torch.equal(ex, rx) and torch.equal(ey, ry)
    with pytest.raises(CrosschipError, match="seq_len"):
        PackedBatches(_stream(501), batch_size=3, seq_len=5, seed=1).load_state_dict(state)


def _global_batches(world: int, grad_accum: int, steps: int, **kw: object) -> list[list[int]]:
    """Window starts of each global batch, gathered from every rank's micro-batches in rank order."""
    loaders = [PackedBatches(_stream(501), 2, 10, 3, rank, world, grad_accum, **kw) for rank in range(world)]
    out = []
    for _ in range(steps):
        batch = [int(v) for ld in loaders for _ in range(grad_accum) for v in ld.next_batch()[0][:, 0]]
        out.append(batch)
    return out


def test_global_batches_do_not_depend_on_the_world_size() -> None:
    # Global batch of 8 windows: 1 rank x 4 micro-batches, 2 x 2, 4 x 1. 50 windows: epochs wrap mid-batch.
    one = _global_batches(1, 4, 20)
    assert _global_batches(2, 2, 20) == one and _global_batches(4, 1, 20) == one
    epoch0 = [w for b in one[:7] for w in b][:50]
    assert sorted(epoch0) == [10 * i for i in range(50)]  # the first epoch visits every window once


def test_resharded_resume_continues_the_same_global_order() -> None:
    ref = _global_batches(1, 4, 12)
    two = [PackedBatches(_stream(501), 2, 10, 3, rank, 2, 2) for rank in range(2)]
    for _ in range(5):
        for ld in two:
            ld.next_batch(), ld.next_batch()
    state = json.loads(json.dumps(two[0].state_dict()))
    assert state == two[1].state_dict()  # one saved state serves every rank
    one = PackedBatches(_stream(501), 2, 10, 3, 0, 1, 4)
    one.load_state_dict(state)
    assert [[int(v) for _ in range(4) for v in one.next_batch()[0][:, 0]] for _ in range(7)] == ref[5:]
    with pytest.raises(CrosschipError, match="global_batch"):
        PackedBatches(_stream(501), 2, 10, 3, 0, 1, 2).load_state_dict(state)
    with pytest.raises(CrosschipError):
        PackedBatches(_stream(1001), batch_size=3, seq_len=10, seed=0, rank=3, world_size=3)


def test_short_stream_errors() -> None:
    with pytest.raises(CrosschipError, match="seq-len"):
        PackedBatches(_stream(10), batch_size=1, seq_len=10, seed=0)
    with pytest.raises(CrosschipError, match="seq-len"):
        list(eval_batches(_stream(5), batch_size=1, seq_len=8, max_batches=None))


def test_eval_batches_fixed_order() -> None:
    batches = list(eval_batches(_stream(101), batch_size=4, seq_len=10, max_batches=None))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]
    starts = [int(v) for x, _ in batches for v in x[:, 0]]
    assert starts == list(range(0, 100, 10))
    assert all(torch.equal(y, x + 1) for x, y in batches)
    again = list(eval_batches(_stream(101), batch_size=4, seq_len=10, max_batches=2))
    assert len(again) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(again, batches[:2], strict=False))
