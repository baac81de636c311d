"""Corpus files as datatrove readers: one validated way in for `data curate`, `data tokenize` and `train --data`.

The files are found and checked by `corpus.list_data_files` / `corpus.iter_file_documents` (UTF-8, JSON, the text
field, parquet magic) before any pipeline starts, so bad input fails with one line instead of datatrove's
skip-and-warn. The readers then get the exact file list through a ``paths_file`` (sorted; task ``r`` of ``n``
reads files ``r, r + n, ...``), so what is read never depends on a glob or on the executor.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import JsonlReader, ParquetReader
from datatrove.pipeline.readers.base import BaseDiskReader

from crosschip.data.corpus import _suffix, is_single_text, iter_file_documents, list_data_files, split_paragraphs
from crosschip.errors import CrosschipError
from crosschip.fsio import atomic_write_bytes

SPLIT_KEY = "split"  # metadata a reader may set to force a document into "train" or "val"


@dataclass(frozen=True)
class Source:
    """Validated input: its files (sorted), the folder they are relative to, and how .txt is cut."""

    path: Path
    root: Path
    files: tuple[Path, ...]
    text_key: str
    documents: int
    single_text: bool  # one .txt file: blank lines separate its documents

    def relative(self, kind: str) -> list[str]:
        return [f.relative_to(self.root).as_posix() for f in self.files if _reader_kind(f) == kind]


def _reader_kind(path: Path) -> str:
    kind = _suffix(path)
    return "jsonl" if kind in (".jsonl", ".jsonl.gz") else kind.lstrip(".")


def open_source(path: Path, text_key: str = "text") -> Source:
    """List and fully validate the corpus at `path` (every file is read once); raise CrosschipError on bad input."""
    path = Path(path).resolve()
    files = list_data_files(path)
    single = is_single_text(path)
    documents = sum(1 for _ in iter_file_documents(files, paragraphs=single, text_key=text_key))
    if documents == 0:
        raise CrosschipError(f"{path} holds no non-empty documents", "pass data that contains text")
    root = path.parent if path.is_file() else path
    return Source(path, root, tuple(files), text_key, documents, single)


class TxtReader(BaseDiskReader):
    """A .txt file is one document; in `paragraphs` mode its blank-line separated blocks are the documents.

    With `position_split` set and a single unbroken text, the text is cut nanoGPT-style: the first
    (1 - position_split) goes to training and the rest to validation (metadata ``split``).
    """

    name = "📄 Txt"

    def __init__(self, data_folder: str, paths_file: str, paragraphs: bool, position_split: float | None) -> None:
        super().__init__(data_folder, paths_file=paths_file, add_file_path=False)
        self.paragraphs = paragraphs
        self.position_split = position_split

    def read_file(self, filepath: str) -> Iterator[Document]:
        from crosschip.data.corpus import split_by_position

        with self.data_folder.open(filepath, "rb") as f:
            text = f.read().decode("utf-8")
        docs = split_paragraphs(text) if self.paragraphs else [text] if text.strip() else []
        if self.position_split is not None and len(docs) == 1 and len(docs[0]) >= 2:
            parts = split_by_position(docs[0], self.position_split)
            for i, (part, split) in enumerate(zip(parts, ("train", "val"), strict=True)):
                yield Document(text=part, id=f"{filepath}/{i}", metadata={SPLIT_KEY: split})
            return
        for i, doc in enumerate(docs):
            yield Document(text=doc, id=f"{filepath}/{i}")


def build_readers(source: Source, work: Path, position_split: float | None = None) -> list[PipelineStep]:
    """datatrove readers for `source`, one per file kind, chained (each passes on what the previous read).

    `work` receives the paths files; `position_split` is the validation fraction for a single unbroken text.
    """
    readers: list[PipelineStep] = []
    work.mkdir(parents=True, exist_ok=True)
    for kind in ("jsonl", "parquet", "txt"):
        names = source.relative(kind)
        if not names:
            continue
        paths_file = work / f"inputs-{kind}.txt"
        atomic_write_bytes(paths_file, "".join(n + "\n" for n in names).encode("utf-8"))
        folder, listed = str(source.root), str(paths_file)
        if kind == "jsonl":
            readers.append(JsonlReader(folder, paths_file=listed, text_key=source.text_key, add_file_path=False))
        elif kind == "parquet":
            readers.append(ParquetReader(folder, paths_file=listed, text_key=source.text_key, add_file_path=False))
        else:
            readers.append(TxtReader(folder, listed, paragraphs=source.single_text, position_split=position_split))
    return readers


def same_or_nested(a: Path, b: Path) -> bool:
    """True when one of the two paths is, or lies inside, the other (an output that would overwrite its input)."""
    ra, rb = os.path.realpath(a), os.path.realpath(b)
    return ra == rb or ra.startswith(rb + os.sep) or rb.startswith(ra + os.sep)
