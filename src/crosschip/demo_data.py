"""The demo's data stages: a stdlib-docstring corpus with planted noise, curated (datatrove) and scored.

The planted junk is what a crawl carries (crosschip.data.noise); the demo prints what curation removed, why, and
how much of each planted kind it caught, so a user sees the filters work before training on the result.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console

from crosschip.data.corpus import stdlib_docstring_corpus
from crosschip.data.curate.run import read_shards
from crosschip.data.noise import EXPECTED_STEP, NoiseSpec, Planted, plant_noise, write_parts

DEMO_NOISE = NoiseSpec(exact=300, near=100, boilerplate=60, repeated=60, soup=60, pii=60)
CORPUS_FILES = 2  # datatrove's unit of work is a file: two files keep both local workers busy
CURATE_PRESET = "docs"  # short technical documents (see crosschip.data.curate.config.PRESETS)


def build_corpus(workdir: Path, console: Console) -> tuple[Path, list[Planted]]:
    """workdir/corpus/part-N.jsonl: the stdlib docstrings with DEMO_NOISE planted among them."""
    source = stdlib_docstring_corpus(workdir / "stdlib-docstrings.jsonl")
    clean = [json.loads(line)["text"] for line in source.read_text(encoding="utf-8").splitlines()]
    planted = plant_noise(clean, seed=0, spec=DEMO_NOISE)
    folder = workdir / "corpus"
    write_parts(planted, folder, CORPUS_FILES)
    kinds = {k: sum(d.kind == k for d in planted) for k in ("exact", "near", "boilerplate", "repeated", "soup", "pii")}
    console.print(f"corpus: {len(clean):,} stdlib docstrings + planted noise: "
                  + ", ".join(f"{n} {k}" for k, n in kinds.items()), highlight=False)
    return folder, planted


def score_planted(planted: list[Planted], out: Path) -> dict[str, dict[str, int]]:
    """Per planted kind, how many documents the step meant for it removed.

    A duplicate counts as caught when its cluster kept one member: an exact copy when its text survives once, a
    near copy when it and its original did not both survive (MinHash keeps one of them, datatrove's pick)."""
    kept = Counter(read_shards(out / "data"))
    original = {d.source: d.text for d in planted if d.kind in ("clean", "pii")}
    scores: dict[str, dict[str, int]] = {}
    for kind, step in EXPECTED_STEP.items():
        docs = [d for d in planted if d.kind == kind]
        if kind == "exact":
            caught = len(docs) - sum(max(0, kept[t] - 1) for t in {d.text for d in docs})
        elif kind == "near":
            caught = sum(1 for d in docs if not (kept[d.text] and kept[original.get(d.source, "")]))
        else:
            removed = set(read_shards(out / "removed" / step))
            caught = sum(1 for d in docs if d.text in removed)
        scores[kind] = {"caught": caught, "planted": len(docs), "by": step}
    return scores


def curate_corpus(workdir: Path, corpus: Path, planted: list[Planted], console: Console,
                  overwrite: bool) -> dict[str, Any]:
    from crosschip.data.curate.config import CurateConfig
    from crosschip.data.curate.run import curate
    from crosschip.data.executors import ExecutorConfig

    out = workdir / "curated"  # its DATA_DIR holds the kept shards
    report = curate(corpus, out, CurateConfig(preset=CURATE_PRESET), ExecutorConfig(tasks=CORPUS_FILES, workers=2),
                    overwrite=overwrite, log=lambda m: console.print(m, highlight=False))
    s = report["summary"]
    console.print(f"kept {s['documents_out']:,} of {s['documents_in']:,} documents in {s['seconds']:.0f} s; "
                  "removed, by step and reason:", highlight=False)
    for step in report["steps"]:
        if step["dropped"]:
            reasons = ", ".join(f"{k} {v}" for k, v in list(step["reasons"].items())[:4])
            console.print(f"  {step['step']:<20} {step['dropped']:>5}" + (f"  ({reasons})" if reasons else ""),
                          highlight=False)
    scores = score_planted(planted, out)
    console.print("planted junk caught: " + ", ".join(
        f"{k} {v['caught']}/{v['planted']} ({v['by']})" for k, v in scores.items()), highlight=False)
    console.print(f"report: {out / 'report.html'}", highlight=False)
    return {"out": str(out), "summary": s, "planted": scores}


def tokenize_curated(workdir: Path, console: Console, overwrite: bool, vocab_size: int) -> dict[str, Any]:
    """workdir/tokens: the curated documents as a token dataset (a BPE tokenizer trained on them first)."""
    from crosschip.data.executors import ExecutorConfig
    from crosschip.data.tokenize import TrainTokenizer, tokenize_corpus

    out = workdir / "tokens"
    manifest = tokenize_corpus(workdir / "curated", out, TrainTokenizer(vocab_size), val_fraction=0.05, seed=0,
                               executor=ExecutorConfig(tasks=CORPUS_FILES, workers=2), overwrite=overwrite,
                               log=lambda m: console.print(m, highlight=False), quiet=True)
    return {"out": str(out), "splits": manifest["splits"], "tokenizer_fingerprint": manifest["tokenizer_fingerprint"]}
