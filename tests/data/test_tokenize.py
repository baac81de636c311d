"""`crosschip data tokenize` and the token dataset `train --data` reads: real datatrove runs on tiny corpora.

Every dataset here is written by the real DocumentTokenizer on the local executor (and once on a local Ray); the
expected ids come from the tokenizer itself, `tokenizer(text)` + EOS per document.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crosschip.checkpoint import open_checkpoint
from crosschip.data.dataset import SPLITS, index_path, is_val_document, open_dataset, token_dtype
from crosschip.data.executors import ExecutorConfig
from crosschip.data.tokenize import cached_dataset, tokenize_corpus
from crosschip.data.tokenizer import load_tokenizer, save_tokenizer, tokenizer_fingerprint, train_tokenizer
from crosschip.errors import CrosschipError
from crosschip.train.config import TrainConfig
from crosschip.train.loop import Trainer, train
from crosschip.train.report import NullReporter

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "tensor", "device", "checkpoint",
         "serve", "convert", "verify"]
CHAT_DOC = "<|user|>\nhi there<|eos|>\n<|assistant|>\nthe fox<|eos|>\n"  # literal special tokens in the text


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + "." for _ in range(n)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tok_dir(tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(tiny_tokenizer, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Any:
    return load_tokenizer(tok_dir)


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    docs = sentences(80, seed=3)
    docs[5] = CHAT_DOC
    return write_jsonl(tmp_path / "in" / "corpus.jsonl", docs), docs


def documents(root: Path, split: str) -> list[list[int]]:
    """The packed documents of a split, cut at the ends its .ds.index files record, in stream order."""
    ds = open_dataset(root)
    out: list[list[int]] = []
    for rel in ds.meta["splits"][split]["files"]:
        tokens = np.fromfile(root / rel, dtype=ds.dtype).tolist()
        ends = np.fromfile(index_path(root / rel), dtype="<u8").tolist()
        out.extend(tokens[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True))
    return out


# ---------------------------------------------------------------- packing, split, determinism


def test_every_document_is_bos_ids_eos_split_by_a_seeded_hash_of_its_id(tok: Any, corpus: Any,
                                                                        tmp_path: Path) -> None:
    path, docs = corpus
    manifest = tokenize_corpus(path, tmp_path / "ds", tok, val_fraction=0.2, seed=0)
    ds = open_dataset(tmp_path / "ds", verify=True)
    assert ds.dtype == np.uint16 == token_dtype(len(tok)) and manifest["dtype"] == "uint16"
    expected: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
    for line, doc in enumerate(docs):  # datatrove's id of a JSONL record without an "id": file/line
        split = "val" if is_val_document(f"corpus.jsonl/{line}", 0, 0.2) else "train"
        # tokenizer(text) starts with BOS (crosschip's tokenizer adds it), so BOS + ids + EOS is this:
        expected[split].append(tok(doc)["input_ids"] + [tok.eos_token_id])
    assert expected["train"] and expected["val"]
    for split, stream in (("train", ds.train), ("val", ds.val)):
        assert documents(ds.root, split) == expected[split]
        assert np.asarray(stream).tolist() == [t for doc in expected[split] for t in doc]
        assert manifest["splits"][split]["documents"] == len(expected[split])
        assert manifest["splits"][split]["tokens"] == len(stream)
    chat = tok(CHAT_DOC)["input_ids"] + [tok.eos_token_id]
    assert chat.count(tok.eos_token_id) == 3 and tok.convert_tokens_to_ids("<|user|>") in chat  # one id each
    assert chat[0] == tok.bos_token_id and chat.count(tok.bos_token_id) == 1
    assert manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(tok) == tokenizer_fingerprint(ds.tokenizer_dir)
    assert manifest["bos_token_id"] == tok.bos_token_id and manifest["vocab_size"] == len(tok)


def test_the_split_is_deterministic_by_seed(tok: Any, corpus: Any, tmp_path: Path) -> None:
    path, _ = corpus
    a = tokenize_corpus(path, tmp_path / "a", tok, val_fraction=0.3, seed=0)
    b = tokenize_corpus(path, tmp_path / "b", tok, val_fraction=0.3, seed=0)
    tokenize_corpus(path, tmp_path / "c", tok, val_fraction=0.3, seed=1)
    assert a["files"] == b["files"]  # every file, byte for byte (sizes and sha256s)
    assert (tmp_path / "a" / "train" / "00000.ds").read_bytes() == (tmp_path / "b" / "train" / "00000.ds").read_bytes()
    assert documents(tmp_path / "a", "val") != documents(tmp_path / "c", "val")
    assert sorted(documents(tmp_path / "a", "train") + documents(tmp_path / "a", "val")) == sorted(
        documents(tmp_path / "c", "train") + documents(tmp_path / "c", "val"))  # the same documents, split apart


@pytest.fixture()
def four_files(tmp_path: Path) -> Path:
    root = tmp_path / "four"
    for i in range(4):
        write_jsonl(root / f"part{i}.jsonl", sentences(12, seed=10 + i))
    return root


def test_two_tasks_hold_the_same_documents_each_task_its_files_in_order(tok: Any, four_files: Path,
                                                                        tmp_path: Path) -> None:
    """Task r reads files r, r + 2, ...; a document's split is its own; a split's stream is its files in task order."""
    one = tokenize_corpus(four_files, tmp_path / "one", tok, val_fraction=0.25, seed=0)
    two = tokenize_corpus(four_files, tmp_path / "two", tok, val_fraction=0.25, seed=0,
                          executor=ExecutorConfig(kind="local", tasks=2, workers=2))
    assert two["tasks"] == 2 and two["splits"]["train"]["files"] == ["train/00000.ds", "train/00001.ds"]
    for split in SPLITS:
        by_file = {}  # file -> its documents of this split, as one task alone writes them
        for i in range(4):
            docs = [tok(d)["input_ids"] + [tok.eos_token_id] for d in sentences(12, seed=10 + i)]
            by_file[i] = [d for line, d in enumerate(docs)
                          if (split == "val") == is_val_document(f"part{i}.jsonl/{line}", 0, 0.25)]
        assert documents(tmp_path / "one", split) == [d for i in (0, 1, 2, 3) for d in by_file[i]]
        assert documents(tmp_path / "two", split) == [d for i in (0, 2, 1, 3) for d in by_file[i]]
        assert one["splits"][split]["tokens"] == two["splits"][split]["tokens"]


@pytest.mark.slow
def test_ray_writes_the_same_bytes_as_local(tok: Any, four_files: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    local = tokenize_corpus(four_files, tmp_path / "local", tok, executor=ExecutorConfig("local", tasks=2, workers=2))
    ray = tokenize_corpus(four_files, tmp_path / "ray", tok, executor=ExecutorConfig("ray", tasks=2, workers=2))
    assert ray["files"] == local["files"]


# ---------------------------------------------------------------- the manifest and its checks


def test_manifest_records_every_file_and_tampering_is_caught(tok: Any, corpus: Any, tmp_path: Path) -> None:
    path, _ = corpus
    root = tmp_path / "ds"
    manifest = tokenize_corpus(path, root, tok, val_fraction=0.2)
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == sorted(set(on_disk) - {"dataset.json"})
    assert "tokenizer/tokenizer.json" in manifest["files"] and "train/00000.ds.index" in manifest["files"]
    for rel, record in manifest["files"].items():
        assert record == {"bytes": (root / rel).stat().st_size, "sha256": sha256(root / rel)}
    assert manifest["source"]["data_fingerprint"] and manifest["curation"] is None
    assert open_dataset(root).manifest_sha256 == sha256(root / "dataset.json")

    def damaged(name: str, edit: Any) -> Path:
        copy = tmp_path / name
        shutil.copytree(root, copy)
        edit(copy)
        return copy

    def flip(copy: Path) -> None:
        data = bytearray((copy / "train/00000.ds").read_bytes())
        data[3] ^= 0x01
        (copy / "train/00000.ds").write_bytes(bytes(data))

    def edit_manifest(change: Any) -> Any:
        def edit(copy: Path) -> None:
            meta = json.loads((copy / "dataset.json").read_text())
            change(meta)
            (copy / "dataset.json").write_text(json.dumps(meta))
        return edit

    flipped = damaged("flipped", flip)
    open_dataset(flipped)  # same sizes: only the sha256 check sees it
    with pytest.raises(CrosschipError, match="sha256"):
        open_dataset(flipped, verify=True)
    with pytest.raises(CrosschipError, match="bytes"):
        open_dataset(damaged("short", lambda c: os.truncate(c / "val/00000.ds", 2)))
    with pytest.raises(CrosschipError, match="missing"):
        open_dataset(damaged("no-index", lambda c: (c / "train/00000.ds.index").unlink()))
    for name, rel in (("dotdot", "../in/corpus.jsonl"), ("absolute", str(path)), ("sneaky", "train/../../x.ds")):
        escape = damaged(name, edit_manifest(lambda m, rel=rel: m["splits"]["train"]["files"].append(rel)))
        with pytest.raises(CrosschipError, match="not inside"):
            open_dataset(escape)
        escape = damaged(name + "-files", edit_manifest(lambda m, rel=rel: m["files"].update({rel: {"bytes": 1}})))
        with pytest.raises(CrosschipError, match="not inside"):
            open_dataset(escape)
    with pytest.raises(CrosschipError, match="not a crosschip token dataset"):
        open_dataset(damaged("format", edit_manifest(lambda m: m.update(format="something-else"))))
    with pytest.raises(CrosschipError, match="manifest says"):
        open_dataset(damaged("counts", edit_manifest(lambda m: m["splits"]["val"].update(documents=99))))


def test_a_crash_leaves_no_output_and_no_temporaries(tok: Any, corpus: Any, tmp_path: Path) -> None:
    path, _ = corpus

    def interrupt(line: str) -> None:
        if line.startswith("hashing"):  # the token files are written: the dataset is almost complete
            raise KeyboardInterrupt

    (tmp_path / "outs").mkdir()
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(path, tmp_path / "outs" / "ds", tok, log=interrupt)
    assert list((tmp_path / "outs").iterdir()) == []


# ---------------------------------------------------------------- small and odd corpora


def test_tiny_corpora(tok: Any, tmp_path: Path) -> None:
    two = write_jsonl(tmp_path / "two" / "two.jsonl", ["the dog", "the fox"])
    manifest = tokenize_corpus(two, tmp_path / "ds", tok, val_fraction=0.01)  # the hash sends both to train
    assert manifest["splits"]["train"]["documents"] == manifest["splits"]["val"]["documents"] == 1
    assert documents(tmp_path / "ds", "val") == [tok("the fox")["input_ids"] + [tok.eos_token_id]]  # the last one
    open_dataset(tmp_path / "ds", verify=True)
    with pytest.raises(CrosschipError, match="at least 2"):
        tokenize_corpus(write_jsonl(tmp_path / "one" / "one.jsonl", ["lonely"]), tmp_path / "o1", tok)
    with pytest.raises(CrosschipError, match="no non-empty documents"):
        tokenize_corpus(write_jsonl(tmp_path / "none" / "none.jsonl", ["", ""]), tmp_path / "o2", tok)
    with pytest.raises(CrosschipError, match="val-fraction"):
        tokenize_corpus(two, tmp_path / "o3", tok, val_fraction=0.0)
    with pytest.raises(CrosschipError, match="slurm"):
        tokenize_corpus(two, tmp_path / "o4", tok, executor=ExecutorConfig("slurm", slurm_partition="p"))
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_a_split_field_in_a_record_forces_its_split(tok: Any, tmp_path: Path) -> None:
    records = [{"text": t} for t in sentences(30, seed=6)]
    records[3]["split"], records[17]["split"], records[20]["split"] = "val", "val", "test"  # "test": not a split
    path = tmp_path / "in" / "c.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tokenize_corpus(path, tmp_path / "ds", tok, val_fraction=0.001)  # the hash sends none of 30 to val
    assert documents(tmp_path / "ds", "val") == [tok(records[i]["text"])["input_ids"] + [tok.eos_token_id]
                                                 for i in (3, 17)]


def test_single_txt_file_is_split_into_documents_on_blank_lines(tok: Any, tmp_path: Path) -> None:
    paragraphs = sentences(12, seed=5)
    text = "\n\n".join(p.replace(" the ", "\nthe ", 1) for p in paragraphs) + "\n"
    single = tmp_path / "in" / "input.txt"
    single.parent.mkdir()
    single.write_text(text, encoding="utf-8")
    manifest = tokenize_corpus(single, tmp_path / "ds", tok, val_fraction=0.3)
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 12 and splits["val"]["documents"] > 0
    assert manifest["source"]["split_rule"] == "txt-paragraphs"
    everything = documents(tmp_path / "ds", "train") + documents(tmp_path / "ds", "val")
    assert sorted(everything) == sorted(tok(p.replace(" the ", "\nthe ", 1))["input_ids"] + [tok.eos_token_id]
                                        for p in paragraphs)
    (tmp_path / "dir").mkdir()  # the same bytes in a directory: one document
    (tmp_path / "dir" / "input.txt").write_text(text, encoding="utf-8")
    with pytest.raises(CrosschipError, match="at least 2"):
        tokenize_corpus(tmp_path / "dir", tmp_path / "ds2", tok)


def test_single_unbroken_txt_is_split_by_position_like_nanogpt(tok: Any, tmp_path: Path) -> None:
    lines = sentences(40, seed=7)
    single = tmp_path / "in" / "input.txt"
    single.parent.mkdir()
    single.write_text("\n".join(lines) + "\n", encoding="utf-8")  # no blank line: one document
    manifest = tokenize_corpus(single, tmp_path / "ds", tok, val_fraction=0.1)
    splits = manifest["splits"]
    assert splits["train"]["documents"] == splits["val"]["documents"] == 1
    assert 0.05 < splits["val"]["tokens"] / (splits["train"]["tokens"] + splits["val"]["tokens"]) < 0.2
    ds = open_dataset(tmp_path / "ds")
    train_text = tok.decode(np.asarray(ds.train)[1:-1].tolist())
    val_text = tok.decode(np.asarray(ds.val)[1:-1].tolist())
    assert train_text + val_text == single.read_text(encoding="utf-8").strip("\n")  # in order, nothing lost
    assert train_text.endswith("\n") and val_text.startswith(lines[-len(val_text.splitlines())])


# ---------------------------------------------------------------- a `data curate` output as input


def write_curated(root: Path, complete: bool = True) -> Path:
    """What `data curate` leaves: curate.json, report.json, the kept shards under data/ (and removed ones beside)."""
    (root / "data").mkdir(parents=True)
    (root / "removed").mkdir()
    kept = [{"text": t, "id": f"src.jsonl/{i}", "metadata": {"lang": "en"}} for i, t in enumerate(sentences(20, 4))]
    with gzip.open(root / "data" / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    with gzip.open(root / "removed" / "00000.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "spam spam spam", "id": "x"}) + "\n")
    config = {"filters": ["gopher_quality", "c4"], "dedup": {"minhash": {"threshold": 0.8}}, "pii": True}
    curate = {"format": "crosschip-curate", "version": 1, "complete": complete, "data_dir": "data", "config": config}
    (root / "curate.json").write_text(json.dumps(curate))
    (root / "report.json").write_text(json.dumps({"kept": 20, "removed": 1}))
    return root


def test_a_curated_input_is_read_from_its_data_dir_and_recorded(tok: Any, tmp_path: Path) -> None:
    curated = write_curated(tmp_path / "curated")
    before = {p: p.read_bytes() for p in curated.rglob("*") if p.is_file()}
    manifest = tokenize_corpus(curated, tmp_path / "ds", tok, val_fraction=0.2)
    assert manifest["curation"] == {
        "report_sha256": sha256(curated / "report.json"), "config": json.loads((curated / "curate.json").read_text())[
            "config"], "path": str(curated.resolve()), "manifest_sha256": sha256(curated / "curate.json")}
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 20  # not removed/
    for line, text in enumerate(sentences(20, 4)):  # the record's own "id" decides its split
        split = "val" if is_val_document(f"src.jsonl/{line}", 0, 0.2) else "train"
        assert tok(text)["input_ids"] + [tok.eos_token_id] in documents(tmp_path / "ds", split)
    assert {p: p.read_bytes() for p in curated.rglob("*") if p.is_file()} == before
    with pytest.raises(CrosschipError, match="finish it: run the same data curate command again"):
        tokenize_corpus(write_curated(tmp_path / "unfinished", complete=False), tmp_path / "ds2", tok)
    with pytest.raises(CrosschipError, match="inside"):
        tokenize_corpus(curated, curated / "tokens", tok)


# ---------------------------------------------------------------- train --data


def tiny_cfg(data: Path, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(data=data, model="tiny", out=out, device="cpu", precision="fp32", steps=3,
                                batch_size=2, seq_len=16, warmup_steps=1, eval_every=3, save_every=3, eval_batches=1,
                                log_every=1, threads=1, val_fraction=0.2)
    base.update(kw)
    return TrainConfig(**base)


def test_train_on_a_curated_dataset_records_it_in_the_checkpoint(tok: Any, tmp_path: Path) -> None:
    curated = write_curated(tmp_path / "curated")
    manifest = tokenize_corpus(curated, tmp_path / "ds", tok, val_fraction=0.2)
    result = train(tiny_cfg(tmp_path / "ds", tmp_path / "run"), NullReporter())
    prov = open_checkpoint(result.checkpoint).manifest["provenance"]
    dataset = prov["dataset"]
    assert dataset["manifest_sha256"] == sha256(tmp_path / "ds" / "dataset.json")
    assert dataset["path"] == str((tmp_path / "ds").resolve())
    assert dataset["curation"] == {"report_sha256": sha256(curated / "report.json"),
                                   "config": manifest["curation"]["config"]}
    assert dataset["splits"] == {s: {k: manifest["splits"][s][k] for k in ("documents", "tokens")} for s in SPLITS}
    assert prov["tokenizer_fingerprint"] == dataset["tokenizer_fingerprint"] == manifest["tokenizer_fingerprint"]
    assert prov["data_fingerprint"] == manifest["source"]["data_fingerprint"]
    assert tokenizer_fingerprint(result.checkpoint) == manifest["tokenizer_fingerprint"]  # the dataset's tokenizer
    # The curate output itself as --data: tokenized into the cache, with the same curation record.
    raw = Trainer(tiny_cfg(curated, tmp_path / "run2", cache_dir=tmp_path / "cache", vocab_size=300), NullReporter())
    assert raw.provenance()["dataset"]["curation"] == dataset["curation"]
    assert raw.inputs.dataset.meta["splits"]["train"]["documents"] + raw.inputs.dataset.meta["splits"]["val"][
        "documents"] == 20  # its kept shards only


def test_raw_text_goes_through_the_same_tokenization_as_data_tokenize(tok_dir: Path, tok: Any,
                                                                      tiny_corpus: Path, tmp_path: Path) -> None:
    manifest = tokenize_corpus(tiny_corpus, tmp_path / "ds", tok, val_fraction=0.2)
    trainer = Trainer(tiny_cfg(tiny_corpus, tmp_path / "run", tokenizer=tok_dir, cache_dir=tmp_path / "cache"),
                      NullReporter())
    cached = trainer.inputs.dataset
    assert cached.root.parent == tmp_path / "cache"
    token_files = {k: v for k, v in manifest["files"].items() if not k.startswith("tokenizer/")}
    assert {k: v for k, v in cached.meta["files"].items() if k in token_files} == token_files  # identical bytes
    assert trainer.provenance()["dataset"]["manifest_sha256"] == cached.manifest_sha256


def test_train_refuses_a_dataset_of_another_tokenizer(tok: Any, corpus: Any, tmp_path: Path) -> None:
    path, _ = corpus
    tokenize_corpus(path, tmp_path / "ds", tok)
    train_tokenizer(sentences(200, seed=9), 300, tmp_path / "other")
    with pytest.raises(CrosschipError, match="another tokenizer"):
        Trainer(tiny_cfg(tmp_path / "ds", tmp_path / "run", tokenizer=tmp_path / "other"), NullReporter())
    assert not (tmp_path / "run").exists()


def test_the_dataset_cache_is_reused_and_rebuilt_when_damaged(tok: Any, corpus: Any, tmp_path: Path) -> None:
    path, docs = corpus
    first = cached_dataset(path, tok, tmp_path / "cache")
    stamp = {p: p.stat().st_mtime_ns for p in first.root.rglob("*")}
    second = cached_dataset(path, tok, tmp_path / "cache")
    assert second.root == first.root and {p: p.stat().st_mtime_ns for p in second.root.rglob("*")} == stamp
    reference = np.asarray(first.train).copy()
    os.truncate(first.root / "train" / "00000.ds", 10)
    third = cached_dataset(path, tok, tmp_path / "cache")
    assert third.root == first.root and np.array_equal(np.asarray(third.train), reference)
    write_jsonl(path, docs[:-1])
    assert cached_dataset(path, tok, tmp_path / "cache").root != first.root  # the key follows the content


# ---------------------------------------------------------------- the command line


def run_cli(args: list[str], scratch: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "40"}
    return subprocess.run([sys.executable, "-m", "crosschip.cli", "data", "tokenize", *args], capture_output=True,
                          text=True, env=env, timeout=180, stdin=subprocess.DEVNULL, check=False, cwd=scratch)


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_bad_input_is_one_line_error_and_changes_nothing(tok_dir: Path, tmp_path: Path, monkeypatch: Any,
                                                         capsys: Any) -> None:
    """The command's own runner (`crosschip.cli.main`), in this process: exit 2, one `error: ... (fix: ...)` line."""
    from crosschip.cli import main

    def case(name: str) -> Path:
        (tmp_path / name).mkdir()
        return tmp_path / name

    tok = ["--tokenizer", str(tok_dir)]
    cases: dict[str, tuple[list[str], str]] = {}
    d = case("empty")
    (d / "in").mkdir()
    cases[d.name] = (["in", "out", *tok], "is empty")
    d = case("no-text-key")
    (d / "in.jsonl").write_text('{"body": "a document"}\n')
    cases[d.name] = (["in.jsonl", "out", *tok], '"text"')
    d = case("not-utf8")
    (d / "in").mkdir()
    (d / "in" / "a.txt").write_bytes("café".encode("latin-1"))
    (d / "in" / "b.txt").write_text("fine")
    cases[d.name] = (["in", "out", *tok], "not valid UTF-8")
    d = case("in-is-out")
    write_jsonl(d / "in" / "a.jsonl", sentences(4))
    cases[d.name] = (["in", "in", *tok, "--overwrite"], "inside")
    d = case("existing-out")
    write_jsonl(d / "in" / "a.jsonl", sentences(4))
    (d / "out").mkdir()
    (d / "out" / "keep.txt").write_text("mine")
    cases[d.name] = (["in", "out", *tok], "already exists")
    d = case("no-tokenizer")
    write_jsonl(d / "in" / "a.jsonl", sentences(4))
    cases[d.name] = (["in", "out"], "exactly one of --tokenizer")
    d = case("slurm")
    write_jsonl(d / "in" / "a.jsonl", sentences(4))
    cases[d.name] = (["in", "out", *tok, "--executor", "slurm", "--tasks", "2"], "slurm")
    for name, (args, expect) in cases.items():
        before = snapshot(tmp_path / name)
        monkeypatch.chdir(tmp_path / name)
        monkeypatch.setattr(sys, "argv", ["crosschip", "data", "tokenize", *args])
        with pytest.raises(SystemExit) as exited:
            main()
        stderr = capsys.readouterr().err
        detail = f"{name}: crosschip data tokenize {' '.join(args)}\n{stderr}"
        lines = stderr.strip().splitlines()
        assert exited.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), detail
        assert expect in lines[0] and "(fix: " in lines[0], detail
        assert snapshot(tmp_path / name) == before, detail


def test_cli_trains_a_tokenizer_and_prints_the_manifest_summary(tiny_corpus: Path, tmp_path: Path) -> None:
    run = run_cli([str(tiny_corpus), "ds", "--train-tokenizer", "--vocab-size", "300", "--val-fraction", "0.2",
                   "--json"], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout)
    ds = open_dataset(tmp_path / "ds", verify=True)
    assert summary["manifest_sha256"] == ds.manifest_sha256 and summary["path"] == str(ds.root)
    assert summary["splits"]["train"]["tokens"] == len(ds.train) and summary["vocab_size"] == len(
        load_tokenizer(ds.tokenizer_dir)) <= 300
    assert "tokenize: 1 task on local" in run.stderr
