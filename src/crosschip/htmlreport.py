"""Self-contained HTML report pieces shared by verify and probe: strict-JSON values, escaping, SVG charts.

No external JS, CSS or fonts: every plot is inline SVG drawn here, every data string is escaped.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch


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


# ---------------------------------------------------------------- numbers


def num(value: Any) -> float | None:
    """A finite float, or None (missing, a non-finite marker string, a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def esc(value: Any) -> str:
    """Formatted and HTML-escaped (every string from the data goes through here)."""
    return html.escape(fmt(value), quote=True)


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
    finite = [v for v in (num(x) for x in values) if v is not None]
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


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px;margin:0 0 8px} h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:6px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top} th{background:#f4f4f4} .pass{color:#137333;font-weight:600} .fail{color:#c5221f;font-weight:600}
.skip{color:#777} .first td{background:#fde8e8} .emulated{background:#fff3cd;border:2px solid #d39e00;padding:10px;
font-size:18px;font-weight:700;margin:10px 0} svg text{font-size:11px;fill:#333} svg .t{font-size:13px;
font-weight:600} pre{white-space:pre-wrap;margin:0} .empty{color:#777} .muted{color:#666}
"""


def html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], row_classes: Sequence[str] | None = None) -> str:
    """An HTML table; cells are already-escaped HTML."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"
