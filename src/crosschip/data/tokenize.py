"""Tokenize a corpus into a token dataset (`crosschip.data.dataset`) with datatrove's DocumentTokenizer.

The one tokenization path: `crosschip data tokenize IN OUT` runs it on the local or Ray executor, and
`crosschip train --data RAW` runs it locally (one task) into a content-addressed cache entry (`cached_dataset`).

* Input: raw files or directories (`sources.open_source`: validated before any stage starts), or the output of
  `data curate` (recognised by its ``curate.json``): its kept shards are read and its report is recorded.
* Packing: the tokenizer file DocumentTokenizer loads carries a BOS + $A + EOS template, so every document is
  exactly ``tokenizer(text)`` + EOS (crosschip's tokenizer adds BOS itself). Literal special-token strings inside
  a document (e.g. "<|eos|>") are encoded as those special tokens, exactly as ``tokenizer(text)`` does at inference,
  so chat-formatted corpora round-trip.
* Split, by document: metadata ``split`` ("train"/"val", set by the reader for one unbroken .txt, or a JSONL field)
  wins; otherwise a seeded hash of the document id (datatrove's ``file/line``, or the record's ``id``) sends
  ``val_fraction`` of the documents to validation. So a document's split depends neither on the task count nor
  on the executor. A tiny corpus whose split came out one-sided gets the last document moved across.
* Order: task r reads input files r, r + tasks, ...; each task writes ``train/<r>.ds`` and ``val/<r>.ds`` in its
  documents' order, and a split's stream is its files in task order. With one task that is the corpus order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.tokens.tokenizer import DocumentTokenizer, TokenizedFile
from datatrove.utils.batching import batched

from crosschip.data.corpus import data_fingerprint, is_single_text, iter_file_documents, list_data_files
from crosschip.data.dataset import (
    FORMAT,
    MANIFEST,
    SPLITS,
    TOKENIZER_DIR,
    VERSION,
    TokenDataset,
    index_path,
    is_dataset,
    is_val_document,
    member,
    open_dataset,
    token_dtype,
)
from crosschip.data.executors import ExecutorConfig, cluster, quiet_stderr, run_stage
from crosschip.data.sources import SPLIT_KEY, Source, build_readers, open_source, same_or_nested
from crosschip.data.tokenizer import load_tokenizer, save_tokenizer, tokenizer_fingerprint, train_tokenizer
from crosschip.errors import CrosschipError
from crosschip.fsio import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    check_output_dir,
    file_records,
    scratch_dir,
    sha256_file,
)

CURATE_MANIFEST = "curate.json"
CURATE_FORMAT = "crosschip-curate"
CURATE_REPORT = "report.json"
_TOKENIZE_BATCH = 1000  # documents per encode_batch call: bounds memory whatever the corpus size
Log = Callable[[str], None]


@dataclass(frozen=True)
class InputSpec:
    """What to read for IN: the files' location and text key, and the curation record when IN came from curate."""

    data: Path
    text_key: str
    curation: dict[str, Any] | None


@dataclass(frozen=True)
class TrainTokenizer:
    """Ask `tokenize_corpus` to train a byte-level BPE tokenizer of this vocabulary on the input first."""

    vocab_size: int


def locate_input(inp: Path, text_key: str = "text") -> InputSpec:
    """IN as given, or, for a `data curate` output (its curate.json), its kept shards (text key "text")."""
    inp = Path(inp)
    marker = inp / CURATE_MANIFEST
    if not marker.is_file():
        return InputSpec(inp, text_key, None)
    try:
        curate = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CrosschipError(f"cannot read {marker}: {e}", "run the data curate command again") from e
    if not isinstance(curate, dict) or curate.get("format") != CURATE_FORMAT:
        raise CrosschipError(f"{marker} is not a crosschip curate manifest", "pass the OUT of crosschip data curate")
    if curate.get("complete") is not True:
        raise CrosschipError(f"{inp} is an unfinished data curate output",
                             "finish it: run the same data curate command again")
    fix = "run the data curate command again (its curate.json was edited)"
    data = member(inp, curate.get("data_dir"), CURATE_MANIFEST, fix)
    report = inp / CURATE_REPORT
    if not report.is_file():
        raise CrosschipError(f"{inp} has no {CURATE_REPORT}", fix)
    config = curate.get("config")
    if not isinstance(config, dict):
        raise CrosschipError(f"{marker} has no curation config", fix)
    curation = {"report_sha256": sha256_file(report), "config": config, "path": str(inp.resolve()),
                "manifest_sha256": sha256_file(marker)}
    return InputSpec(data, "text", curation)


def training_documents(inp: Path) -> Iterator[str]:
    """The documents a tokenizer is trained on for IN (raw or curated), in order."""
    spec = locate_input(inp)
    files = list_data_files(spec.data)
    yield from iter_file_documents(files, paragraphs=is_single_text(spec.data), text_key=spec.text_key)


def split_of(doc: Any, seed: int, val_fraction: float) -> str:
    forced = doc.metadata.get(SPLIT_KEY)
    if forced in SPLITS:
        return str(forced)
    return "val" if is_val_document(doc.id, seed, val_fraction) else "train"


class SplitTokenizer(DocumentTokenizer):
    """datatrove's DocumentTokenizer, writing each task's documents in order to ``train/`` or ``val/`` by document.

    DocumentTokenizer.run writes one (shuffled) file per task; here the split is per document and the order stays
    the input's, so data order is set by the training loader alone. Files, index and tokenizer are datatrove's.
    """

    name = "✍️ Split tokenizer"

    def __init__(self, output_folder: str, tokenizer_file: str, val_fraction: float, seed: int) -> None:
        super().__init__(output_folder, tokenizer_file, save_final_metadata=False, batch_size=_TOKENIZE_BATCH,
                         shuffle_documents=False)
        self.val_fraction, self.split_seed = val_fraction, seed

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> None:
        files = {s: TokenizedFile(self.output_folder, f"{s}/{rank:05d}.ds", save_final_metadata=False,
                                  token_size=self.token_size) for s in SPLITS}
        for batch in batched(data, self.batch_size):
            with self.track_time(unit="batch"):
                encoded = self.tokenizer.encode_batch([doc.text for doc in batch])
                for doc, enc in zip(batch, encoded, strict=True):
                    split = split_of(doc, self.split_seed, self.val_fraction)
                    files[split].write(enc.ids, None)
                    self.stat_update(f"{split}_documents")
                    self.stat_update(f"{split}_tokens", value=len(enc.ids))
        for f in files.values():
            f.close()


def special_ids(tokenizer: Any) -> dict[str, tuple[str, int]]:
    """{"bos": (token, id), "eos": (token, id)}; both are needed to pack documents."""
    found = {}
    for name in ("bos", "eos"):
        token, token_id = getattr(tokenizer, f"{name}_token", None), getattr(tokenizer, f"{name}_token_id", None)
        if token is None or token_id is None:
            raise CrosschipError(f"tokenizer has no {name} token", f"use a tokenizer with a {name}_token set")
        found[name] = (str(token), int(token_id))
    return found


def write_packing_tokenizer(tokenizer: Any, path: Path) -> None:
    """The tokenizer.json DocumentTokenizer loads: BOS + ids + EOS per document, never truncated or padded.

    datatrove 0.10.1's DocumentTokenizer does not pass a `post_processor` on to its base class, so the template is
    set in the file; truncation or padding saved in a tokenizer.json would silently cut documents, so they go.
    """
    from tokenizers import Tokenizer, processors

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise CrosschipError(f"{type(tokenizer).__name__} is not a fast tokenizer", "use a tokenizers-backed one")
    packing = Tokenizer.from_str(backend.to_str())
    if packing.get_vocab_size() != len(tokenizer):  # datatrove sizes its token dtype by the file's vocabulary
        raise CrosschipError(f"tokenizer.json has {packing.get_vocab_size()} tokens, the tokenizer {len(tokenizer)}",
                             "save the tokenizer again with save_pretrained")
    packing.no_truncation()
    packing.no_padding()
    ids = special_ids(tokenizer)
    (bos, bos_id), (eos, eos_id) = ids["bos"], ids["eos"]
    packing.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0 {eos}:0", special_tokens=sorted({(bos, bos_id), (eos, eos_id)}))
    atomic_write_bytes(path, packing.to_str().encode("utf-8"))


def _move_last_document(src: Path, dst: Path, itemsize: int) -> None:
    """Move the last document of token file `src` (and its index entry) into the empty token file `dst`."""
    ends = np.fromfile(index_path(src), dtype="<u8")
    start = int(ends[-2]) if len(ends) > 1 else 0
    with open(src, "r+b") as f:
        f.seek(start * itemsize)
        doc = f.read()
        f.truncate(start * itemsize)
    index_path(src).write_bytes(ends[:-1].tobytes())
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(doc)
    index_path(dst).write_bytes(np.array([len(doc) // itemsize], dtype="<u8").tobytes())


def _documents(token_file: Path) -> int:
    return index_path(token_file).stat().st_size // 8 if index_path(token_file).exists() else 0


def finish_splits(root: Path, itemsize: int) -> dict[str, dict[str, Any]]:
    """Balance a one-sided split (tiny corpora), drop the empty files, count documents and tokens per split."""
    files = {s: sorted((root / s).glob("*.ds")) for s in SPLITS}
    docs = {s: sum(_documents(f) for f in files[s]) for s in SPLITS}
    if docs["train"] + docs["val"] < 2:
        raise CrosschipError("need at least 2 documents to split into train and validation",
                             "add documents (one per .txt file, JSONL line or parquet row; blank lines separate "
                             "them in one .txt)")
    for empty, full in (("val", "train"), ("train", "val")):
        if docs[empty] == 0:
            src = [f for f in files[full] if _documents(f)][-1]
            _move_last_document(src, root / empty / src.name, itemsize)
            files[empty] = sorted((root / empty).glob("*.ds"))
    splits = {}
    for s in SPLITS:
        kept = []
        for f in files[s]:
            if _documents(f) == 0:  # a task that read no document of this split
                f.unlink()
                index_path(f).unlink(missing_ok=True)
            else:
                kept.append(f)
        splits[s] = {"files": [f.relative_to(root).as_posix() for f in kept],
                     "documents": sum(_documents(f) for f in kept),
                     "tokens": sum(f.stat().st_size for f in kept) // itemsize}
    return splits


def _check_request(inp: Path, out: Path, val_fraction: float, executor: ExecutorConfig, overwrite: bool) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise CrosschipError(f"--val-fraction must be in (0, 1), got {val_fraction}", "pass e.g. --val-fraction 0.05")
    if executor.kind == "slurm":
        raise CrosschipError("data tokenize runs on the local or the ray executor, not slurm (the dataset is "
                             "published when the stage ends, which a submitted job does not wait for)",
                             "pass --executor ray --ray-address ADDRESS for a cluster, or --executor local")
    if same_or_nested(inp, out):
        raise CrosschipError(f"OUT {out} is IN {inp}, or inside it, or holds it",
                             "choose an OUT outside the input corpus")
    check_output_dir(out, overwrite)


def _open_input(spec: InputSpec) -> Source:
    source = open_source(spec.data, spec.text_key)
    position_split = source.single_text and source.documents == 1  # one unbroken text: cut by position
    if source.documents < 2 and not position_split:
        raise CrosschipError(f"{spec.data} holds only {source.documents} document; need at least 2 to split into train "
                             "and validation", "add documents (one per .txt file, JSONL line or parquet row; blank "
                             "lines separate them in one .txt)")
    return source


def _resolve_tokenizer(tokenizer: Any, source: Source, work: Path, log: Log) -> Any:
    if not isinstance(tokenizer, TrainTokenizer):
        return tokenizer
    log(f"training a {tokenizer.vocab_size}-token BPE tokenizer on {source.documents:,} documents")
    docs = iter_file_documents(list(source.files), paragraphs=source.single_text, text_key=source.text_key)
    return train_tokenizer(docs, tokenizer.vocab_size, work / "trained-tokenizer")


def tokenize_corpus(inp: Path, out: Path, tokenizer: Any, *, val_fraction: float = 0.05, seed: int = 0,
                    executor: ExecutorConfig | None = None, text_key: str = "text", overwrite: bool = False,
                    log: Log | None = None, quiet: bool = False) -> dict[str, Any]:
    """Tokenize IN into the dataset OUT (published atomically) and return its manifest.

    `tokenizer`: a loaded fast tokenizer, its directory, or `TrainTokenizer(vocab_size)`. `quiet` sends datatrove's
    own console logging to a file (training runs print their own progress). The input is never written to.
    """
    inp, out = Path(inp), Path(out)
    executor = executor or ExecutorConfig(kind="local", tasks=1, workers=1)
    say = log or (lambda _: None)
    _check_request(inp, out, val_fraction, executor, overwrite)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(Path(tokenizer))
    if not isinstance(tokenizer, TrainTokenizer):
        special_ids(tokenizer)  # a tokenizer that cannot pack fails before the corpus is read
    spec = locate_input(inp, text_key)
    source = _open_input(spec)
    say(f"input: {len(source.files)} file(s), {source.documents:,} documents in {spec.data}")
    with scratch_dir("tokenize", parent=out.parent) as work, atomic_dir(out, overwrite=overwrite) as tmp:
        tokenizer = _resolve_tokenizer(tokenizer, source, work, say)
        vocab_size = len(tokenizer)
        write_packing_tokenizer(tokenizer, work / "tokenizer.json")
        step = SplitTokenizer(str(tmp), str(work / "tokenizer.json"), val_fraction, seed)
        readers = build_readers(source, work / "inputs", val_fraction if source.single_text else None)
        quieted = quiet_stderr(work / "datatrove.log") if quiet else contextlib.nullcontext()
        with cluster(executor), quieted:
            run_stage(executor, "tokenize", [*readers, step], work / "logs", log=log)
        splits = finish_splits(tmp, token_dtype(vocab_size).itemsize)
        save_tokenizer(tokenizer, tmp / TOKENIZER_DIR)
        say("hashing the dataset files")
        ids = special_ids(tokenizer)
        manifest = {
            "format": FORMAT, "version": VERSION, "dtype": token_dtype(vocab_size).name, "vocab_size": vocab_size,
            "bos_token_id": ids["bos"][1], "eos_token_id": ids["eos"][1],
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "splits": splits,
            "files": file_records(tmp), "val_fraction": val_fraction, "seed": seed, "tasks": executor.tasks,
            "text_key": source.text_key,
            "source": {"path": str(source.path), "data_fingerprint": data_fingerprint(list(source.files)),
                       "files": len(source.files), "documents": source.documents,
                       "split_rule": "txt-paragraphs" if source.single_text else "documents"},
            "curation": spec.curation,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    say(f"wrote {out}: " + ", ".join(f"{s} {v['documents']:,} documents / {v['tokens']:,} tokens"
                                     for s, v in splits.items()))
    return manifest


def cache_key(data_fp: str, spec: InputSpec, single_text: bool, tok_fp: str, val_fraction: float, seed: int) -> str:
    """A cache entry's name: everything that shapes the dataset (content, not location)."""
    curation = spec.curation and {k: spec.curation[k] for k in ("report_sha256", "manifest_sha256")}
    fields = [FORMAT, VERSION, data_fp, spec.text_key, single_text, curation, tok_fp, float(val_fraction), int(seed)]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


def cached_dataset(data: Path, tokenizer: Any, cache_dir: Path, val_fraction: float = 0.05, seed: int = 0,
                   log: Log | None = None) -> TokenDataset:
    """Raw text (or a curate output) for `train --data`: tokenized once, locally, into cache_dir/<content key>.

    A complete entry is reused (sizes checked); a damaged one is rebuilt. Entries appear atomically.
    """
    spec = locate_input(Path(data))
    files = list_data_files(spec.data)
    key = cache_key(data_fingerprint(files), spec, is_single_text(spec.data), tokenizer_fingerprint(tokenizer),
                    val_fraction, seed)
    entry = Path(cache_dir) / key
    if is_dataset(entry):
        with contextlib.suppress(CrosschipError):
            return open_dataset(entry)
    if log is not None:
        log(f"data: tokenizing {data} into the cache ({entry})")
    tokenize_corpus(Path(data), entry, tokenizer, val_fraction=val_fraction, seed=seed, overwrite=True, quiet=True)
    return open_dataset(entry)
