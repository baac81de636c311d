"""The datatrove stages of one curation, in order. Each stage is (name, steps, tasks) over folders in a work dir.

  filter             readers -> [language ID] -> Gopher repetition -> Gopher quality -> C4 -> FineWeb -> [PII]
  exact-*            datatrove's exact dedup: signatures, find duplicates (1 task), filter
  minhash-*          datatrove's 4 MinHash stages: signatures, buckets (1 task per bucket), clusters (1 task), filter
Each filter gets an exclusion writer (work/removed/<step>/), so every removed document stays auditable, with
datatrove's ``filter_reason``. The last stage writes the kept documents to work/final/ (one shard per task).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import ParquetWriter

from crosschip.data.curate.config import CurateConfig, get_preset
from crosschip.data.curate.steps import (
    ClusterSizes,
    DecisionOnlyC4,
    LengthStats,
    LocalLanguageFilter,
    ReproducibleJsonlWriter,
    document_text,
)

FILTER_CLASSES = {
    "gopher_repetition": GopherRepetitionFilter,
    "gopher_quality": GopherQualityFilter,
    "c4_quality": C4QualityFilter,
    "fineweb_quality": FineWebQualityFilter,
}
MINHASH = MinhashConfig()  # datatrove's defaults: 5-grams, 14 buckets x 8 hashes (~0.75 Jaccard threshold)


@dataclass
class Stage:
    name: str
    steps: list[Any]
    tasks: int


def removed_writer(work: Path, step: str) -> ReproducibleJsonlWriter:
    return ReproducibleJsonlWriter(str(work / "removed" / step))


def _kept_reader(folder: Path) -> JsonlReader:
    return JsonlReader(str(folder), glob_pattern="*.jsonl.gz", add_file_path=False)


def filter_steps(cfg: CurateConfig, work: Path) -> list[PipelineStep]:
    """Language ID, the quality filters and PII redaction, each switchable; thresholds from the preset."""
    preset = get_preset(cfg.preset)
    steps: list[PipelineStep] = []
    if cfg.lid_model is not None:
        steps.append(LocalLanguageFilter(cfg.lid_model, list(cfg.languages), cfg.lid_threshold,
                                         exclusion_writer=removed_writer(work, "language")))
    for name in FILTER_CLASSES:
        if name in cfg.filters:
            kwargs = getattr(preset, name)
            cls = DecisionOnlyC4 if name == "c4_quality" and not preset.c4_edits_lines else FILTER_CLASSES[name]
            steps.append(cls(exclusion_writer=removed_writer(work, name), **kwargs))
    if cfg.pii:
        steps.append(PIIFormatter())
    return steps


def _final_writer(cfg: CurateConfig, folder: Path) -> PipelineStep:
    if cfg.output_format == "parquet":
        return ParquetWriter(str(folder), output_filename="${rank}.parquet")
    return ReproducibleJsonlWriter(str(folder))


def build_stages(cfg: CurateConfig, readers: list[PipelineStep], work: Path, tasks: int) -> list[Stage]:
    """All stages of a run; the last one writes work/final with length stats of what is kept."""
    exact = ExactDedupConfig(content_getter=document_text)
    kept = work / "filtered"
    stages = [Stage("filter", [*readers, LengthStats("in"), *filter_steps(cfg, work)], tasks)]
    if cfg.exact_dedup:
        stages += [
            Stage("exact-signatures", [_kept_reader(kept), ExactDedupSignature(str(work / "exact/sigs"), exact)],
                  tasks),
            Stage("exact-find", [ExactFindDedups(str(work / "exact/sigs"), str(work / "exact/dups"), exact)], 1),
            Stage("exact-filter", [_kept_reader(kept), ExactDedupFilter(str(work / "exact/dups"), exact,
                                                                       exclusion_writer=removed_writer(work, "exact"))],
                  tasks),
        ]
    if cfg.minhash:
        source = work / "exact-kept" if cfg.exact_dedup else kept
        stages += [
            Stage("minhash-signatures", [_kept_reader(source),
                                         MinhashDedupSignature(str(work / "minhash/sigs"), config=MINHASH)], tasks),
            Stage("minhash-buckets", [MinhashDedupBuckets(str(work / "minhash/sigs"), str(work / "minhash/buckets"),
                                                          config=MINHASH)], MINHASH.num_buckets),
            Stage("minhash-cluster", [MinhashDedupCluster(str(work / "minhash/buckets"), str(work / "minhash/ids"),
                                                          config=MINHASH, save_cluster_size=True)], 1),
            Stage("minhash-filter", [_kept_reader(source), MinhashDedupFilter(
                str(work / "minhash/ids"), exclusion_writer=removed_writer(work, "minhash"), load_cluster_sizes=True),
                ClusterSizes()], tasks),
        ]
    _route_outputs(stages, cfg, work)
    return stages


def _route_outputs(stages: list[Stage], cfg: CurateConfig, work: Path) -> None:
    """Give each document-producing stage its writer: intermediate folders, then work/final for the last."""
    producing = [s for s in stages if s.name in ("filter", "exact-filter", "minhash-filter")]
    folders = {"filter": work / "filtered", "exact-filter": work / "exact-kept", "minhash-filter": work / "final"}
    for stage in producing[:-1]:
        stage.steps.append(ReproducibleJsonlWriter(str(folders[stage.name])))
    producing[-1].steps += [LengthStats("out"), _final_writer(cfg, work / "final")]
