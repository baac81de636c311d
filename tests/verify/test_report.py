"""report.json / report.html / terminal tables from synthetic metrics (no models needed)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from crosschip.verify import gates as G
from crosschip.verify.metrics import distribution_metrics, greedy_metrics
from crosschip.verify.report import (
    REPORT_SCHEMA_VERSION,
    Series,
    build_report,
    kl_histogram,
    line_chart,
    render_html,
    render_table,
    write_report,
)
from crosschip.verify.types import GreedyRun, SideInfo, TokenScores

EVIL = '<script>alert("x")</script>'


def _scores(lp: torch.Tensor, ids: torch.Tensor) -> TokenScores:
    top_lp, top_ids = lp.topk(5, -1)
    return TokenScores(ids, lp.gather(1, ids[:, None]).squeeze(1), top_ids, top_lp, lp)


def _stats(rel: float | None) -> dict[str, Any]:
    return {"cosine": 0.999, "max_abs": 0.01, "max_rel": 0.1, "within_1e-3": 0.9, "within_5e-3": 0.99,
            "rel_rmse": rel, "numel": 100, "nonfinite": 0}


def _layers() -> dict[str, Any]:
    points = []
    for i, (acc, iso) in enumerate([(1e-7, 1e-7), (2e-7, 1.5e-7), (3e-2, 3e-2), (5e-2, 2e-7)]):
        points.append({"name": f"layers.{i}", "kind": "layer", "index": i, "accumulated": _stats(acc),
                       "isolated": _stats(iso), "noise_floor": 1e-7 if i != 3 else None, "gate": 1e-4,
                       "passed": iso <= 1e-4})
    return {"points": points, "first_failing": "layers.2", "first_failing_accumulated": "layers.2",
            "isolated_rows": 2, "noise_floor": True}


def _report(emulated: str | None = "ascend-310p", layers: bool = True, kl_inf: bool = False) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 16, 30, generator=g)
    ids = torch.randint(30, (4, 16), generator=g)
    ref = [_scores(x.log_softmax(-1), i) for x, i in zip(logits, ids, strict=True)]
    tgt_logits = logits + 0.05 * torch.randn(logits.shape, generator=g)
    if kl_inf:
        tgt_logits[0, 0, ref[0].top_ids[0, 0]] = -math.inf
    tgt = [_scores(x.log_softmax(-1), i) for x, i in zip(tgt_logits, ids, strict=True)]
    dist = distribution_metrics(ref, tgt, bootstrap=100)
    runs_r = [GreedyRun([1, 2], [5, 6, 7], [{5: -0.1}, {6: -0.1}, {7: -0.2, 8: -0.3}], text=EVIL)]
    runs_t = [GreedyRun([1, 2], [5, 6, 8], [{5: -0.1}, {6: -0.1}, {8: -0.2, 7: -0.3}], text="a & b")]
    greedy = greedy_metrics(runs_r, runs_t, top_n=2)
    gates = G.resolve_gates("bf16", {})
    results = G.evaluate(dist, greedy, gates)
    side_r = SideInfo(EVIL, "checkpoint", {"path": Path("/tmp/x"), "dtype": torch.float32, "scale": math.inf},
                      True)
    side_t = SideInfo("http://127.0.0.1:8000/v1#demo", "endpoint", {"url": "http://127.0.0.1:8000/v1"}, False,
                      emulated=emulated, unavailable={"layers": "an endpoint exposes no hidden states"})
    return build_report(ref=side_r, target=side_t, prompts={"count": 4, "sha256": "ab" * 32, "source": "shipped"},
                        distribution=dist, greedy=greedy, layers=_layers() if layers else None, gates=results,
                        precision="bf16", passed=G.verdict(results, layer_fail=layers), emulated=emulated,
                        unavailable={"isolated": "disabled by --no-isolated"}, thresholds=gates)


def test_report_json_round_trips(tmp_path: Path) -> None:
    report = _report()
    paths = write_report(report, tmp_path)
    assert set(paths) == {"json", "html"} and all(p.is_file() for p in paths.values())
    loaded = json.loads(paths["json"].read_text())
    assert loaded == report
    assert loaded["schema_version"] == REPORT_SCHEMA_VERSION == 2
    assert loaded["verdict"] == "fail"  # a layer failed
    assert loaded["ref"]["identity"] == {"path": "/tmp/x", "dtype": "torch.float32", "scale": "inf"}
    assert loaded["unavailable"] == {"isolated": "disabled by --no-isolated",
                                     "layers": "target: an endpoint exposes no hidden states"}
    assert {g["name"] for g in loaded["gates"]} >= {"kl_mean", "kl_p99", "top1_agreement", "ppl_ratio"}
    for key in ("crosschip_version", "created", "prompts", "distribution", "greedy", "layers", "emulated"):
        assert key in loaded
    assert loaded["created"].endswith("+00:00")


def test_non_finite_values_are_strict_json(tmp_path: Path) -> None:
    report = _report(kl_inf=True)
    assert report["distribution"]["kl_max"] == "inf"
    text = write_report(report, tmp_path)["json"].read_text()
    assert "Infinity" not in text and "NaN" not in text

    def reject(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    json.loads(text, parse_constant=reject)
    assert "FAIL" in render_html(report)


def test_html_is_self_contained_and_escaped(tmp_path: Path) -> None:
    page = write_report(_report(), tmp_path)["html"].read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") >= 3  # layer curve, KL histogram, per-position KL
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "@import" not in page and "url(" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "a &amp; b" in page
    assert "EMULATED (ascend-310p)" in page
    assert "layers.2" in page


def test_html_without_emulation_or_layers() -> None:
    page = render_html(_report(emulated=None, layers=False))
    assert "EMULATED" not in page
    assert "not run" in page
    assert page.count("<svg") == 2


def test_terminal_tables_show_gates_metrics_and_layers() -> None:
    report = _report()
    report["gates"][0]["note"] = "[bold]not markup[/bold] [/x]"  # data must print verbatim, never as markup
    tables = render_table(report)
    console = Console(record=True, width=200)
    for table in tables:
        console.print(table)
    text = console.export_text()
    for needle in ("kl_mean", "top1_agreement", "greedy_vllm_close", "EMULATED (ascend-310p)", "layers.2",
                   "first failing: layers.2", "[bold]not markup[/bold] [/x]", "FAIL", "PASS"):
        assert needle in text, needle
    assert len(tables) == 3


def test_plots_tolerate_gaps_zeros_and_single_points() -> None:
    chart = line_chart("t", [Series("a", [1e-3, None, 0.0, 1e-1, math.inf], "#000")], x_label="x", y_label="y",
                       log_y=True)
    assert chart.count("<polyline") == 2  # None, 0 (log axis) and inf leave gaps
    assert "<svg" in line_chart("t", [Series("a", [0.5], "#000")], x_label="x", y_label="y", log_y=False)
    assert "nothing to plot" in line_chart("t", [Series("a", [None], "#000")], x_label="x", y_label="y", log_y=True)
    hist = kl_histogram([0.0, 0.0, 1e-4, 1e-3, 1e-3, "inf", None])
    assert hist.count("<rect") == 1 + 3  # frame + zero bar + two occupied log bins
    assert "nothing to plot" in kl_histogram([])
