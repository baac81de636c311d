"""`crosschip data ...`: curate a corpus and tokenize it into the token files `train` reads (datatrove)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from crosschip.cli_common import JsonOpt, err, make_app, print_json, run_app

data_app = make_app("data", "Curate corpora (filters, dedup, PII) and tokenize them for training, on datatrove.")

ExecutorOpt = Annotated[str, typer.Option("--executor", help="Where stages run: local | ray | slurm.")]
TasksOpt = Annotated[int, typer.Option(min=1, help="Tasks the input is split into (one output shard each).")]
WorkersOpt = Annotated[int | None, typer.Option(min=1, help="Tasks run at once (default: CPU cores, at most 8).")]
RayAddressOpt = Annotated[str | None, typer.Option(help="Ray cluster to use (default: start a local one).")]
PartitionOpt = Annotated[str | None, typer.Option(help="Slurm partition (--executor slurm).")]
TextKeyOpt = Annotated[str, typer.Option(help="JSONL field / parquet column holding the documents.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT.")]


def executor_config(executor: str, tasks: int, workers: int | None, ray_address: str | None,
                    slurm_partition: str | None) -> object:
    from crosschip.data.executors import ExecutorConfig, default_workers

    return ExecutorConfig(kind=executor, tasks=tasks, workers=workers or default_workers(),
                          ray_address=ray_address, slurm_partition=slurm_partition)


# --- data curate ---------------------------------------------------------------------------------------------------


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


__all__ = ["data_app", "err", "print_json", "Path", "JsonOpt"]
