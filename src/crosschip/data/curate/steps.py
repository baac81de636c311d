"""The few pipeline steps crosschip adds to datatrove's: measurements for the report, reproducible output, local LID.

Everything that decides what is kept (filters, PII, dedup) is datatrove's own; these only count, write or load.
"""

from __future__ import annotations

import gzip
import math
from typing import IO, Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters import C4QualityFilter, LanguageFilter
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.lid import FastTextLID
from fsspec.compression import compr, register_compression

REPRODUCIBLE_GZIP = "gzip-reproducible"
CLUSTER_SIZE_KEY = "minhash_cluster_size"  # set by MinhashDedupFilter(load_cluster_sizes=True)


class _ClosingGzip(gzip.GzipFile):
    """gzip with a fixed header (mtime 0, no name), closing the file it wraps: same input -> same bytes."""

    def __init__(self, fileobj: IO[bytes], mode: str = "rb", **kwargs: Any) -> None:
        super().__init__(filename="", fileobj=fileobj, mode=mode, mtime=0, **kwargs)
        self._wrapped = fileobj

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._wrapped.close()


if REPRODUCIBLE_GZIP not in compr:  # registered on import: workers unpickling a writer below import this module
    register_compression(REPRODUCIBLE_GZIP, _ClosingGzip, extensions=[])


class ReproducibleJsonlWriter(JsonlWriter):
    """datatrove's JsonlWriter, gzipped without a timestamp, so a rerun (or another executor) writes identical bytes."""

    def __init__(self, output_folder: str, **kwargs: Any) -> None:
        super().__init__(output_folder, output_filename="${rank}.jsonl.gz", compression=REPRODUCIBLE_GZIP, **kwargs)


def length_bucket(chars: int) -> int:
    """Power-of-two bucket of a document length in characters: 0 for < 2, k for [2^k, 2^(k+1))."""
    return int(math.log2(chars)) if chars >= 2 else 0


class LengthStats(PipelineStep):
    """Counts documents per power-of-two length bucket (stat ``len_2^k``), merged across tasks by datatrove."""

    type = "📊 - STATS"

    def __init__(self, label: str) -> None:
        self.name = f"lengths {label}"  # before super().__init__(): datatrove names the step's stats from it
        super().__init__()

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            self.stat_update(f"len_2^{length_bucket(len(doc.text))}")
            self.stat_update("bytes", value=len(doc.text.encode("utf-8")))
            yield doc


class ClusterSizes(PipelineStep):
    """Counts kept MinHash representatives by the size of their duplicate cluster; drops the metadata key again."""

    type = "📊 - STATS"
    name = "cluster sizes"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            size = int(doc.metadata.pop(CLUSTER_SIZE_KEY, 1))
            if size > 1:
                self.stat_update(f"cluster_{size}")
            yield doc


class DecisionOnlyC4(C4QualityFilter):
    """C4's keep-or-drop rules without its edits: a kept document keeps its text exactly as it was.

    datatrove's C4QualityFilter rewrites every document it keeps (each line stripped, citations removed) even
    with every line rule off, which would flatten the indentation of code in technical documents.
    """

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        verdict = super().filter(doc)
        doc.text = text
        return verdict


class LocalFastTextLID(FastTextLID):
    """datatrove's fastText language ID over a model file given by path: never downloaded."""

    def __init__(self, model_path: str, languages: list[str] | None = None) -> None:
        super().__init__(languages)
        self.model_path = model_path

    @property
    def model(self) -> Any:
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(self.model_path)
        return self._model


class LocalLanguageFilter(LanguageFilter):
    """datatrove's LanguageFilter (metadata ``language``, ``language_score``) with a local fastText model."""

    def __init__(self, model_path: str, languages: list[str], language_threshold: float, **kwargs: Any) -> None:
        super().__init__(languages=languages, language_threshold=language_threshold, **kwargs)
        self.model = LocalFastTextLID(model_path, languages)


def document_text(doc: Document) -> str:
    """Exact dedup key: the text itself (datatrove reads the return annotation to pick the hash function)."""
    return doc.text


class DocProgress(PipelineStep):
    """Writes how many documents this task has passed to ``<folder>/<rank>`` every few hundred (the driver's bar)."""

    type = "📊 - STATS"
    name = "progress"
    EVERY = 256

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def _write(self, rank: int, count: int) -> None:
        import os

        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"{rank:05d}")
        with open(path + ".tmp", "w") as f:
            f.write(str(count))
        os.replace(path + ".tmp", path)  # the driver never reads a half-written count

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        count = 0
        for doc in data:
            count += 1
            if count % self.EVERY == 0:
                self._write(rank, count)
            yield doc
        self._write(rank, count)
