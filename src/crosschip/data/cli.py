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


def main() -> None:
    run_app(data_app)


__all__ = ["data_app", "err", "print_json", "Path", "JsonOpt"]
