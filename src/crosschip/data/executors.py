"""Where a datatrove stage runs: this machine (local), a Ray cluster, or Slurm. Glue over datatrove's executors.

Every stage gets its own ``logging_dir``: datatrove keeps per-task completion markers there
(``completions/NNNNN``), so a stage started again with the same arguments skips the tasks that finished,
and writes its merged ``stats.json`` there, which the curation report reads.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from crosschip.errors import CrosschipError

EXECUTORS = ("local", "ray", "slurm")


@dataclass(frozen=True)
class ExecutorConfig:
    """How stages run. `tasks` splits the input (one output shard per task); `workers` run at once."""

    kind: str = "local"
    tasks: int = 2
    workers: int = 2
    ray_address: str | None = None  # None: start a local Ray for the run (2 CPUs here), shut down after
    slurm_partition: str | None = None
    slurm_time: str = "04:00:00"
    slurm_venv: str | None = None  # a virtualenv to activate on the nodes (default: this one)

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise CrosschipError(f"unknown executor {self.kind!r}", f"pass --executor one of {', '.join(EXECUTORS)}")
        if self.tasks < 1 or self.workers < 1:
            raise CrosschipError(f"--tasks and --workers must be >= 1, got {self.tasks}/{self.workers}",
                                 "pass positive counts, e.g. --tasks 4 --workers 2")
        if self.kind == "slurm" and not self.slurm_partition:
            raise CrosschipError("--executor slurm needs a partition", "pass --slurm-partition NAME")


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


@dataclass
class StageResult:
    name: str
    seconds: float
    skipped_tasks: int  # tasks a previous (interrupted) run had finished
    stats: list[dict[str, Any]]  # datatrove's merged per-step stats (logging_dir/stats.json)


def completed_tasks(logging_dir: Path) -> int:
    done = logging_dir / "completions"
    return sum(1 for _ in done.iterdir()) if done.is_dir() else 0


def read_stats(logging_dir: Path) -> list[dict[str, Any]]:
    path = logging_dir / "stats.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def _make(cfg: ExecutorConfig, pipeline: Sequence[Any], logging_dir: Path, tasks: int, name: str,
          depends: Any = None) -> Any:
    workers = min(cfg.workers, tasks)
    if cfg.kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        # "fork" starts a worker in milliseconds; datatrove's default forkserver re-imports everything per task.
        return LocalPipelineExecutor(list(pipeline), tasks=tasks, workers=workers, logging_dir=str(logging_dir),
                                     start_method="fork")
    if cfg.kind == "ray":
        from datatrove.executor import RayPipelineExecutor

        return RayPipelineExecutor(list(pipeline), tasks=tasks, workers=workers, logging_dir=str(logging_dir),
                                   cpus_per_task=1, mem_per_cpu_gb=1)
    from datatrove.executor import SlurmPipelineExecutor

    return SlurmPipelineExecutor(
        list(pipeline), tasks=tasks, workers=workers, logging_dir=str(logging_dir), job_name=f"crosschip-{name}",
        partition=cfg.slurm_partition, time=cfg.slurm_time, venv_path=cfg.slurm_venv or _this_venv(), depends=depends,
    )


def _this_venv() -> str:
    import sys

    return str(Path(sys.prefix) / "bin" / "activate")


def run_stage(cfg: ExecutorConfig, name: str, pipeline: Sequence[Any], logging_dir: Path,
              tasks: int | None = None, log: Callable[[str], None] | None = None) -> StageResult:
    """Run one datatrove stage to completion (tasks finished by an earlier run are skipped)."""
    tasks = cfg.tasks if tasks is None else tasks
    skipped = completed_tasks(logging_dir)
    if log is not None:
        resumed = f", {skipped}/{tasks} tasks already done" if skipped else ""
        log(f"{name}: {tasks} task{'s' if tasks > 1 else ''} on {cfg.kind}{resumed}")
    start = time.perf_counter()
    _make(cfg, pipeline, logging_dir, tasks, name).run()
    if cfg.kind != "slurm" and completed_tasks(logging_dir) < tasks:
        raise CrosschipError(f"stage {name}: {tasks - completed_tasks(logging_dir)} task(s) failed "
                             f"(logs: {logging_dir / 'logs'})", "fix the cause and run the same command again")
    return StageResult(name, time.perf_counter() - start, skipped, read_stats(logging_dir))


def slurm_chain(cfg: ExecutorConfig, stages: Sequence[tuple[str, Sequence[Any], Path, int]]) -> Any:
    """Slurm executors for the stages, each depending on the one before (`.run()` on the last submits them all)."""
    last = None
    for name, pipeline, logging_dir, tasks in stages:
        last = _make(cfg, pipeline, logging_dir, tasks, name, depends=last)
    return last


@contextmanager
def quiet_stderr(log_path: Path) -> Iterator[IO[str]]:
    """Send fd 2 (datatrove's per-task console logs, which also go to its log files) to `log_path`.

    Yields a stream on the original stderr for crosschip's own progress display.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 2)
        stream = os.fdopen(os.dup(saved), "w", buffering=1)
        try:
            yield stream
        finally:
            stream.close()
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@contextmanager
def cluster(cfg: ExecutorConfig) -> Iterator[None]:
    """Connect to (or start) the Ray cluster a run needs; a no-op for the other executors."""
    if cfg.kind != "ray":
        yield
        return
    try:
        import ray
    except ImportError as e:
        raise CrosschipError("--executor ray needs the ray package", "pip install 'crosschip[ray]'") from e
    started = not ray.is_initialized()
    if started:
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, log_to_driver=False)
        else:  # a local cluster for this run only; no dashboard (it would open a port and pull in more packages)
            ray.init(num_cpus=cfg.workers, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
