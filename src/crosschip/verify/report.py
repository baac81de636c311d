"""The verify report: a versioned JSON document, a self-contained HTML page with inline SVG plots, and
the terminal tables.

report.json schema (REPORT_SCHEMA_VERSION = 1): schema_version, crosschip_version, created (UTC ISO),
verdict ("pass" | "fail"), precision (gate class), emulated (target profile or null), ref / target
(SideInfo), prompts {count, sha256, source, ...}, distribution (DistributionMetrics.to_dict() or null),
unavailable {metric: why}, greedy (GreedyMetrics.to_dict() or null), layers (layers.LayerResult.to_dict()
or null), gates [GateResult], gate_source (where the thresholds come from). Non-finite floats are written
as the strings "inf", "-inf", "nan" (strict JSON has no such numbers).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from rich.text import Text

from crosschip import __version__
from crosschip.fsio import atomic_write_bytes, atomic_write_json
from crosschip.verify.gates import DEFAULT_GATES, GateResult, Gates
from crosschip.verify.metrics import DistributionMetrics, GreedyMetrics
from crosschip.verify.types import SideInfo

REPORT_SCHEMA_VERSION = 1
_COLORS = {"accumulated": "#1f77b4", "isolated": "#ff7f0e", "gate": "#d62728", "noise floor": "#7f7f7f"}


def jsonable(obj: Any) -> Any:
    """A plain JSON value: dataclasses, paths, tensors and dtypes converted; non-finite floats as strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else ("nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf"))
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        to_dict = getattr(obj, "to_dict", None)
        return jsonable(to_dict() if callable(to_dict) else dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    return str(obj)  # Path, torch.dtype, torch.device, ...


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


# ---------------------------------------------------------------- numbers


def _num(value: Any) -> float | None:
    """A finite float, or None (missing, a non-finite marker string, a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _e(value: Any) -> str:
    """Formatted and HTML-escaped (every string from the data goes through here)."""
    return html.escape(_fmt(value), quote=True)


# ---------------------------------------------------------------- SVG plots


@dataclasses.dataclass
class Series:
    """One polyline of a chart; None / non-positive (on a log axis) values leave gaps."""

    name: str
    ys: list[float | None]
    color: str
    dash: bool = False
    markers: bool = True
    bad: list[bool] | None = None  # points drawn as red rings (failing)


_W, _H = 760, 320
_ML, _MR, _MT, _MB = 64, 150, 34, 52  # margins: left, right (legend), top, bottom


def _y_scale(values: list[float], log_y: bool) -> tuple[float, float, list[tuple[float, str]]]:
    """(low, high) of the axis in plotted units, and ticks (plotted value, label)."""
    if log_y:
        lo, hi = math.floor(min(values)), math.ceil(max(values))
        if lo == hi:
            lo, hi = lo - 1, hi + 1
        step = max(1, math.ceil((hi - lo) / 8))
        return lo, hi, [(float(k), f"1e{k}") for k in range(lo, hi + 1, step)]
    lo, hi = min(0.0, min(values)), max(values)
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / 5
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    hi = math.ceil(hi / step) * step
    ticks = [(lo + i * step, f"{lo + i * step:.3g}") for i in range(int(round((hi - lo) / step)) + 1)]
    return lo, hi, ticks


def _frame(title: str, x_label: str, y_label: str, body: str, y_ticks: list[tuple[float, str]],
           ymap: Any, x_ticks: list[tuple[float, str]]) -> str:
    pw, ph = _W - _ML - _MR, _H - _MT - _MB
    parts = [f'<svg viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f'<text x="{_ML}" y="20" class="t">{html.escape(title)}</text>',
             f'<rect x="{_ML}" y="{_MT}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for v, label in y_ticks:
        y = ymap(v)
        parts.append(f'<line x1="{_ML}" x2="{_ML + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{_ML - 6}" y="{y + 4:.1f}" text-anchor="end">{html.escape(label)}</text>')
    for x, label in x_ticks:
        parts.append(f'<text x="{x:.1f}" y="{_MT + ph + 16}" text-anchor="middle">{html.escape(label)}</text>')
    parts.append(f'<text x="{_ML + pw / 2:.1f}" y="{_H - 10}" text-anchor="middle">{html.escape(x_label)}</text>'
                 f'<text x="14" y="{_MT + ph / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {_MT + ph / 2:.1f})">{html.escape(y_label)}</text>')
    parts.append(body)
    parts.append("</svg>")
    return "".join(parts)


def _legend(series: list[Series]) -> str:
    out = []
    for i, s in enumerate(series):
        y = _MT + 12 + 18 * i
        dash = ' stroke-dasharray="5 3"' if s.dash else ""
        out.append(f'<line x1="{_W - _MR + 10}" x2="{_W - _MR + 34}" y1="{y}" y2="{y}" stroke="{s.color}" '
                   f'stroke-width="2"{dash}/><text x="{_W - _MR + 40}" y="{y + 4}">{html.escape(s.name)}</text>')
    return "".join(out)


def line_chart(title: str, series: list[Series], *, x_label: str, y_label: str, log_y: bool,
               x_labels: Sequence[str] | None = None, max_x_ticks: int = 12) -> str:
    """An SVG line chart of series over x = 0..n-1 (x_labels name the positions)."""
    n = max((len(s.ys) for s in series), default=0)

    def plotted(v: float | None) -> float | None:
        if v is None or not math.isfinite(v) or (log_y and v <= 0):
            return None
        return math.log10(v) if log_y else v

    values = [p for s in series for v in s.ys if (p := plotted(v)) is not None]
    if n == 0 or not values:
        return f'<p class="empty">{html.escape(title)}: nothing to plot</p>'
    lo, hi, y_ticks = _y_scale(values, log_y)
    pw, ph = _W - _ML - _MR, _H - _MT - _MB

    def xmap(i: float) -> float:
        return _ML + (pw * i / (n - 1) if n > 1 else pw / 2)

    def ymap(v: float) -> float:
        return _MT + ph * (1 - (v - lo) / (hi - lo))

    body = []
    for s in series:
        pts = [(xmap(i), ymap(p)) if (p := plotted(v)) is not None else None for i, v in enumerate(s.ys)]
        runs: list[list[tuple[float, float]]] = [[]]
        for pt in pts:
            if pt is None:
                runs.append([])
            else:
                runs[-1].append(pt)
        dash = ' stroke-dasharray="5 3"' if s.dash else ""
        for run in (r for r in runs if r):
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in run)
            body.append(f'<polyline points="{coords}" fill="none" stroke="{s.color}" stroke-width="1.6"{dash}/>')
        for i, pt in enumerate(pts):
            if pt is not None and (s.markers or (s.bad and s.bad[i])):
                red = bool(s.bad and s.bad[i])
                style = 'fill="none" stroke="#d62728" stroke-width="2" r="5"' if red else f'fill="{s.color}" r="2.5"'
                body.append(f'<circle cx="{pt[0]:.1f}" cy="{pt[1]:.1f}" {style}/>')
    step = max(1, math.ceil(n / max_x_ticks))
    labels = list(x_labels) if x_labels is not None else [str(i) for i in range(n)]
    x_ticks = [(xmap(i), labels[i]) for i in range(0, n, step)]
    return _frame(title, x_label, y_label, "".join(body) + _legend(series), y_ticks, ymap, x_ticks)


def kl_histogram(values: Sequence[Any], title: str = "per-token KL histogram", bins: int = 30) -> str:
    """An SVG histogram of KL values over log-spaced bins (exact zeros get their own bar at the left)."""
    finite = [v for v in (_num(x) for x in values) if v is not None]
    positive = sorted(v for v in finite if v > 0)
    zeros = len(finite) - len(positive)
    if not finite:
        return f'<p class="empty">{html.escape(title)}: nothing to plot</p>'
    lo = math.log10(positive[0]) if positive else 0.0
    hi = math.log10(positive[-1]) if positive else 1.0
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    counts = [0] * bins
    for v in positive:
        counts[min(bins - 1, int((math.log10(v) - lo) / (hi - lo) * bins))] += 1
    # Exact zeros (identical rows) get their own bar, one empty slot left of the log-spaced bins.
    lead = 2 if zeros else 0
    bars = ([zeros, 0] if zeros else []) + counts
    top = max(bars) or 1
    _, y_hi, y_ticks = _y_scale([0.0, float(top)], log_y=False)
    pw, ph = _W - _ML - _MR, _H - _MT - _MB
    width = pw / len(bars)

    def ymap(v: float) -> float:
        return _MT + ph * (1 - v / y_hi)

    body = []
    for i, c in enumerate(bars):
        if c:
            color = "#7f7f7f" if i < lead else "#1f77b4"
            body.append(f'<rect x="{_ML + i * width + 1:.1f}" y="{ymap(c):.1f}" width="{width - 2:.1f}" '
                        f'height="{_MT + ph - ymap(c):.1f}" fill="{color}"><title>{c}</title></rect>')
    x_ticks = [(_ML + width / 2, "0")] if zeros else []
    for k in range(1 if zeros else 0, 5):  # with a zero bar, its '0' label takes the first tick's place
        frac = k / 4
        x_ticks.append((_ML + lead * width + frac * (pw - lead * width), f"{10 ** (lo + frac * (hi - lo)):.1e}"))
    x_label = "KL (nats, log-spaced bins" + ("; grey bar: exactly 0)" if zeros else ")")
    return _frame(title, x_label, "tokens", "".join(body), y_ticks, ymap, x_ticks)


def _layer_chart(layers: Mapping[str, Any]) -> str:
    points = list(layers.get("points") or [])
    if not points:
        return ""

    def stat(p: Mapping[str, Any], mode: str) -> float | None:
        st = p.get(mode)
        return _num(st.get("rel_rmse")) if isinstance(st, Mapping) else None

    bad = [not p.get("passed", True) for p in points]
    series = [Series("accumulated", [stat(p, "accumulated") for p in points], _COLORS["accumulated"], bad=bad)]
    if any(isinstance(p.get("isolated"), Mapping) for p in points):
        series.append(Series("isolated", [stat(p, "isolated") for p in points], _COLORS["isolated"], bad=bad))
    series.append(Series("gate", [_num(p.get("gate")) for p in points], _COLORS["gate"], dash=True, markers=False))
    series.append(Series("noise floor", [_num(p.get("noise_floor")) for p in points], _COLORS["noise floor"],
                         dash=True, markers=False))
    names = [str(p.get("name", i)).removeprefix("layers.") for i, p in enumerate(points)]
    return line_chart("per-layer error (rel_rmse vs reference; red rings: failing points)", series,
                      x_label="comparison point (layer.attn / layer.mlp / layer)", y_label="rel_rmse (log)",
                      log_y=True, x_labels=names)


# ---------------------------------------------------------------- HTML


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px;margin:0 0 8px} h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:6px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top} th{background:#f4f4f4} .pass{color:#137333;font-weight:600} .fail{color:#c5221f;font-weight:600}
.skip{color:#777} .first td{background:#fde8e8} .emulated{background:#fff3cd;border:2px solid #d39e00;padding:10px;
font-size:18px;font-weight:700;margin:10px 0} svg text{font-size:11px;fill:#333} svg .t{font-size:13px;
font-weight:600} pre{white-space:pre-wrap;margin:0} .empty{color:#777} .muted{color:#666}
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], row_classes: Sequence[str] | None = None) -> str:
    """An HTML table; cells are already-escaped HTML."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _result_cell(passed: Any) -> str:
    if passed is None:
        return '<span class="skip">skipped</span>'
    return '<span class="pass">PASS</span>' if passed else '<span class="fail">FAIL</span>'


def _sides_html(report: Mapping[str, Any]) -> str:
    rows = []
    for role in ("ref", "target"):
        side = report.get(role) or {}
        ident = json.dumps(side.get("identity"), indent=1, sort_keys=True, default=str)
        rows.append([_e(role), _e(side.get("label")), _e(side.get("kind")), _e(side.get("full_distribution")),
                     _e(side.get("emulated")), f"<pre>{html.escape(ident)}</pre>"])
    return _table(["side", "label", "kind", "full distribution", "emulated", "identity"], rows)


_DIST_KEYS = ("kl_method", "kl_mean", "kl_mean_ci", "ci_resampled", "kl_p99", "kl_max", "top1_agreement",
              "top5_overlap", "ppl_ref", "ppl_tgt", "ppl_ratio", "tokens", "sequences")


def _distribution_html(dist: Mapping[str, Any] | None) -> str:
    if not dist:
        return '<p class="empty">not measured</p>'
    table = _table(["metric", "value"], [[_e(k), _e(dist.get(k))] for k in _DIST_KEYS if k in dist])
    per_pos = [_num(v) for v in dist.get("per_position_kl") or []]
    pos_chart = line_chart("mean KL by position", [Series("mean KL", per_pos, _COLORS["accumulated"])],
                           x_label="token position", y_label="KL (nats)", log_y=False)
    return table + kl_histogram(dist.get("kl_values") or []) + pos_chart


def _greedy_html(greedy: Mapping[str, Any] | None) -> str:
    if not greedy:
        return '<p class="empty">not measured</p>'
    summary = (f"<p>{_e(greedy.get('identical'))} of {_e(greedy.get('prompts'))} prompts identical; mean matched "
               f"length {_e(greedy.get('mean_matched'))}; vLLM top-{_e(greedy.get('top_n'))} check on all: "
               f"{_e(greedy.get('all_vllm_close'))}</p>")
    rows, classes = [], []
    for row in greedy.get("rows") or []:
        rows.append([_e(row.get("prompt")), _e(row.get("first_divergence")), _e(row.get("matched")),
                     _result_cell(row.get("vllm_close")), _e(row.get("ref_token")), _e(row.get("tgt_token")),
                     _e(row.get("note")), f"<pre>{_e(row.get('ref_text'))}</pre>",
                     f"<pre>{_e(row.get('tgt_text'))}</pre>"])
        classes.append("" if row.get("vllm_close") else "first")
    headers = ["prompt", "first divergence", "matched", "vLLM close", "ref token", "target token", "note",
               "ref text", "target text"]
    return summary + _table(headers, rows, classes)


def _layers_html(layers: Mapping[str, Any] | None) -> str:
    if not layers:
        return '<p class="empty">not run (needs both sides in-process)</p>'
    first = layers.get("first_failing")
    head = (f"<p>first failing point: <b>{_e(first)}</b> (accumulated mode: "
            f"{_e(layers.get('first_failing_accumulated'))})</p>")
    rows, classes = [], []
    for p in layers.get("points") or []:
        acc, iso = p.get("accumulated") or {}, p.get("isolated") or {}
        rows.append([_e(p.get("name")), _e(p.get("kind")), _e(acc.get("rel_rmse")), _e(iso.get("rel_rmse")),
                     _e(acc.get("cosine")), _e(acc.get("max_abs")), _e(acc.get("within_1e-3")),
                     _e(p.get("noise_floor")), _e(p.get("gate")), _result_cell(p.get("passed"))])
        classes.append("first" if p.get("name") == first else "")
    headers = ["point", "kind", "rel_rmse acc.", "rel_rmse iso.", "cosine acc.", "max_abs acc.", "within 1e-3 acc.",
               "noise floor", "gate", "result"]
    return head + _layer_chart(layers) + _table(headers, rows, classes)


def render_html(report: Mapping[str, Any]) -> str:
    """A self-contained page (inline CSS and SVG, no scripts, no external resources)."""
    verdict = str(report.get("verdict", "fail"))
    emulated = report.get("emulated")
    title = f"crosschip verify: {verdict.upper()}" + (f" (EMULATED {emulated})" if emulated else "")
    banner = ""
    if emulated:
        banner = (f'<div class="emulated">EMULATED ({_e(emulated)}): the target ran on this machine under the '
                  "profile's numerics, not on the chip itself.</div>")
    gate_rows = [[_e(g.get("name")), _e(g.get("value")), _e(g.get("threshold")), _result_cell(g.get("passed")),
                  _e(g.get("note"))] for g in report.get("gates") or []]
    prompts = report.get("prompts") or {}
    unavailable = report.get("unavailable") or {}
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f'<h1>crosschip verify: <span class="{"pass" if verdict == "pass" else "fail"}">{_e(verdict.upper())}'
        f"</span></h1>", banner,
        f'<p class="muted">precision class {_e(report.get("precision"))} &middot; created {_e(report.get("created"))}'
        f" &middot; crosschip {_e(report.get('crosschip_version'))} &middot; schema "
        f"{_e(report.get('schema_version'))}</p>",
        "<h2>Sides</h2>", _sides_html(report),
        "<h2>Prompts</h2>", _table(["field", "value"], [[_e(k), _e(v)] for k, v in prompts.items()]),
        "<h2>Gates</h2>", _table(["gate", "value", "threshold", "result", "note"], gate_rows),
        f'<p class="muted">{_e(report.get("gate_source"))}</p>',
    ]
    if unavailable:
        parts += ["<h2>Unavailable</h2>", _table(["metric", "why"], [[_e(k), _e(v)] for k, v in unavailable.items()])]
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
    title = f"verify ({report.get('precision')} gates)" + (f" - EMULATED ({emulated})" if emulated else "")
    gates = Table("gate", "value", "threshold", "result", "note", title=Text(title))
    for g in report.get("gates") or []:
        gates.add_row(Text(_fmt(g.get("name"))), Text(_fmt(g.get("value"))), Text(_fmt(g.get("threshold"))),
                      _result_text(g.get("passed")), Text(_fmt(g.get("note"))))
    tables = [gates]
    metrics = Table("metric", "value", title="metrics")
    for k in _DIST_KEYS:
        if k in (report.get("distribution") or {}):
            metrics.add_row(k, Text(_fmt(report["distribution"][k])))
    greedy = report.get("greedy") or {}
    for k in ("prompts", "identical", "mean_matched", "all_vllm_close", "top_n"):
        if k in greedy:
            metrics.add_row(f"greedy {k}", Text(_fmt(greedy[k])))
    for k, why in (report.get("unavailable") or {}).items():
        metrics.add_row(Text(f"{k} (unavailable)"), Text(_fmt(why)))
    if metrics.row_count:
        tables.append(metrics)
    layers = report.get("layers") or {}
    if layers.get("points"):
        first = layers.get("first_failing")
        lt = Table("point", "kind", "rel_rmse acc.", "rel_rmse iso.", "noise floor", "gate", "result",
                   title=Text(f"layers (first failing: {_fmt(first)})"))
        for p in layers["points"]:
            acc, iso = p.get("accumulated") or {}, p.get("isolated") or {}
            style = "bold red reverse" if p.get("name") == first else ("red" if p.get("passed") is False else None)
            lt.add_row(Text(_fmt(p.get("name"))), Text(_fmt(p.get("kind"))), Text(_fmt(acc.get("rel_rmse"))),
                       Text(_fmt(iso.get("rel_rmse"))), Text(_fmt(p.get("noise_floor"))), Text(_fmt(p.get("gate"))),
                       _result_text(p.get("passed")), style=style)
        tables.append(lt)
    return tables
