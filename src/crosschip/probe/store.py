"""The probe's on-disk format inside a run directory, and its readers and writers.

  probe/manifest.json                     what was recorded (modules, stats, device, precision)
  probe/stats-NNNNN.parquet               per step x module x kind rows (parts, appended at each flush)
  probe/steps-NNNNN.parquet               per step loss, grad norm, lr, loss scale (every trained step)
  probe/tensors/step-NNNNNN.safetensors   `--probe tensors`: full tensors of the selected modules/steps

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

__all__ = ["STAT_NAMES", "read_manifest", "read_stats", "read_steps", "write_part", "truncate"]


def probe_dir(run_dir: Path) -> Path:
    return Path(run_dir) / PROBE_DIR


def tensors_path(run_dir: Path, step: int) -> Path:
    return probe_dir(run_dir) / TENSORS_DIR / f"step-{step:06d}.safetensors"


def _require(run_dir: Path) -> Path:
    path = probe_dir(run_dir) / MANIFEST
    if not path.is_file():
        raise CrosschipError(f"{run_dir} has no probe recording ({path} is missing)", "train with --probe stats")
    return path


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """probe/manifest.json of a run; CrosschipError if the run was not recorded."""
    path = _require(run_dir)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CrosschipError(f"{path} is not valid JSON ({e})", "re-record the run with --probe stats") from e
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        raise CrosschipError(f"{path} is not a probe manifest of schema version {SCHEMA_VERSION}",
                             "re-record the run with this crosschip")
    return manifest


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(probe_dir(run_dir) / MANIFEST, {"schema_version": SCHEMA_VERSION, **manifest})


def _parts(run_dir: Path, kind: str) -> list[Path]:
    root = probe_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (m := _PART.match(p.name)) and m.group(1) == kind)


def _read(run_dir: Path, kind: str) -> pa.Table:
    _require(run_dir)
    schema = _SCHEMAS[kind]
    tables = []
    for part in _parts(run_dir, kind):
        try:
            tables.append(pq.read_table(part, schema=schema))
        except (pa.ArrowException, OSError) as e:
            raise CrosschipError(f"{part} is not a readable probe part ({e})", "re-record the run") from e
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_stats(run_dir: Path) -> pa.Table:
    """All stats parts of a run, sorted by step, kind, order (STATS_SCHEMA)."""
    table = _read(run_dir, "stats")
    return table.sort_by([("step", "ascending"), ("kind", "ascending"), ("order", "ascending")])


def read_steps(run_dir: Path) -> pa.Table:
    """All steps parts of a run, sorted by step (STEPS_SCHEMA)."""
    return _read(run_dir, "steps").sort_by("step")


def _encode(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_part(run_dir: Path, kind: str, columns: dict[str, list[Any]]) -> Path:
    """Write `columns` as the next `kind` part (atomically); returns its path."""
    table = pa.table(columns, schema=_SCHEMAS[kind])
    existing = [int(_PART.match(p.name).group(2)) for p in _parts(run_dir, kind)]  # type: ignore[union-attr]
    path = probe_dir(run_dir) / f"{kind}-{max(existing, default=-1) + 1:05d}.parquet"
    atomic_write_bytes(path, _encode(table))
    return path


def truncate(run_dir: Path, step: int) -> None:
    """Drop everything recorded after `step` (a resumed run records those steps again)."""
    for kind in KINDS:
        for part in _parts(run_dir, kind):
            table = pq.read_table(part, schema=_SCHEMAS[kind])
            keep = table.filter(pc.less_equal(table["step"], step))
            if keep.num_rows == table.num_rows:
                continue
            if keep.num_rows == 0:
                part.unlink()
            else:
                atomic_write_bytes(part, _encode(keep))
    tensors = probe_dir(run_dir) / TENSORS_DIR
    if tensors.is_dir():
        for path in tensors.iterdir():
            if (m := _TENSORS.match(path.name)) and int(m.group(1)) > step:
                path.unlink()
