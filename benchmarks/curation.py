"""Curation: `crosschip data curate` against the same datatrove pipeline written by hand, and what curating buys.

One noisy corpus, built here with no network: the interpreter's stdlib docstrings (clean) plus planted noise
(`crosschip.data.noise.plant_noise`: exact and near duplicates, boilerplate, repeated lines, symbol soup, PII),
plus a few "popular pages" copied many times over, as a crawl has them. A random set of docstrings is held out
first: it is in neither training corpus and is the clean set every model is scored on.

1. Throughput. The corpus (several jsonl files) is curated with the `docs` preset, in the same process,
   alternately by
   - `crosschip`: `crosschip.data.curate.run.curate` (what `crosschip data curate IN OUT --preset docs` runs):
     validation pass, the datatrove stages, progress counters, length stats, publishing, report;
   - `datatrove`: the **peer**, the same stages written by hand with datatrove alone: JsonlReader, the four
     filters with the thresholds of crosschip's `docs` preset (imported, so they are the same work), each with an
     exclusion writer, PIIFormatter, exact dedup (3 stages), MinHash (4 stages, datatrove's defaults),
     JsonlWriter, one LocalPipelineExecutor per stage with the same tasks, workers and start method.
   Both outputs must hold the same documents (by id: under `docs` crosschip's C4 step only decides, datatrove's
   also strips the lines of what it keeps). docs/s and MB/s = input documents / file bytes over the wall time;
   ratio = crosschip wall / peer wall (fastest of the repetitions; median alongside).
2. The point of curation. The same model preset is trained by `crosschip train` (a subprocess each) for the same
   steps, seed, batch and tokenizer (one BPE tokenizer trained here on the clean training docstrings) on the raw
   noisy corpus and on crosschip's curated output (`OUT/data`, jsonl.gz). Both final checkpoints are scored on
   the held-out docstrings: mean next-token loss over BOS + ids + EOS of each document.

    python benchmarks/curation.py [--workdir DIR] [--json] [--steps 300] [--reps 2] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
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
from datatrove.pipeline.writers import JsonlWriter

import crosschip
from _common import log, machine, prepare_corpus, run_benchmark
from crosschip.checkpoint import load_model
from crosschip.data import iter_documents, load_tokenizer, train_tokenizer
from crosschip.data.curate.config import FILTERS, PRESETS, CurateConfig
from crosschip.data.curate.run import curate, read_shards
from crosschip.data.executors import ExecutorConfig
from crosschip.data.noise import NoiseSpec, Planted, plant_noise
from crosschip.errors import CrosschipError

TARGET_RATIO = 1.1  # the bar: crosschip wall time / hand-written datatrove wall time
STDLIB_BYTES = 8_000_000  # more than the stdlib holds: every docstring
NOISE_KINDS = ("exact", "popular", "near", "boilerplate", "repeated", "soup")  # pii documents are clean text + PII
FULL = {"heldout": 400, "clean_docs": 0, "exact": 1500, "popular": 60, "popular_copies": 25, "near": 200,
        "boilerplate": 800, "repeated": 800, "soup": 1200, "pii": 300, "reps": 2}
QUICK = {"heldout": 40, "clean_docs": 500, "exact": 60, "popular": 5, "popular_copies": 5, "near": 15,
         "boilerplate": 20, "repeated": 20, "soup": 20, "pii": 20, "reps": 1}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None, help="keep the corpus, outputs and runs here")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--seed", type=int, default=0, help="corpus, held-out pick and training seed")
    p.add_argument("--quick", action="store_true",
                   help="throughput only, on a ~700-document corpus, one repetition (a smoke test)")
    corpus = p.add_argument_group("corpus (defaults: the full run; --quick scales them down)")
    corpus.add_argument("--heldout", type=int, help=f"clean docstrings held out for scoring ({FULL['heldout']})")
    corpus.add_argument("--clean-docs", type=int, help="clean training docstrings, 0 = all the rest (0)")
    for kind in ("exact", "near", "boilerplate", "repeated", "soup", "pii"):
        corpus.add_argument(f"--{kind}", type=int, help=f"NoiseSpec.{kind} ({FULL[kind]})")
    corpus.add_argument("--popular", type=int, help=f"clean docs copied --popular-copies times ({FULL['popular']})")
    corpus.add_argument("--popular-copies", type=int, help=f"copies of each popular doc ({FULL['popular_copies']})")
    corpus.add_argument("--files", type=int, default=4, help="jsonl files the corpus is written as (4)")
    cur = p.add_argument_group("curation")
    cur.add_argument("--preset", default="docs", help="curation preset (docs)")
    cur.add_argument("--filters", default=",".join(FILTERS),
                     help=f"quality filters both pipelines run, comma-separated (default: all: {','.join(FILTERS)})")
    cur.add_argument("--tasks", type=int, default=2, help="datatrove tasks per stage (2)")
    cur.add_argument("--workers", type=int, default=2, help="tasks at once (2)")
    cur.add_argument("--reps", type=int, help=f"timed runs of each pipeline, order alternating ({FULL['reps']})")
    cur.add_argument("--start-method", default="fork",
                     help="the peer's multiprocessing start method; crosschip uses fork (datatrove's default is "
                          "forkserver)")
    tr = p.add_argument_group("training")
    tr.add_argument("--no-train", action="store_true", help="skip the training comparison")
    tr.add_argument("--model", default="tiny", help="model preset (tiny)")
    tr.add_argument("--steps", type=int, default=300, help="optimizer steps of each run (300)")
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--seq-len", type=int, default=128)
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary of the shared tokenizer (2048)")
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--precision", default="fp32")
    tr.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.no_train = True
    if min(args.files, args.tasks, args.workers, args.reps) < 1:
        p.error("--files, --tasks, --workers and --reps must be >= 1")
    unknown = set(args.filters.split(",")) - set(FILTERS) - {""}
    if unknown:
        p.error(f"unknown filter(s) {', '.join(sorted(unknown))}; choose from {', '.join(FILTERS)}")
    args.filters = tuple(f for f in FILTERS if f in args.filters.split(","))  # crosschip's order
    return args


# --- the corpus ----------------------------------------------------------------------------------------------------


def add_popular_copies(docs: list[Planted], popular: int, copies: int, rng: random.Random) -> list[Planted]:
    """`popular` clean documents, each copied `copies` times at random places after the original."""
    clean = [i for i, d in enumerate(docs) if d.kind == "clean"]
    keyed = [(float(i), i, d) for i, d in enumerate(docs)]
    for i in rng.sample(clean, min(popular, len(clean))):
        keyed += [(rng.uniform(i + 0.5, len(docs)), len(keyed) + c, Planted(docs[i].text, "popular", docs[i].source))
                  for c in range(copies)]
    return [d for *_, d in sorted(keyed, key=lambda t: (t[0], t[1]))]


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")


def build_corpus(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Held-out docstrings, the clean training docstrings and the raw noisy corpus (`--files` jsonl files)."""
    stdlib = list(iter_documents(prepare_corpus(workdir, STDLIB_BYTES)))
    rng = random.Random(args.seed)
    if args.heldout >= len(stdlib):
        raise CrosschipError(f"--heldout {args.heldout} leaves no training docs ({len(stdlib)} docstrings)",
                             "pass a smaller --heldout")
    held = set(rng.sample(range(len(stdlib)), args.heldout))
    heldout = [d for i, d in enumerate(stdlib) if i in held]
    clean = [d for i, d in enumerate(stdlib) if i not in held]
    if 0 < args.clean_docs < len(clean):
        clean = [clean[i] for i in sorted(rng.sample(range(len(clean)), args.clean_docs))]
    spec = NoiseSpec(exact=args.exact, near=args.near, boilerplate=args.boilerplate, repeated=args.repeated,
                     soup=args.soup, pii=args.pii)
    docs = add_popular_copies(plant_noise(clean, seed=args.seed, spec=spec), args.popular, args.popular_copies, rng)
    texts = [d.text for d in docs]
    assert not set(heldout) & set(texts), "a held-out docstring is in the training corpus"
    raw = _fresh(workdir / "raw")
    per = -(-len(docs) // args.files)
    for i in range(args.files):
        write_jsonl(raw / f"part-{i:04d}.jsonl", texts[i * per:(i + 1) * per])
    write_jsonl(workdir / "heldout.jsonl", heldout)
    write_jsonl(workdir / "clean.jsonl", clean)
    kinds = Counter(d.kind for d in docs)
    nbytes: Counter[str] = Counter()
    for d in docs:
        nbytes[d.kind] += len(d.text.encode("utf-8"))
    noise_docs = sum(kinds[k] for k in NOISE_KINDS)
    noise_bytes = sum(nbytes[k] for k in NOISE_KINDS)
    return {
        "raw": raw, "heldout": heldout, "clean": clean, "planted": docs,
        "summary": {
            "documents": len(docs), "files": args.files,
            "file_bytes": sum(f.stat().st_size for f in raw.glob("*.jsonl")),
            "text_bytes": sum(nbytes.values()), "kinds": dict(sorted(kinds.items())),
            "noise_share_docs": noise_docs / len(docs), "noise_share_bytes": noise_bytes / sum(nbytes.values()),
            "heldout_docs": len(heldout), "clean_training_docs": len(clean),
            "noise_spec": {**asdict(spec), "popular": args.popular, "popular_copies": args.popular_copies},
        },
    }


# --- throughput: crosschip and the hand-written datatrove pipeline -------------------------------------------------


def text_of(doc: Document) -> str:
    """Exact-dedup key (datatrove picks the hash function from the return annotation)."""
    return doc.text


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """fd 2 (datatrove's per-task console logs) into a file, as crosschip's runner does with its own."""
    sys.stderr.flush()
    saved = os.dup(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


PEER_FILTERS = {"gopher_repetition": GopherRepetitionFilter, "gopher_quality": GopherQualityFilter,
                "c4_quality": C4QualityFilter, "fineweb_quality": FineWebQualityFilter}


def peer_stages(inp: Path, out: Path, preset: str, filters: tuple[str, ...],
                tasks: int) -> list[tuple[str, list[Any], int]]:
    """The same curation written by hand with datatrove alone (the datatrove examples' way), stage by stage."""
    p = PRESETS[preset]
    work = out / "work"

    def removed(step: str) -> JsonlWriter:
        return JsonlWriter(str(out / "removed" / step))

    exact, minhash = ExactDedupConfig(content_getter=text_of), MinhashConfig()
    filtered, exact_kept = str(work / "filtered"), str(work / "exact-kept")
    sigs, dups = str(work / "exact" / "sigs"), str(work / "exact" / "dups")
    mh_sigs, mh_buckets, mh_ids = (str(work / "minhash" / k) for k in ("sigs", "buckets", "ids"))
    return [
        ("filter", [
            JsonlReader(str(inp), glob_pattern="*.jsonl", add_file_path=False),
            *(PEER_FILTERS[f](exclusion_writer=removed(f), **getattr(p, f)) for f in filters),
            PIIFormatter(),
            JsonlWriter(filtered),
        ], tasks),
        ("exact-signatures", [JsonlReader(filtered, add_file_path=False), ExactDedupSignature(sigs, exact)], tasks),
        ("exact-find", [ExactFindDedups(sigs, dups, exact)], 1),
        ("exact-filter", [JsonlReader(filtered, add_file_path=False),
                          ExactDedupFilter(dups, exact, exclusion_writer=removed("exact")), JsonlWriter(exact_kept)],
         tasks),
        ("minhash-signatures", [JsonlReader(exact_kept, add_file_path=False),
                                MinhashDedupSignature(mh_sigs, config=minhash)], tasks),
        ("minhash-buckets", [MinhashDedupBuckets(mh_sigs, mh_buckets, config=minhash)], minhash.num_buckets),
        ("minhash-cluster", [MinhashDedupCluster(mh_buckets, mh_ids, config=minhash)], 1),
        ("minhash-filter", [JsonlReader(exact_kept, add_file_path=False),
                            MinhashDedupFilter(mh_ids, exclusion_writer=removed("minhash")),
                            JsonlWriter(str(out / "data"))], tasks),
    ]


def run_peer(inp: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    """Run the hand-written pipeline; returns seconds per stage."""
    seconds: dict[str, float] = {}
    with stderr_to(out / "console.log"):
        for name, pipeline, tasks in peer_stages(inp, out, args.preset, args.filters, args.tasks):
            start = time.perf_counter()
            LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(args.workers, tasks),
                                  logging_dir=str(out / "work" / "logs" / name), start_method=args.start_method).run()
            seconds[name] = time.perf_counter() - start
    return seconds


def run_crosschip(inp: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    return curate(inp, out, CurateConfig(preset=args.preset, filters=args.filters),
                  ExecutorConfig(kind="local", tasks=args.tasks, workers=args.workers))


def cpu_seconds() -> float:
    """User + system CPU of this process and of its finished children (datatrove's forked workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


def throughput(args: argparse.Namespace, raw: Path, workdir: Path, docs: int, nbytes: int) -> dict[str, Any]:
    """Both pipelines on the same input, `--reps` times each, the order alternating; the last outputs are kept."""
    walls: dict[str, list[float]] = {"crosschip": [], "datatrove": []}
    cpus: dict[str, list[float]] = {"crosschip": [], "datatrove": []}
    stages: dict[str, Any] = {}
    outs = {"crosschip": workdir / "curated-crosschip", "datatrove": workdir / "curated-datatrove"}
    for rep in range(args.reps):
        order = ("crosschip", "datatrove") if rep % 2 == 0 else ("datatrove", "crosschip")
        for name in order:
            out = _fresh(outs[name])
            load = os.getloadavg()[0]
            cpu, start = cpu_seconds(), time.perf_counter()
            if name == "crosschip":
                report = run_crosschip(raw, out, args)
            else:
                peer_seconds = run_peer(raw, out, args)
            wall = time.perf_counter() - start
            walls[name].append(wall)
            cpus[name].append(cpu_seconds() - cpu)
            log(f"rep {rep + 1}/{args.reps} {name}: {wall:.2f} s wall, {cpus[name][-1]:.2f} CPU s "
                f"(load average before {load:.2f})")
    stages["crosschip"] = {s["name"]: s["seconds"] for s in report["stages"]}
    stages["datatrove"] = peer_seconds
    kept = {name: read_shards(out / "data", "id") for name, out in outs.items()}
    rows = {}
    for name, w in walls.items():
        best = min(w)
        rows[name] = {"wall_s": {"fastest": best, "median": statistics.median(w), "all": [round(t, 3) for t in w]},
                      "cpu_s": {"least": min(cpus[name]), "all": [round(t, 3) for t in cpus[name]]},
                      "docs_per_s": docs / best, "mb_per_s": nbytes / 1e6 / best,
                      "stage_s": {k: round(v, 3) for k, v in stages[name].items()},
                      "docs_kept": len(kept[name])}
    cc, dt = rows["crosschip"], rows["datatrove"]
    cc["outside_stages_s"] = cc["wall_s"]["all"][-1] - sum(stages["crosschip"].values())
    ratio = cc["wall_s"]["fastest"] / dt["wall_s"]["fastest"]
    return {
        "preset": args.preset, "filters": list(args.filters), "tasks": args.tasks, "workers": args.workers,
        "reps": args.reps,
        "peer_start_method": args.start_method, "input_docs": docs, "input_file_bytes": nbytes, "runs": rows,
        "same_kept_count": cc["docs_kept"] == dt["docs_kept"],
        "same_kept_documents": sorted(kept["crosschip"]) == sorted(kept["datatrove"]),
        "ratio": ratio, "median_ratio": cc["wall_s"]["median"] / dt["wall_s"]["median"],
        "cpu_ratio": cc["cpu_s"]["least"] / dt["cpu_s"]["least"],
        "target_ratio": TARGET_RATIO, "target_met": ratio <= TARGET_RATIO,
        "crosschip_report": {"summary": report["summary"],
                             "removed": {s["step"]: s["dropped"] for s in report["steps"] if s["dropped"]}},
        "curated": outs["crosschip"] / "data",
    }


# --- the point of curation: raw vs curated training, scored on held-out docstrings ---------------------------------


def train(name: str, data: Path, tok_dir: Path, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """`crosschip train` in a subprocess (the CLI users run); its --json summary."""
    run = workdir / "runs" / name
    cmd = [sys.executable, "-m", "crosschip", "train", "--data", str(data), "--model", args.model, "--out", str(run),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--lr", str(args.lr), "--tokenizer", str(tok_dir), "--seed", str(args.seed), "--device", args.device,
           "--precision", args.precision, "--eval-every", str(args.steps), "--save-every", str(args.steps),
           "--log-every", str(max(1, args.steps // 5)), "--overwrite", "--json"]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    src = str(Path(crosschip.__file__).resolve().parents[1])  # the same crosschip as this process
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    log(f"training {args.model} on the {name} corpus for {args.steps} steps ...")
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)  # its progress goes to our stderr
    if proc.returncode != 0:
        raise CrosschipError(f"crosschip train on the {name} corpus failed (exit {proc.returncode}, error above)",
                             "run the command by hand: " + " ".join(cmd))
    summary = json.loads(proc.stdout)
    summary["wall_s"] = time.perf_counter() - start
    summary["run"] = str(run)
    log(f"{name}: train loss {summary['train_loss']:.4f} in {summary['wall_s']:.1f} s")
    return summary


def heldout_loss(run: Path, tok_dir: Path, texts: list[str], seq_len: int) -> dict[str, float]:
    """Mean next-token loss over BOS + ids + EOS of each held-out document, in windows of `seq_len` predictions."""
    model, _ = load_model(run)  # a run directory: its `latest` checkpoint
    tok = load_tokenizer(tok_dir)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for ids in tok(texts, add_special_tokens=False)["input_ids"]:
            seq = [bos, *ids, eos]
            for i in range(0, len(seq) - 1, seq_len):
                window = torch.tensor(seq[i:i + seq_len + 1])[None]
                logits = model(window[:, :-1]).logits[0].float()
                total += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
                tokens += window.shape[1] - 1
    return {"loss": total / tokens, "tokens": tokens}


def curation_value(args: argparse.Namespace, corpus: dict[str, Any], curated: Path, workdir: Path) -> dict[str, Any]:
    tok_dir = workdir / "tokenizer"
    log(f"training a {args.vocab_size}-token BPE tokenizer on the {len(corpus['clean'])} clean training docstrings")
    train_tokenizer(corpus["clean"], args.vocab_size, tok_dir)
    tok = load_tokenizer(tok_dir)
    tokens: Counter[str] = Counter()
    planted = corpus["planted"]
    for d, ids in zip(planted, tok([d.text for d in planted], add_special_tokens=False)["input_ids"], strict=True):
        tokens[d.kind] += len(ids) + 2  # + BOS and EOS, as training packs them
    junk = sum(tokens[k] for k in ("boilerplate", "repeated", "soup"))
    copies = sum(tokens[k] for k in ("exact", "popular", "near"))
    log(f"raw corpus: {sum(tokens.values()):,} tokens, {junk / sum(tokens.values()):.0%} boilerplate/repeated/soup, "
        f"{copies / sum(tokens.values()):.0%} exact/near copies")
    runs = {name: train(name, data, tok_dir, args, workdir)
            for name, data in (("raw", corpus["raw"]), ("curated", curated))}
    for name, summary in runs.items():
        summary["heldout"] = heldout_loss(Path(summary["run"]), tok_dir, corpus["heldout"], args.seq_len)
        log(f"{name}: held-out loss {summary['heldout']['loss']:.4f}")
    raw, cur = runs["raw"]["heldout"]["loss"], runs["curated"]["heldout"]["loss"]
    keep = ("steps", "tokens_seen", "train_loss", "val_loss", "tokens_per_s", "elapsed_s", "wall_s", "checkpoint")
    return {
        "model": args.model, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "lr": args.lr, "vocab_size": args.vocab_size, "precision": args.precision, "seed": args.seed,
        "heldout_docs": len(corpus["heldout"]), "heldout_tokens": runs["raw"]["heldout"]["tokens"],
        "raw_tokens": sum(tokens.values()), "raw_tokens_by_kind": dict(sorted(tokens.items())),
        "raw_junk_token_share": junk / sum(tokens.values()), "raw_copy_token_share": copies / sum(tokens.values()),
        "runs": {name: {**{k: s[k] for k in keep}, "heldout_loss": s["heldout"]["loss"]} for name, s in runs.items()},
        "raw_loss": raw, "curated_loss": cur, "difference": raw - cur, "curated_lower": cur < raw,
    }


# --- the run -------------------------------------------------------------------------------------------------------


def run_all(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    start = time.perf_counter()
    loads = [os.getloadavg()]
    corpus = build_corpus(args, workdir)
    c = corpus["summary"]
    log(f"corpus: {c['documents']:,} documents ({c['noise_share_docs']:.0%} planted noise, "
        f"{c['noise_share_bytes']:.0%} of the bytes) in {c['files']} files, {c['file_bytes']:,} bytes; "
        f"{c['heldout_docs']} held out")
    tp = throughput(args, corpus["raw"], workdir, c["documents"], c["file_bytes"])
    loads.append(os.getloadavg())
    summary: dict[str, Any] = {"corpus": c, "throughput": {k: v for k, v in tp.items() if k != "curated"}}
    if not args.no_train:
        summary["training"] = curation_value(args, corpus, tp["curated"], workdir)
        loads.append(os.getloadavg())
    summary["runtime_s"] = time.perf_counter() - start
    summary["load_average"] = [[round(x, 2) for x in la] for la in loads]
    summary["machine"] = {**machine(torch.device("cpu")), "cpu_count": os.cpu_count()}
    return summary


def print_table(s: dict[str, Any]) -> None:
    m, c, t = s["machine"], s["corpus"], s["throughput"]
    print(f"{m['device_name']}, {m['cpu_count']} cores, torch {m['torch']}, {m['date_utc']}; "
          f"load average (1/5/15 min) at start {s['load_average'][0]}, end {s['load_average'][-1]}")
    print(f"corpus: {c['documents']:,} docs in {c['files']} jsonl files, {c['file_bytes'] / 1e6:.2f} MB; "
          f"planted noise {c['noise_share_docs']:.0%} of docs, {c['noise_share_bytes']:.0%} of bytes "
          f"({', '.join(f'{k} {v}' for k, v in c['kinds'].items())}); {c['heldout_docs']} docstrings held out")
    print(f"curation: preset {t['preset']}, filters {','.join(t['filters'])}, {t['tasks']} tasks, "
          f"{t['workers']} workers, {t['reps']} run(s) each, order alternating; "
          f"peer start method {t['peer_start_method']}")
    print(f"{'pipeline':<12}{'wall s':>9}{'median s':>10}{'CPU s':>9}{'docs/s':>10}{'MB/s':>8}{'kept':>8}")
    for name, r in t["runs"].items():
        print(f"{name:<12}{r['wall_s']['fastest']:>9.2f}{r['wall_s']['median']:>10.2f}{r['cpu_s']['least']:>9.2f}"
              f"{r['docs_per_s']:>10.0f}{r['mb_per_s']:>8.3f}{r['docs_kept']:>8}")
    same = "same documents" if t["same_kept_documents"] else ("same count, OTHER ids" if t["same_kept_count"]
                                                          else "DIFFERENT document counts")
    print(f"kept by both: {same}; removed by crosschip's steps: "
          + ", ".join(f"{k} {v}" for k, v in t["crosschip_report"]["removed"].items()))
    verdict = "met" if t["target_met"] else "MISSED"
    print(f"ratio crosschip/datatrove (wall time): {t['ratio']:.3f}x (median runs {t['median_ratio']:.3f}x, "
          f"CPU time {t['cpu_ratio']:.3f}x); target <= {t['target_ratio']}x: {verdict}")
    cc, dt = t["runs"]["crosschip"], t["runs"]["datatrove"]
    print("stage seconds (last run)  " + "  ".join(
        f"{k} {cc['stage_s'].get(k, 0):.1f}/{dt['stage_s'].get(k, 0):.1f}" for k in dt["stage_s"])
        + f"  | crosschip outside its stages {cc['outside_stages_s']:.2f} s")
    if "training" in s:
        tr = s["training"]
        print(f"training: {tr['model']}, {tr['steps']} steps x {tr['batch_size']} x {tr['seq_len']} tokens, "
              f"lr {tr['lr']}, {tr['precision']}, seed {tr['seed']}, one {tr['vocab_size']}-token BPE tokenizer; "
              f"scored on {tr['heldout_docs']} held-out docstrings ({tr['heldout_tokens']:,} tokens)")
        print(f"  raw corpus {tr['raw_tokens']:,} tokens: {tr['raw_junk_token_share']:.0%} boilerplate/repeated/soup, "
              f"{tr['raw_copy_token_share']:.0%} exact/near copies")
        for name, r in tr["runs"].items():
            print(f"  {name:<8} held-out loss {r['heldout_loss']:.4f}  (final train loss {r['train_loss']:.4f}, "
                  f"own val split {r['val_loss']:.4f}, {r['wall_s']:.0f} s)")
        verdict = "curated lower" if tr["curated_lower"] else "curated NOT lower"
        print(f"held-out loss raw - curated: {tr['difference']:+.4f} nats/token ({verdict})")
    print(f"runtime {s['runtime_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(parse_args(argv), run_all, print_table)


if __name__ == "__main__":
    sys.exit(main())
