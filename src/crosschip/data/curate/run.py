"""`crosschip data curate IN OUT`: validate, run the datatrove stages (restartable), publish, report.

OUT layout:
  curate.json     the manifest: settings, their fingerprint, input, ``complete`` (written first, completed last)
  data/           the kept documents, one shard per task (jsonl.gz or parquet; field ``text``)
  removed/<step>/ every removed document with datatrove's ``filter_reason`` (to audit false positives)
  report.json, report.html
  .work/          datatrove's intermediate folders and per-stage logging dirs (completion markers, stats, logs)
A run killed at any point and started again with the same arguments skips the tasks that finished (datatrove's
completion markers) and ends with the same bytes as an uninterrupted run; other settings are refused there.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datatrove.pipeline.readers.base import BaseReader

from crosschip.data.corpus import data_fingerprint
from crosschip.data.curate.config import CurateConfig, get_preset
from crosschip.data.curate.pipeline import Stage, build_stages
from crosschip.data.curate.progress import stage_progress
from crosschip.data.curate.steps import DocProgress
from crosschip.data.executors import ExecutorConfig, StageResult, cluster, quiet_stderr, run_stage
from crosschip.data.sources import Source, build_readers, open_source, same_or_nested
from crosschip.errors import CrosschipError
from crosschip.fsio import atomic_write_json, file_records, fsync_dir, sha256_file

MANIFEST = "curate.json"
FORMAT = "crosschip-curate"
DATA_DIR = "data"
REMOVED_DIR = "removed"
WORK_DIR = ".work"
Log = Callable[[str], None]


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else None


def read_shards(folder: Path, key: str = "text") -> list[Any]:
    """One field of every document in a folder of jsonl.gz shards (kept or removed), in shard order."""
    values: list[Any] = []
    for shard in sorted(Path(folder).glob("*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            values += [json.loads(line)[key] for line in f]
    return values


def prepare_out(out: Path, fingerprint: str, overwrite: bool) -> bool:
    """Check OUT against this run (writes nothing unless --overwrite clears it); True when resuming."""
    if out.exists() and not out.is_dir():
        raise CrosschipError(f"OUT {out} exists and is not a directory", "choose another OUT")
    if not out.exists() or not any(out.iterdir()):
        return False
    manifest = _read_manifest(out)
    if overwrite:
        shutil.rmtree(out)
        return False
    if manifest is None:
        raise CrosschipError(f"OUT {out} already exists and is not a curation",
                             "pass --overwrite or choose another OUT")
    if manifest.get("fingerprint") != fingerprint:
        raise CrosschipError(f"OUT {out} holds a curation of other settings or input",
                             "pass --overwrite to replace it, or choose another OUT")
    if manifest.get("complete"):
        raise CrosschipError(f"OUT {out} already holds this curation, complete",
                             "use it as it is, pass --overwrite to redo it, or choose another OUT")
    return True


def _with_progress(stage: Stage, logging_dir: Path) -> list[Any]:
    """The stage's steps with a document counter after its readers (for the progress bar)."""
    steps = list(stage.steps)
    readers = [i for i, s in enumerate(steps) if isinstance(s, BaseReader)]
    if readers:
        steps.insert(readers[-1] + 1, DocProgress(str(logging_dir / "progress")))
    return steps


def kept_documents(stats: list[dict[str, Any]]) -> int | None:
    """Documents the stage's writer wrote (the last WRITER step's total)."""
    from crosschip.data.curate.report import count

    writers = [s for s in stats if "WRITER" in s.get("name", "")]
    return count(writers[-1]["stats"].get("total", 0)) if writers else None


def _submit_slurm(stages: list[Stage], work: Path, executor: ExecutorConfig, log: Log) -> None:
    """Submit every stage as a Slurm job array depending on the previous one; nothing waits for them here."""
    from crosschip.data.executors import slurm_chain

    chain = [(s.name, _with_progress(s, _logging_dir(work, i, s)), _logging_dir(work, i, s), s.tasks)
             for i, s in enumerate(stages, start=1)]
    slurm_chain(executor, chain).run()
    log(f"submitted {len(stages)} dependent Slurm job arrays (logs under {work / 'logs'})")


def _logging_dir(work: Path, i: int, stage: Stage) -> Path:
    return work / "logs" / f"{i:02d}-{stage.name}"


def _run_stages(stages: list[Stage], work: Path, executor: ExecutorConfig, docs_in: int, log: Log,
                show_progress: bool) -> list[StageResult]:
    results: list[StageResult] = []
    docs = docs_in
    with cluster(executor):
        for i, stage in enumerate(stages, start=1):
            logging_dir = _logging_dir(work, i, stage)
            label = f"[{i}/{len(stages)}] {stage.name}"
            reads_docs = any(isinstance(s, BaseReader) for s in stage.steps)
            total = docs if reads_docs else None
            with (quiet_stderr(logging_dir / "console.log") as stream,
                  stage_progress(stream, label, logging_dir, stage.tasks, total, show_progress)):
                result = run_stage(executor, stage.name, _with_progress(stage, logging_dir), logging_dir,
                                   tasks=stage.tasks)
            results.append(result)
            done = f", {result.skipped_tasks} task(s) done before" if result.skipped_tasks else ""
            log(f"{label}: {result.seconds:.1f} s{done}")
            docs = kept_documents(result.stats) or docs
    return results


def _publish(work: Path, out: Path) -> None:
    """Move the kept shards and the removed documents into OUT (renames: atomic, and safe to repeat)."""
    for src, dst in ((work / "final", out / DATA_DIR), (work / "removed", out / REMOVED_DIR)):
        if src.exists():
            if dst.exists():
                shutil.rmtree(dst)
            src.rename(dst)
        else:
            dst.mkdir(exist_ok=True)
    fsync_dir(out)


def _manifest(cfg: CurateConfig, source: Source, executor: ExecutorConfig, fingerprint: str) -> dict[str, Any]:
    return {
        "format": FORMAT, "version": 1, "complete": False, "fingerprint": fingerprint, "data_dir": DATA_DIR,
        "config": cfg.as_dict(), "thresholds": get_preset(cfg.preset).__dict__, "tasks": executor.tasks,
        "input": {"path": str(source.path), "files": len(source.files), "documents": source.documents,
                  "data_fingerprint": data_fingerprint(list(source.files))},
    }


def curate(inp: Path, out: Path, cfg: CurateConfig, executor: ExecutorConfig, *, overwrite: bool = False,
           log: Log = lambda _: None, progress: bool = False) -> dict[str, Any]:
    """Curate IN into OUT; returns the report (also OUT/report.json). Restartable: see the module docstring."""
    from crosschip.data.curate.report import build_report, write_report

    inp, out = Path(inp), Path(out)
    if same_or_nested(inp, out):
        raise CrosschipError(f"OUT {out} is IN or lies inside it (or holds it)", "choose an OUT outside the input")
    source = open_source(inp, cfg.text_key)
    manifest = _manifest(cfg, source, executor, "")
    fingerprint = hashlib.sha256(
        (cfg.fingerprint(executor.tasks) + manifest["input"]["data_fingerprint"]).encode()).hexdigest()
    manifest["fingerprint"] = fingerprint
    resuming = prepare_out(out, fingerprint, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if resuming:
        log(f"resuming the curation in {out}: finished tasks are skipped")
    else:
        atomic_write_json(out / MANIFEST, manifest)
    work = out / WORK_DIR
    stages = build_stages(cfg, build_readers(source, work / "inputs"), work, executor.tasks)
    log(f"curating {source.documents:,} documents from {len(source.files)} file(s): {len(stages)} stages")
    if executor.kind == "slurm":
        _submit_slurm(stages, work, executor, log)
        return {"submitted": True, "out": str(out), "stages": [s.name for s in stages]}
    start = time.perf_counter()
    results = _run_stages(stages, work, executor, source.documents, log, progress)
    _publish(work, out)
    report = build_report(cfg, manifest, results, out, time.perf_counter() - start)
    write_report(report, out)
    manifest.update(complete=True, files={f"{DATA_DIR}/{k}": v for k, v in file_records(out / DATA_DIR).items()},
                    report_sha256=sha256_file(out / "report.json"))
    atomic_write_json(out / MANIFEST, manifest)
    return report
