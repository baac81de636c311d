"""The curation report: what each step removed and why, with examples, lengths, duplicate clusters and timings.

Everything is read back from datatrove's own records: the merged ``stats.json`` of each stage and the exclusion
writers' files (``removed/<step>/``, each document with its ``filter_reason``).
"""

from __future__ import annotations

import gzip
import html
import json
import re
from pathlib import Path
from typing import Any

from crosschip import __version__
from crosschip.data.curate.config import CurateConfig
from crosschip.data.executors import StageResult
from crosschip.fsio import atomic_write_bytes, atomic_write_json
from crosschip.htmlreport import CSS, Series, esc, html_table, jsonable, line_chart

SCHEMA_VERSION = 1
_SKIP = ("READER", "WRITER", "STATS")  # datatrove step types that neither drop nor change documents
# datatrove step name (lower case, a substring) -> the folder its exclusion writer fills (pipeline.removed_writer)
_REMOVED_FOLDER = {"gopher repetition": "gopher_repetition", "gopher quality": "gopher_quality",
                   "c4 quality": "c4_quality", "fineweb quality": "fineweb_quality", "language": "language",
                   "exact": "exact", "minhash": "minhash"}
EXAMPLE_CHARS = 400


def _short_name(name: str) -> str:
    """'🔻 - FILTER: 👯 Gopher Repetition' -> 'Gopher Repetition' (datatrove's step name, readable)."""
    tail = re.sub(r"^[^\w]+", "", name.split(":", 1)[-1]).strip()
    return tail.replace("exact-deduplication", "Exact dedup")


def _folder_for(name: str) -> str | None:
    low = name.lower()
    return next((folder for key, folder in _REMOVED_FOLDER.items() if key in low), None)


def count(value: Any) -> int:
    """A datatrove stat as a number: a plain count, or a merged metric ({"total": ..., "n": ..., ...})."""
    if isinstance(value, dict):
        return int(value.get("total", 0))
    return int(value) if isinstance(value, (int, float)) else 0


def _step_row(stage: StageResult, step: dict[str, Any]) -> dict[str, Any]:
    stats = step.get("stats", {})
    total = count(stats.get("total", 0))
    dropped = count(stats.get("dropped", 0))
    seconds = float(step.get("time_stats", {}).get("total", 0.0))
    reasons = {k.removeprefix("dropped_"): count(v) for k, v in stats.items() if k.startswith("dropped_")}
    lines = {k: count(v) for k, v in stats.items() if k.startswith("line-filter-")}
    name = _short_name(step.get("name", ""))
    doc_len = stats.get("doc_len")
    return {
        "stage": stage.name, "step": name, "removed_folder": _folder_for(name) if dropped else None,
        "docs_in": total, "docs_out": total - dropped, "dropped": dropped,
        "chars_out": count(doc_len) if doc_len is not None else None,
        "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])), "line_edits": lines,
        "seconds": seconds, "docs_per_s": total / seconds if seconds > 0 else None,
    }


def _buckets(stats: dict[str, Any], prefix: str) -> dict[str, int]:
    pairs = [(int(k[len(prefix):]), count(v)) for k, v in stats.items() if k.startswith(prefix)]
    return {str(k): v for k, v in sorted(pairs)}


def _measurements(results: list[StageResult]) -> dict[str, Any]:
    found: dict[str, Any] = {"lengths": {}, "bytes": {}, "clusters": {}}
    for stage in results:
        for step in stage.stats:
            name, stats = step.get("name", ""), step.get("stats", {})
            if name.endswith("lengths in") or name.endswith("lengths out"):
                side = "in" if name.endswith("in") else "out"
                found["lengths"][side] = _buckets(stats, "len_2^")
                found["bytes"][side] = count(stats.get("bytes", 0))
                found["docs_" + side] = sum(found["lengths"][side].values())
            elif name.endswith("cluster sizes"):
                found["clusters"] = _buckets(stats, "cluster_")
    return found


def examples(out: Path, folder: str, per_reason: int) -> dict[str, list[str]]:
    """The first few removed documents per reason, read from the step's exclusion files (in shard order)."""
    picked: dict[str, list[str]] = {}
    for shard in sorted((out / "removed" / folder).glob("*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)
                reason = str((doc.get("metadata") or {}).get("filter_reason") or "duplicate")
                bucket = picked.setdefault(reason, [])
                if len(bucket) < per_reason:
                    text = doc.get("text", "")
                    bucket.append(text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + " [...]")
    return picked


def build_report(cfg: CurateConfig, manifest: dict[str, Any], results: list[StageResult], out: Path,
                 seconds: float) -> dict[str, Any]:
    steps = [_step_row(stage, step) for stage in results for step in stage.stats
             if not any(t in step.get("name", "") for t in _SKIP)]
    for row in steps:
        if row["removed_folder"]:
            row["examples"] = examples(out, row["removed_folder"], cfg.examples_per_reason)
    m = _measurements(results)
    docs_in, docs_out = int(manifest["input"]["documents"]), int(m.get("docs_out", 0))
    return jsonable({
        "schema_version": SCHEMA_VERSION, "crosschip_version": __version__,
        "config": cfg.as_dict(), "preset": cfg.preset, "tasks": manifest["tasks"],
        "summary": {"documents_in": docs_in, "documents_out": docs_out, "removed": docs_in - docs_out,
                    "bytes_in": m["bytes"].get("in"), "bytes_out": m["bytes"].get("out"),
                    "seconds": seconds, "docs_per_s": docs_in / seconds if seconds > 0 else None,
                    "mb_per_s": (m["bytes"].get("in") or 0) / 1e6 / seconds if seconds > 0 else None},
        "steps": steps,
        "stages": [{"name": r.name, "seconds": r.seconds, "skipped_tasks": r.skipped_tasks} for r in results],
        "length_histogram": {"bucket": "log2(characters)", **m["lengths"]},
        "duplicate_clusters": {"size": "documents per MinHash cluster", "clusters": m["clusters"]},
    })


def render_html(report: dict[str, Any]) -> str:
    s = report["summary"]
    steps = report["steps"]
    rows = [[esc(r["stage"]), esc(r["step"]), esc(r["docs_in"]), esc(r["docs_out"]), esc(r["dropped"]),
             esc(", ".join(f"{k}: {v}" for k, v in r["reasons"].items()) or "-"), esc(r["seconds"]),
             esc(r["docs_per_s"])] for r in steps]
    hist = report["length_histogram"]
    keys = sorted({int(k) for side in ("in", "out") for k in hist.get(side, {})})
    series = [Series(side, [float(hist.get(side, {}).get(str(k), 0)) for k in keys], color)
              for side, color in (("in", "#888"), ("out", "#1f77b4"))]
    chart = line_chart("documents per length bucket", series, x_label="characters (2^k)", y_label="documents",
                       log_y=False, x_labels=[f"2^{k}" for k in keys]) if keys else ""
    clusters = report["duplicate_clusters"]["clusters"]
    ex = []
    for r in steps:
        for reason, texts in (r.get("examples") or {}).items():
            ex.append(f"<h3>{esc(r['step'])}: {esc(reason)}</h3>" +
                      "".join(f"<pre>{html.escape(t)}</pre>" for t in texts))
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', "<title>crosschip data curate</title>",
        f"<style>{CSS} pre{{white-space:pre-wrap;background:#f6f6f6;padding:6px}}</style></head><body>",
        "<h1>crosschip data curate</h1>",
        f"<p>{esc(s['documents_in'])} documents in, {esc(s['documents_out'])} kept, {esc(s['removed'])} removed; "
        f"{esc(s['bytes_in'])} bytes in, {esc(s['bytes_out'])} out; {esc(s['seconds'])} s "
        f"({esc(s['docs_per_s'])} docs/s). Preset {esc(report['preset'])}, {esc(report['tasks'])} tasks.</p>",
        "<h2>Steps</h2>", html_table(["stage", "step", "in", "out", "removed", "reasons", "s", "docs/s"], rows),
        "<h2>Lengths before and after</h2>", chart,
        "<h2>Duplicate clusters (MinHash)</h2>",
        html_table(["cluster size", "clusters"], [[esc(k), esc(v)] for k, v in clusters.items()]) if clusters
        else "<p>no near-duplicate clusters</p>",
        "<h2>Removed examples</h2>", "".join(ex) or "<p>nothing removed</p>",
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(report: dict[str, Any], out: Path) -> None:
    atomic_write_json(out / "report.json", report)
    atomic_write_bytes(out / "report.html", render_html(report).encode("utf-8"))
