"""`crosschip data ...`: curate a corpus and tokenize it into the token files `train` reads (datatrove)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from crosschip.cli_common import JsonOpt, err, make_app, print_json, run_app

if TYPE_CHECKING:
    from crosschip.data.executors import ExecutorConfig

data_app = make_app("data", "Curate corpora (filters, dedup, PII) and tokenize them for training, on datatrove.")

ExecutorOpt = Annotated[str, typer.Option("--executor", help="Where stages run: local | ray | slurm.")]
TasksOpt = Annotated[int, typer.Option(min=1, help="Tasks the input is split into (one output shard each).")]
WorkersOpt = Annotated[int | None, typer.Option(min=1, help="Tasks run at once (default: CPU cores, at most 8).")]
RayAddressOpt = Annotated[str | None, typer.Option(help="Ray cluster to use (default: start a local one).")]
PartitionOpt = Annotated[str | None, typer.Option(help="Slurm partition (--executor slurm).")]
TextKeyOpt = Annotated[str, typer.Option(help="JSONL field / parquet column holding the documents.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT.")]


def executor_config(executor: str, tasks: int, workers: int | None, ray_address: str | None,
                    slurm_partition: str | None) -> ExecutorConfig:
    from crosschip.data.executors import ExecutorConfig, default_workers

    return ExecutorConfig(kind=executor, tasks=tasks, workers=workers or default_workers(),
                          ray_address=ray_address, slurm_partition=slurm_partition)


# --- data curate ---------------------------------------------------------------------------------------------------


@data_app.command()
def curate(
    inp: Annotated[Path, typer.Argument(metavar="IN", help="Corpus: .jsonl(.gz)/.parquet/.txt file or directory.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output directory (kept shards, removed, report).")],
    preset: Annotated[str, typer.Option(help="Filter thresholds: web (FineWeb's) | docs (short technical docs).")]
    = "web",
    no_gopher_repetition: Annotated[bool, typer.Option("--no-gopher-repetition")] = False,
    no_gopher_quality: Annotated[bool, typer.Option("--no-gopher-quality")] = False,
    no_c4_quality: Annotated[bool, typer.Option("--no-c4-quality")] = False,
    no_fineweb_quality: Annotated[bool, typer.Option("--no-fineweb-quality")] = False,
    no_pii: Annotated[bool, typer.Option("--no-pii", help="Keep emails and public IPs.")] = False,
    no_exact_dedup: Annotated[bool, typer.Option("--no-exact-dedup")] = False,
    no_minhash: Annotated[bool, typer.Option("--no-minhash", help="Skip near-duplicate removal.")] = False,
    lid_model: Annotated[Path | None, typer.Option(help="Local fastText language-ID model (.bin): keeps only "
                                                        "--language documents. Nothing is downloaded.")] = None,
    language: Annotated[list[str] | None, typer.Option(help="Language(s) to keep with --lid-model.")] = None,
    lid_threshold: Annotated[float, typer.Option(help="Minimum language score to keep a document.")] = 0.65,
    output_format: Annotated[str, typer.Option("--format", help="Kept shards: jsonl.gz | parquet.")] = "jsonl.gz",
    text_key: TextKeyOpt = "text",
    executor: ExecutorOpt = "local",
    tasks: TasksOpt = 2,
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    slurm_partition: PartitionOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Filter (Gopher, C4, FineWeb), redact PII, remove exact and near duplicates: datatrove, offline.

    Restartable: run the same command again after a crash and finished tasks are skipped. OUT/report.html
    shows what each step removed and why, with examples."""
    from crosschip.data.curate.config import FILTERS, CurateConfig
    from crosschip.data.curate.run import curate as run_curate
    from crosschip.errors import CrosschipError

    if language and lid_model is None:  # datatrove's LanguageFilter would download its fastText model
        raise CrosschipError("--language needs a local language-ID model (crosschip downloads nothing)",
                             "pass --lid-model PATH (a fastText model such as lid.176.bin)")

    skip = {"gopher_repetition": no_gopher_repetition, "gopher_quality": no_gopher_quality,
            "c4_quality": no_c4_quality, "fineweb_quality": no_fineweb_quality}
    cfg = CurateConfig(preset=preset, filters=tuple(f for f in FILTERS if not skip[f]), pii=not no_pii,
                       exact_dedup=not no_exact_dedup, minhash=not no_minhash,
                       lid_model=str(lid_model) if lid_model else None, languages=tuple(language or ["en"]),
                       lid_threshold=lid_threshold, text_key=text_key, output_format=output_format)
    ex = executor_config(executor, tasks, workers, ray_address, slurm_partition)
    log = (lambda _: None) if json_out else (lambda m: err.print(m, highlight=False))
    report = run_curate(inp, out, cfg, ex, overwrite=overwrite, log=log, progress=err.is_terminal and not json_out)
    if json_out:
        print_json({"out": str(out), **({"summary": report["summary"], "steps": [
            {k: v for k, v in s.items() if k != "examples"} for s in report["steps"]]} if "summary" in report
            else report)})
        return
    if "summary" not in report:
        err.print(f"submitted {len(report['stages'])} Slurm stages; when they finish, run the same command with "
                  "--executor local to publish and report", highlight=False)
        return
    _print_curate_summary(report, out)


def _print_curate_summary(report: dict, out: Path) -> None:
    s = report["summary"]
    err.print(f"kept {s['documents_out']:,} of {s['documents_in']:,} documents "
              f"({s['bytes_out'] or 0:,} of {s['bytes_in'] or 0:,} bytes) in {s['seconds']:.1f} s "
              f"({s['docs_per_s']:.0f} docs/s)", highlight=False)
    for step in report["steps"]:
        if step["dropped"]:
            top = ", ".join(f"{k} {v}" for k, v in list(step["reasons"].items())[:4])
            err.print(f"  {step['step']}: removed {step['dropped']:,}" + (f" ({top})" if top else ""),
                      highlight=False)
    err.print(f"report: {out / 'report.html'}", highlight=False)


# --- data tokenize -------------------------------------------------------------------------------------------------


@data_app.command("tokenize")
def tokenize(
    inp: Annotated[Path, typer.Argument(metavar="IN", help=(
        "Corpus: .txt, .jsonl, .jsonl.gz or .parquet, a file or a directory; or the OUT of data curate."))],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Dataset directory to write (appears atomically).")],
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer directory (tokenizer.json) to use.")] = None,
    train_tokenizer: Annotated[bool, typer.Option(
        "--train-tokenizer", help="Train a byte-level BPE tokenizer on IN instead (saved in OUT/tokenizer).")] = False,
    vocab_size: Annotated[int | None, typer.Option(help="Vocabulary of --train-tokenizer (default 4096).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share of documents for validation.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed of the per-document train/validation split.")] = 0,
    text_key: TextKeyOpt = "text",
    executor: ExecutorOpt = "local",
    tasks: TasksOpt = 1,
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Tokenize IN into OUT: datatrove token files (BOS + ids + EOS per document) that `train --data OUT` reads.

    Documents are split into train and validation by a seeded hash of their id. With --tasks 1 (the default)
    the token stream is in corpus order, as `train --data IN` would tokenize it.
    """
    from crosschip.errors import CrosschipError

    if (tokenizer is None) == (not train_tokenizer):
        raise CrosschipError("data tokenize needs exactly one of --tokenizer DIR and --train-tokenizer",
                             "pass --tokenizer DIR to reuse one, or --train-tokenizer --vocab-size N")
    if vocab_size is not None and not train_tokenizer:
        raise CrosschipError("--vocab-size is for --train-tokenizer", "drop --vocab-size, or train a tokenizer")
    from crosschip.data.dataset import open_dataset
    from crosschip.data.tokenize import TrainTokenizer, tokenize_corpus

    cfg = executor_config(executor, tasks, workers, ray_address, None)
    tok = TrainTokenizer(vocab_size or 4096) if train_tokenizer else tokenizer
    tokenize_corpus(inp, out, tok, val_fraction=val_fraction, seed=seed, executor=cfg, text_key=text_key,
                    overwrite=overwrite, log=lambda line: err.print(line, highlight=False, markup=False))
    summary = open_dataset(out).summary()  # sizes checked; the sha256s were just computed
    if json_out:
        print_json(summary)
        return
    splits = summary["splits"]
    err.print(f"dataset {summary['path']} ({summary['dtype']}, vocab {summary['vocab_size']}): "
              + "; ".join(f"{s} {v['documents']:,} documents, {v['tokens']:,} tokens" for s, v in splits.items())
              + f"\ntrain on it: crosschip train --data {out} --model PRESET --out RUN",
              highlight=False, markup=False)


def main() -> None:
    run_app(data_app)

