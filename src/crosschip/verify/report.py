"""The verify report: a versioned JSON document, a self-contained HTML page with inline SVG plots, and
the terminal tables.

report.json schema (REPORT_SCHEMA_VERSION = 2): schema_version, crosschip_version, created (UTC ISO),
verdict ("pass" | "fail"), precision (gate class), emulated (target profile or null), ref / target
(SideInfo), prompts {count, sha256, source, ...}, distribution (ref vs target, DistributionMetrics.to_dict()
or null), unavailable {metric: why}, greedy (GreedyMetrics.to_dict() or null), layers
(layers.LayerResult.to_dict() or null), gates [GateResult with its group], gate_source (where the thresholds
come from), and since version 2: two_sided, noise_floor {golden, floor, floor_what, gate_basis, ...},
served {path, source, identity} (endpoints), conversion and fidelity (endpoints serving a known checkpoint:
{distribution, greedy, floor, floor_what, gate_basis, gate_source}), tokenization, routing [per MoE layer],
certified. Non-finite floats are written as the strings "inf", "-inf", "nan" (strict JSON has no such
numbers).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from crosschip import __version__
from crosschip.fsio import atomic_write_bytes, atomic_write_json
from crosschip.htmlreport import CSS, Series, esc, fmt, html_table, jsonable, kl_histogram, line_chart, num
from crosschip.verify.gates import DEFAULT_GATES, GateResult, Gates
from crosschip.verify.metrics import DistributionMetrics, GreedyMetrics
from crosschip.verify.types import SideInfo

REPORT_SCHEMA_VERSION = 2
_COLORS = {"accumulated": "#1f77b4", "isolated": "#ff7f0e", "gate": "#d62728", "noise floor": "#7f7f7f"}


def _prompts_summary(prompts: Any) -> dict[str, Any]:
    """{count, sha256, source, ...} from a dict or a prompts object (sha256, source, texts, chats)."""
    if isinstance(prompts, Mapping):
        return dict(prompts)
    texts = list(getattr(prompts, "texts", []) or [])
    chats = list(getattr(prompts, "chats", []) or [])
    return {"count": len(texts) + len(chats), "texts": len(texts), "chats": len(chats),
            "sha256": getattr(prompts, "sha256", None), "source": getattr(prompts, "source", None)}


def _unavailable(ref: SideInfo, target: SideInfo, dist: DistributionMetrics | None,
                 extra: Mapping[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = dict(extra or {})
    for side, info in (("ref", ref), ("target", target)):
        for metric, why in info.unavailable.items():
            out[metric] = f"{out[metric]}; {side}: {why}" if metric in out else f"{side}: {why}"
    if dist is not None:
        out.update(dist.unavailable)
    return out


def build_report(*, ref: SideInfo, target: SideInfo, prompts: Any, distribution: DistributionMetrics | None,
                 greedy: GreedyMetrics | None, layers: dict[str, Any] | None, gates: list[GateResult],
                 precision: str, passed: bool, emulated: str | None = None,
                 unavailable: Mapping[str, str] | None = None, thresholds: Gates | None = None) -> dict[str, Any]:
    """The report as a plain JSON-able dict (what report.json holds and render_table / the HTML read)."""
    gate_def = thresholds or DEFAULT_GATES.get(precision)
    report = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "crosschip_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "verdict": "pass" if passed else "fail",
        "precision": precision,
        "emulated": emulated,
        "ref": dataclasses.asdict(ref),
        "target": dataclasses.asdict(target),
        "prompts": _prompts_summary(prompts),
        "distribution": None if distribution is None else distribution.to_dict(),
        "unavailable": _unavailable(ref, target, distribution, unavailable),
        "greedy": None if greedy is None else greedy.to_dict(),
        "layers": layers,
        "gates": [dataclasses.asdict(g) for g in gates],
        "gate_source": gate_def.source if gate_def is not None else None,
    }
    return jsonable(report)


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write report.json and report.html into out_dir, each atomically; returns their paths."""
    out_dir = Path(out_dir)
    clean = jsonable(report)
    paths = {"json": out_dir / "report.json", "html": out_dir / "report.html"}
    atomic_write_json(paths["json"], clean)
    atomic_write_bytes(paths["html"], render_html(clean).encode("utf-8"))
    return paths


def _layer_chart(layers: Mapping[str, Any]) -> str:
    points = list(layers.get("points") or [])
    if not points:
        return ""

    def stat(p: Mapping[str, Any], mode: str) -> float | None:
        st = p.get(mode)
        return num(st.get("rel_rmse")) if isinstance(st, Mapping) else None

    bad = [not p.get("passed", True) for p in points]
    series = [Series("accumulated", [stat(p, "accumulated") for p in points], _COLORS["accumulated"], bad=bad)]
    if any(isinstance(p.get("isolated"), Mapping) for p in points):
        series.append(Series("isolated", [stat(p, "isolated") for p in points], _COLORS["isolated"], bad=bad))
    series.append(Series("gate", [num(p.get("gate")) for p in points], _COLORS["gate"], dash=True, markers=False))
    series.append(Series("noise floor", [num(p.get("noise_floor")) for p in points], _COLORS["noise floor"],
                         dash=True, markers=False))
    names = [str(p.get("name", i)).removeprefix("layers.") for i, p in enumerate(points)]
    return line_chart("per-layer error (rel_rmse vs reference; red rings: failing points)", series,
                      x_label="comparison point (layer.attn / layer.mlp / layer)", y_label="rel_rmse (log)",
                      log_y=True, x_labels=names)


# ---------------------------------------------------------------- HTML


def _result_cell(passed: Any) -> str:
    if passed is None:
        return '<span class="skip">skipped</span>'
    return '<span class="pass">PASS</span>' if passed else '<span class="fail">FAIL</span>'


def _sides_html(report: Mapping[str, Any]) -> str:
    rows = []
    for role in ("ref", "target"):
        side = report.get(role) or {}
        ident = json.dumps(side.get("identity"), indent=1, sort_keys=True, default=str)
        rows.append([esc(role), esc(side.get("label")), esc(side.get("kind")), esc(side.get("full_distribution")),
                     esc(side.get("emulated")), f"<pre>{html.escape(ident)}</pre>"])
    return html_table(["side", "label", "kind", "full distribution", "emulated", "identity"], rows)


_DIST_KEYS = ("kl_method", "kl_mean", "kl_mean_ci", "ci_resampled", "kl_p99", "kl_max", "top1_agreement",
              "top5_overlap", "ppl_ref", "ppl_tgt", "ppl_ratio", "tokens", "sequences")


def _distribution_html(dist: Mapping[str, Any] | None) -> str:
    if not dist:
        return '<p class="empty">not measured</p>'
    table = html_table(["metric", "value"], [[esc(k), esc(dist.get(k))] for k in _DIST_KEYS if k in dist])
    per_pos = [num(v) for v in dist.get("per_position_kl") or []]
    pos_chart = line_chart("mean KL by position", [Series("mean KL", per_pos, _COLORS["accumulated"])],
                           x_label="token position", y_label="KL (nats)", log_y=False)
    return table + kl_histogram(dist.get("kl_values") or []) + pos_chart


def _floors_html(report: Mapping[str, Any]) -> str:
    """The golden, the served checkpoint, fidelity, tokenization and routing, as key figures."""
    rows = []
    floor = report.get("noise_floor") or {}
    golden = floor.get("golden") or {}
    rows.append(["gate basis", esc(floor.get("gate_basis")), esc(floor.get("floor_what") or golden.get("error"))])
    figures = floor.get("floor") or {}
    rows.append(["golden vs ref", esc({k: figures.get(k) for k in ("kl_mean", "kl_p99", "top1_agreement")}),
                 esc(golden.get("spec"))])
    served = report.get("served") or {}
    if served:
        rows.append(["served checkpoint", esc(served.get("path")), esc(served.get("source"))])
    fidelity = report.get("fidelity") or {}
    if fidelity:
        dist, fl = fidelity.get("distribution") or {}, fidelity.get("floor") or {}
        rows.append(["fidelity (endpoint vs own load)", esc({k: dist.get(k) for k in ("kl_method", "kl_mean")}),
                     esc(f"floor {fl.get('kl_mean')}: {fidelity.get('floor_what')}")])
    tok = report.get("tokenization") or {}
    if tok:
        rows.append(["tokenization", _result_cell(tok.get("passed")), esc(f"{tok.get('method')}: {tok.get('reason')}")])
    for r in report.get("routing") or []:
        rows.append([f"routing, layer {esc(r.get('layer'))}", esc(r.get("flipped")),
                     esc(f"golden {r.get('golden_flipped')} of {r.get('tokens')} tokens re-routed")])
    return html_table(["check", "value", "detail"], rows)


def _greedy_html(greedy: Mapping[str, Any] | None) -> str:
    if not greedy:
        return '<p class="empty">not measured</p>'
    summary = (f"<p>{esc(greedy.get('identical'))} of {esc(greedy.get('prompts'))} prompts identical; mean matched "
               f"length {esc(greedy.get('mean_matched'))}; vLLM top-{esc(greedy.get('top_n'))} check on all: "
               f"{esc(greedy.get('all_vllm_close'))}</p>")
    rows, classes = [], []
    for row in greedy.get("rows") or []:
        rows.append([esc(row.get("prompt")), esc(row.get("first_divergence")), esc(row.get("matched")),
                     _result_cell(row.get("vllm_close")), esc(row.get("ref_token")), esc(row.get("tgt_token")),
                     esc(row.get("note")), f"<pre>{esc(row.get('ref_text'))}</pre>",
                     f"<pre>{esc(row.get('tgt_text'))}</pre>"])
        classes.append("" if row.get("vllm_close") else "first")
    headers = ["prompt", "first divergence", "matched", "vLLM close", "ref token", "target token", "note",
               "ref text", "target text"]
    return summary + html_table(headers, rows, classes)


def _layers_html(layers: Mapping[str, Any] | None) -> str:
    if not layers:
        return '<p class="empty">not run (needs both sides in-process)</p>'
    first = layers.get("first_failing")
    head = (f"<p>first failing point: <b>{esc(first)}</b> (accumulated mode: "
            f"{esc(layers.get('first_failing_accumulated'))})</p>")
    rows, classes = [], []
    for p in layers.get("points") or []:
        acc, iso = p.get("accumulated") or {}, p.get("isolated") or {}
        rows.append([esc(p.get("name")), esc(p.get("kind")), esc(acc.get("rel_rmse")), esc(iso.get("rel_rmse")),
                     esc(acc.get("cosine")), esc(acc.get("max_abs")), esc(acc.get("within_1e-3")),
                     esc(p.get("noise_floor")), esc(p.get("gate")), _result_cell(p.get("passed"))])
        classes.append("first" if p.get("name") == first else "")
    headers = ["point", "kind", "rel_rmse acc.", "rel_rmse iso.", "cosine acc.", "max_abs acc.", "within 1e-3 acc.",
               "noise floor", "gate", "result"]
    return head + _layer_chart(layers) + html_table(headers, rows, classes)


def render_html(report: Mapping[str, Any]) -> str:
    """A self-contained page (inline CSS and SVG, no scripts, no external resources)."""
    verdict = str(report.get("verdict", "fail"))
    emulated = report.get("emulated")
    title = f"crosschip verify: {verdict.upper()}" + (f" (EMULATED {emulated})" if emulated else "")
    banner = ""
    if emulated:
        banner = (f'<div class="emulated">EMULATED ({esc(emulated)}): the target ran on this machine under the '
                  "profile's numerics, not on the chip itself.</div>")
    gate_rows = [[esc(g.get("group")), esc(g.get("name")), esc(g.get("value")), esc(g.get("threshold")),
                  _result_cell(g.get("passed")), esc(g.get("note"))] for g in report.get("gates") or []]
    prompts = report.get("prompts") or {}
    unavailable = report.get("unavailable") or {}
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f'<h1>crosschip verify: <span class="{"pass" if verdict == "pass" else "fail"}">{esc(verdict.upper())}'
        f"</span></h1>", banner,
        f'<p class="muted">precision class {esc(report.get("precision"))} &middot; created {esc(report.get("created"))}'
        f" &middot; crosschip {esc(report.get('crosschip_version'))} &middot; schema "
        f"{esc(report.get('schema_version'))}</p>",
        "<h2>Sides</h2>", _sides_html(report),
        "<h2>Prompts</h2>", html_table(["field", "value"], [[esc(k), esc(v)] for k, v in prompts.items()]),
        "<h2>Gates</h2>", html_table(["group", "gate", "value", "threshold", "result", "note"], gate_rows),
        f'<p class="muted">{esc(report.get("gate_source"))}</p>',
        "<h2>Noise floor and two-sided checks</h2>", _floors_html(report),
    ]
    if unavailable:
        rows = [[esc(k), esc(v)] for k, v in unavailable.items()]
        parts += ["<h2>Unavailable</h2>", html_table(["metric", "why"], rows)]
    parts += ["<h2>Distribution (teacher-forced)</h2>", _distribution_html(report.get("distribution")),
              "<h2>Greedy continuations</h2>", _greedy_html(report.get("greedy")),
              "<h2>Layers</h2>", _layers_html(report.get("layers")), "</body></html>"]
    return "\n".join(parts)


# ---------------------------------------------------------------- terminal


def _result_text(passed: Any) -> Text:
    if passed is None:
        return Text("skipped", style="dim")
    return Text("PASS", style="bold green") if passed else Text("FAIL", style="bold red")


def render_table(report: Mapping[str, Any]) -> list[Table]:
    """Terminal tables: gates, headline metrics and (when run) the per-layer points."""
    emulated = report.get("emulated")
    basis = (report.get("noise_floor") or {}).get("gate_basis")
    how = "measured against the golden" if basis == "measured" else f"{report.get('precision')} class constants"
    title = f"verify (gates {how})" + (f" - EMULATED ({emulated})" if emulated else "")
    gates = Table("group", "gate", "value", "threshold", "result", "note", title=Text(title))
    for g in report.get("gates") or []:
        gates.add_row(Text(fmt(g.get("group"))), Text(fmt(g.get("name"))), Text(fmt(g.get("value"))),
                      Text(fmt(g.get("threshold"))), _result_text(g.get("passed")), Text(fmt(g.get("note"))))
    tables = [gates]
    metrics = Table("metric", "value", title="metrics")
    for k in _DIST_KEYS:
        if k in (report.get("distribution") or {}):
            metrics.add_row(k, Text(fmt(report["distribution"][k])))
    greedy = report.get("greedy") or {}
    for k in ("prompts", "identical", "mean_matched", "all_vllm_close", "top_n"):
        if k in greedy:
            metrics.add_row(f"greedy {k}", Text(fmt(greedy[k])))
    for k, why in (report.get("unavailable") or {}).items():
        metrics.add_row(Text(f"{k} (unavailable)"), Text(fmt(why)))
    if metrics.row_count:
        tables.append(metrics)
    layers = report.get("layers") or {}
    if layers.get("points"):
        first = layers.get("first_failing")
        lt = Table("point", "kind", "rel_rmse acc.", "rel_rmse iso.", "noise floor", "gate", "result",
                   title=Text(f"layers (first failing: {fmt(first)})"))
        for p in layers["points"]:
            acc, iso = p.get("accumulated") or {}, p.get("isolated") or {}
            style = "bold red reverse" if p.get("name") == first else ("red" if p.get("passed") is False else None)
            lt.add_row(Text(fmt(p.get("name"))), Text(fmt(p.get("kind"))), Text(fmt(acc.get("rel_rmse"))),
                       Text(fmt(iso.get("rel_rmse"))), Text(fmt(p.get("noise_floor"))), Text(fmt(p.get("gate"))),
                       _result_text(p.get("passed")), style=style)
        tables.append(lt)
    return tables
