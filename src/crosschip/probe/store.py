"""The probe's on-disk format inside a run directory, and its readers and writers.

  probe/manifest.json                     what was recorded (modules, stats, device, precision, rank, world size)
  probe/stats-NNNNN.parquet               per step x module x kind rows (parts, appended at each flush)
  probe/steps-NNNNN.parquet               per step loss, grad norm, lr, loss scale (every trained step)
  probe/tensors/step-NNNNNN.safetensors   `--probe tensors`: full tensors of the selected modules/steps
  probe/rank-RRRRR/...                    under torchrun: rank R > 0's own recording, the same files again

Rank 0 (and a single-process run) writes directly under probe/, so a single-process layout is unchanged
and a multi-rank run's rank 0 compares against a single-process run as is. Every other rank writes only
inside its own rank-RRRRR directory, so ranks never race on a file. Rows carry no rank column: the rank
is implied by the directory, and each manifest records "rank" and "world_size" (absent in recordings
made before ranks existed: read as 0 and 1).

Every file is written atomically (temp + rename), so a reader, or a run killed mid-flush, sees whole
parts only; readers concatenate the parts.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crosschip.errors import CrosschipError
from crosschip.fsio import atomic_write_bytes, atomic_write_json
from crosschip.probe.stats import COUNT_STATS, FLOAT_STATS, STAT_NAMES

SCHEMA_VERSION = 1
PROBE_DIR = "probe"
MANIFEST = "manifest.json"
TENSORS_DIR = "tensors"
KINDS = ("stats", "steps")

STATS_SCHEMA = pa.schema(
    [("step", pa.int64()), ("module", pa.string()), ("kind", pa.string()), ("order", pa.int32()),
     ("in_nonfinite", pa.int64()), ("numel", pa.int64())]
    + [(name, pa.float64()) for name in FLOAT_STATS]
    + [(name, pa.int64()) for name in COUNT_STATS]
)
STEPS_SCHEMA = pa.schema(
    [("step", pa.int64()), ("loss", pa.float64()), ("grad_norm", pa.float64()), ("lr", pa.float64()),
     ("loss_scale", pa.float64())]
)
_SCHEMAS = {"stats": STATS_SCHEMA, "steps": STEPS_SCHEMA}
_PART = re.compile(r"^(stats|steps)-(\d{5})\.parquet$")
_TENSORS = re.compile(r"^step-(\d{6})\.safetensors$")
_RANK_DIR = re.compile(r"^rank-(\d{5})$")

__all__ = ["STAT_NAMES", "ranks", "read_manifest", "read_stats", "read_steps", "write_part", "truncate"]


def probe_dir(run_dir: Path, rank: int = 0) -> Path:
    """Where `rank` records: probe/ for rank 0 (and single-process runs), probe/rank-RRRRR/ otherwise."""
    root = Path(run_dir) / PROBE_DIR
    return root if rank == 0 else root / f"rank-{rank:05d}"


def tensors_path(run_dir: Path, step: int, rank: int = 0) -> Path:
    return probe_dir(run_dir, rank) / TENSORS_DIR / f"step-{step:06d}.safetensors"


def ranks(run_dir: Path) -> list[int]:
    """The ranks with a recording in this run (a manifest), ascending; [] when none."""
    root = probe_dir(run_dir)
    if not root.is_dir():
        return []
    found = [0] if (root / MANIFEST).is_file() else []
    found += sorted(int(m.group(1)) for p in root.iterdir()
                    if (m := _RANK_DIR.match(p.name)) and (p / MANIFEST).is_file())
    return found


def _require(run_dir: Path, rank: int = 0) -> Path:
    path = probe_dir(run_dir, rank) / MANIFEST
    if path.is_file():
        return path
    recorded = ranks(run_dir)
    if rank == 0 or not recorded:
        raise CrosschipError(f"{run_dir} has no probe recording ({path} is missing)", "train with --probe stats")
    raise CrosschipError(f"{run_dir} has no probe recording of rank {rank}",
                         f"pick one of the recorded ranks {', '.join(map(str, recorded))}")


def read_manifest(run_dir: Path, rank: int = 0) -> dict[str, Any]:
    """The manifest of one rank's recording; CrosschipError if that rank was not recorded."""
    path = _require(run_dir, rank)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CrosschipError(f"{path} is not valid JSON ({e})", "re-record the run with --probe stats") from e
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        raise CrosschipError(f"{path} is not a probe manifest of schema version {SCHEMA_VERSION}",
                             "re-record the run with this crosschip")
    return {"rank": 0, "world_size": 1, **manifest}  # recordings from before ranks: one process


def write_manifest(run_dir: Path, manifest: dict[str, Any], rank: int = 0) -> None:
    atomic_write_json(probe_dir(run_dir, rank) / MANIFEST, {"schema_version": SCHEMA_VERSION, **manifest})


def _parts(run_dir: Path, kind: str, rank: int = 0) -> list[Path]:
    root = probe_dir(run_dir, rank)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (m := _PART.match(p.name)) and m.group(1) == kind)


def _read(run_dir: Path, kind: str, rank: int) -> pa.Table:
    _require(run_dir, rank)
    schema = _SCHEMAS[kind]
    tables = []
    for part in _parts(run_dir, kind, rank):
        try:
            tables.append(pq.read_table(part, schema=schema))
        except (pa.ArrowException, OSError) as e:
            raise CrosschipError(f"{part} is not a readable probe part ({e})", "re-record the run") from e
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_stats(run_dir: Path, rank: int = 0) -> pa.Table:
    """All stats parts of one rank's recording, sorted by step, kind, order (STATS_SCHEMA)."""
    table = _read(run_dir, "stats", rank)
    return table.sort_by([("step", "ascending"), ("kind", "ascending"), ("order", "ascending")])


def read_steps(run_dir: Path, rank: int = 0) -> pa.Table:
    """All steps parts of one rank's recording, sorted by step (STEPS_SCHEMA)."""
    return _read(run_dir, "steps", rank).sort_by("step")


def _encode(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_part(run_dir: Path, kind: str, columns: dict[str, list[Any]], rank: int = 0) -> Path:
    """Write `columns` as `rank`'s next `kind` part (atomically); returns its path."""
    table = pa.table(columns, schema=_SCHEMAS[kind])
    existing = [int(_PART.match(p.name).group(2)) for p in _parts(run_dir, kind, rank)]  # type: ignore[union-attr]
    path = probe_dir(run_dir, rank) / f"{kind}-{max(existing, default=-1) + 1:05d}.parquet"
    atomic_write_bytes(path, _encode(table))
    return path


def truncate(run_dir: Path, step: int) -> None:
    """Drop everything recorded after `step`, in every rank's recording (a resumed run records those steps again).

    The trainer calls it on rank 0 only, before any rank records again."""
    root = probe_dir(run_dir)
    rank_dirs = [p for p in root.iterdir() if _RANK_DIR.match(p.name) and p.is_dir()] if root.is_dir() else []
    for rank in [0, *(int(p.name.removeprefix("rank-")) for p in rank_dirs)]:
        _truncate_rank(run_dir, rank, step)


def _truncate_rank(run_dir: Path, rank: int, step: int) -> None:
    for kind in KINDS:
        for part in _parts(run_dir, kind, rank):
            table = pq.read_table(part, schema=_SCHEMAS[kind])
            keep = table.filter(pc.less_equal(table["step"], step))
            if keep.num_rows == table.num_rows:
                continue
            if keep.num_rows == 0:
                part.unlink()
            else:
                atomic_write_bytes(part, _encode(keep))
    tensors = probe_dir(run_dir, rank) / TENSORS_DIR
    if tensors.is_dir():
        for path in tensors.iterdir():
            if (m := _TENSORS.match(path.name)) and int(m.group(1)) > step:
                path.unlink()
