"""`crosschip data curate` on a planted corpus: real datatrove pipelines, real processes, real Ray.

The corpus is clean synthetic prose with planted junk (crosschip.data.noise); every planted kind must be removed by
the step meant for it, no clean document may be lost, and PII must be redacted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crosschip.data.curate.config import CurateConfig
from crosschip.data.curate.run import curate
from crosschip.data.executors import ExecutorConfig
from crosschip.data.noise import EXPECTED_STEP, NoiseSpec
from datakit import read_texts, write_planted

DOCS = CurateConfig(preset="docs")
LOCAL = ExecutorConfig(kind="local", tasks=2, workers=2)
SMALL = NoiseSpec(exact=20, near=20, boilerplate=8, repeated=8, soup=8, pii=10)
EMAIL = re.compile(r"[\w.]+@mail-example\.net")


def tree_bytes(root: Path, *folders: str) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for folder in folders for p in sorted((root / folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, Path, dict]:
    root = tmp_path_factory.mktemp("planted")
    docs = write_planted(root / "in", clean=2000, seed=0)
    report = curate(root / "in", root / "out", DOCS, LOCAL)
    return docs, root / "out", report


def test_planted_duplicates_removed_and_clean_kept(planted: tuple[list, Path, dict]) -> None:
    docs, out, _ = planted
    kept = read_texts(out / "data")
    counts: dict[str, int] = {}
    for t in kept:
        counts[t] = counts.get(t, 0) + 1
    near = {d.source: d.text for d in docs if d.kind == "near"}
    clean = {d.source: d.text for d in docs if d.kind == "clean"}
    # A near-duplicate cluster keeps one member, datatrove's pick: the original or its edited copy.
    for source, text in clean.items():
        assert counts.get(text) == 1 or (source in near and near[source] in counts), \
            f"clean document {source} was removed or kept twice"
    assert all(counts.get(d.text, 0) <= 1 for d in docs if d.kind == "exact")  # every exact copy gone
    both = sum(1 for s, t in near.items() if t in counts and clean.get(s) in counts)
    assert len(near) - both >= 0.95 * len(near), f"MinHash missed {both}/{len(near)} near-duplicates"
    pii = [d for d in docs if d.kind == "pii"]
    assert sum(1 for t in kept if "\nQuestions go to " in t) == len(pii)  # kept, redacted (test_pii_redacted)
    assert len(kept) == len(clean) + len(pii) + both


def test_planted_junk_removed_by_its_filter(planted: tuple[list, Path, dict]) -> None:
    docs, out, report = planted
    for kind in ("boilerplate", "repeated", "soup"):
        removed = set(read_texts(out / "removed" / EXPECTED_STEP[kind]))
        planted_kind = [d.text for d in docs if d.kind == kind]
        assert planted_kind and all(t in removed for t in planted_kind), kind
    steps = {s["step"]: s for s in report["steps"]}
    assert steps["Gopher Repetition"]["reasons"] == {"dup_line_frac": 40}
    assert steps["FineWeb Quality"]["reasons"] == {"short_line_ratio": 40}
    assert steps["Gopher Quality"]["dropped"] == 40


def test_pii_redacted(planted: tuple[list, Path, dict]) -> None:
    docs, out, _ = planted
    kept = "\n".join(read_texts(out / "data"))
    planted_pii = [d for d in docs if d.kind == "pii"]
    assert planted_pii and not EMAIL.search(kept)
    for ip in ("81.2.69.142", "94.140.14.14", "151.101.1.69", "185.199.108.153", "104.16.132.229"):
        assert ip not in kept
    assert kept.count("@example.") >= len(planted_pii)  # datatrove's replacement addresses


def test_report_records_reasons_examples_lengths_clusters(planted: tuple[list, Path, dict]) -> None:
    docs, out, report = planted
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["summary"] == report["summary"]
    s = report["summary"]
    assert s["documents_in"] == len(docs) and s["documents_out"] == len(read_texts(out / "data"))
    assert s["bytes_out"] < s["bytes_in"] and s["docs_per_s"] > 0
    fineweb = next(r for r in report["steps"] if r["step"] == "FineWeb Quality")
    assert len(fineweb["examples"]["short_line_ratio"]) == DOCS.examples_per_reason
    assert sum(report["length_histogram"]["in"].values()) == len(docs)
    clusters = report["duplicate_clusters"]["clusters"]
    assert clusters and sum(clusters.values()) >= 95  # one cluster per caught near-duplicate pair
    html = (out / "report.html").read_text()
    assert "short_line_ratio" in html and "<script" not in html
    manifest = json.loads((out / "curate.json").read_text())
    assert manifest["complete"] and set(manifest["files"]) == {f"data/{p.name}" for p in (out / "data").iterdir()}


# ------------------------------------------------------------------ executors, restart


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small planted corpus and its curation by the local executor (the reference for identity checks)."""
    root = tmp_path_factory.mktemp("small")
    write_planted(root / "in", clean=400, seed=1, spec=SMALL)
    curate(root / "in", root / "local", DOCS, LOCAL)
    return root / "in", root / "local"


def test_ray_executor_matches_local(small: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("ray")
    inp, local = small
    ray_cfg = ExecutorConfig(kind="ray", tasks=2, workers=2)  # starts a local Ray (2 CPUs, no dashboard), stops it
    curate(inp, tmp_path / "ray", DOCS, ray_cfg)
    assert tree_bytes(tmp_path / "ray", "data", "removed") == tree_bytes(local, "data", "removed")
    import ray

    assert not ray.is_initialized()


def _curate_argv(inp: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "crosschip", "data", "curate", str(inp), str(out), "--preset", "docs", *extra]


def test_sigkill_then_rerun_is_byte_identical(small: tuple[Path, Path], tmp_path: Path) -> None:
    inp, local = small
    out = tmp_path / "out"
    proc = subprocess.Popen(_curate_argv(inp, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker = out / ".work" / "logs" / "05-minhash-signatures"
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its forked workers, mid-run
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not json.loads((out / "curate.json").read_text())["complete"]
    rerun = subprocess.run(_curate_argv(inp, out), capture_output=True, text=True, check=False, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr and "done before" in rerun.stderr
    assert tree_bytes(out, "data", "removed") == tree_bytes(local, "data", "removed")


def test_other_settings_in_existing_out_refused(small: tuple[Path, Path], tmp_path: Path) -> None:
    inp, local = small
    before = tree_bytes(local, "data", "removed")
    proc = subprocess.run(_curate_argv(inp, local, "--no-minhash"), capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "other settings" in proc.stderr and "--overwrite" in proc.stderr
    proc = subprocess.run(_curate_argv(inp, local), capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "already holds this curation" in proc.stderr
    assert tree_bytes(local, "data", "removed") == before


def test_slurm_stages_are_chained_job_arrays(small: tuple[Path, Path], tmp_path: Path) -> None:
    """Not submitted (no Slurm here): the executors datatrove would submit, each depending on the one before."""
    from crosschip.data.curate.pipeline import build_stages
    from crosschip.data.executors import slurm_chain
    from crosschip.data.sources import build_readers, open_source

    inp, _ = small
    cfg = ExecutorConfig(kind="slurm", tasks=4, workers=2, slurm_partition="cpu")
    stages = build_stages(DOCS, build_readers(open_source(inp), tmp_path / "inputs"), tmp_path, cfg.tasks)
    last = slurm_chain(cfg, [(s.name, s.steps, tmp_path / "logs" / s.name, s.tasks) for s in stages])
    chain = []
    while last is not None:
        chain.append((last.job_name, last.get_sbatch_args()["partition"], last.tasks))
        last = last.depends
    assert chain[::-1] == [(f"crosschip-{s.name}", "cpu", s.tasks) for s in stages]


def test_parquet_output_holds_the_same_documents(small: tuple[Path, Path], tmp_path: Path) -> None:
    import dataclasses

    import pyarrow.parquet as pq

    inp, local = small
    curate(inp, tmp_path / "pq", dataclasses.replace(DOCS, output_format="parquet"), LOCAL)
    shards = sorted((tmp_path / "pq" / "data").glob("*.parquet"))
    texts = [t for shard in shards for t in pq.read_table(shard).column("text").to_pylist()]
    assert shards and texts == read_texts(local / "data")


def test_docs_preset_c4_keeps_indentation() -> None:
    """datatrove's C4 filter strips every kept line; under `docs` it only decides, so code keeps its indentation."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter

    from crosschip.data.curate.config import PRESETS
    from crosschip.data.curate.pipeline import filter_steps

    text = "Return the value.\n\n    >>> value(1)  [1]\n    2\n"
    c4 = next(s for s in filter_steps(DOCS, Path("/nonexistent")) if isinstance(s, C4QualityFilter))
    doc = Document(text=text, id="a")
    assert c4.filter(doc) is True and doc.text == text
    edited = Document(text=text, id="b")
    assert C4QualityFilter(**PRESETS["docs"].c4_quality).filter(edited) is True and edited.text != text
