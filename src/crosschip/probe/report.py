"""The probe compare report: report.json, a self-contained report.html (loss curves, drift heat map,
first divergence and NaN/Inf origins) and short terminal tables.

report.json schema (PROBE_REPORT_SCHEMA_VERSION = 1): schema_version, crosschip_version, created (UTC ISO),
then every field of ProbeComparison.to_dict(): run_a / run_b (path, device, precision, mode, rows, steps,
modules, nonfinite_origin, overflow_origin, loss_nonfinite_step, rank, world_size, grad_scope), noise, margin,
unit_roundoff, coarser_precision, aligned_rows, aligned_steps, only_in_a / only_in_b, first_divergence, divergent_rows,
verdict ("match" | "diverged"), reasons, loss, drift, worst, noise_rel, notes. Non-finite floats are the
strings "inf", "-inf", "nan".
"""

from __future__ import annotations

import datetime as _dt
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from crosschip import __version__
from crosschip.fsio import atomic_write_bytes, atomic_write_json, check_output_dir
from crosschip.htmlreport import CSS, Series, esc, fmt, html_table, jsonable, line_chart, num
from crosschip.probe.compare import ProbeComparison

PROBE_REPORT_SCHEMA_VERSION = 1
_A_COLOR, _B_COLOR = "#1f77b4", "#ff7f0e"
_LOG_LO, _LOG_HI = -4.0, 4.0  # heat map colour scale: ratio 1e-4 .. 1e4 (1 = the tolerance)
_CELL_H, _NAME_W, _MAP_W = 13, 300, 640


def build_probe_report(cmp: ProbeComparison | Mapping[str, Any]) -> dict[str, Any]:
    """The report as a plain JSON-able dict (what report.json holds and the HTML / terminal read)."""
    body = cmp.to_dict() if isinstance(cmp, ProbeComparison) else dict(cmp)
    head = {"schema_version": PROBE_REPORT_SCHEMA_VERSION, "crosschip_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return jsonable({**head, **{k: v for k, v in body.items() if k not in head}})


def write_probe_report(cmp: ProbeComparison | Mapping[str, Any], out_dir: Path, *,
                       overwrite: bool = False) -> dict[str, Path]:
    """Write report.json and report.html into out_dir (refused if it exists, unless overwrite)."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    report = build_probe_report(cmp)
    paths = {"json": out_dir / "report.json", "html": out_dir / "report.html"}
    atomic_write_json(paths["json"], report)
    atomic_write_bytes(paths["html"], render_html(report).encode("utf-8"))
    return paths


# ---------------------------------------------------------------- heat map


def _ratio(value: Any) -> float | None:
    """A drift ratio from the JSON form: a number, "inf", or None (not recorded in both runs)."""
    if value == "inf":
        return math.inf
    return num(value) if value is not None else None


def _mix(c0: tuple[int, int, int], c1: tuple[int, int, int], t: float) -> str:
    r, g, b = (round(x0 + (x1 - x0) * t) for x0, x1 in zip(c0, c1, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def _color(ratio: float) -> str:
    """Within tolerance: white -> blue with log10(ratio); beyond: yellow -> dark red; inf: black; 0: grey."""
    if ratio == 0:
        return "#f2f2f2"
    if math.isinf(ratio):
        return "#000000"
    t = (min(max(math.log10(ratio), _LOG_LO), _LOG_HI) - _LOG_LO) / (_LOG_HI - _LOG_LO)
    if ratio <= 1:
        return _mix((255, 255, 255), (66, 133, 200), t / 0.5)
    return _mix((253, 216, 53), (150, 0, 0), (t - 0.5) / 0.5)


def _short(name: str, limit: int = 46) -> str:
    return name if len(name) <= limit else "\u2026" + name[-(limit - 1):]


def _heat_legend(x: float, y: float) -> str:
    parts, n, w = [], 32, 8
    for k in range(n):
        ratio = 10 ** (_LOG_LO + (k + 0.5) * (_LOG_HI - _LOG_LO) / n)
        parts.append(f'<rect x="{x + k * w}" y="{y}" width="{w}" height="10" fill="{_color(ratio)}"/>')
    for exp in range(int(_LOG_LO), int(_LOG_HI) + 1, 2):
        tx = x + (exp - _LOG_LO) / (_LOG_HI - _LOG_LO) * n * w
        parts.append(f'<text x="{tx:.1f}" y="{y + 22}" text-anchor="middle">1e{exp}</text>')
    tail = x + n * w + 12
    parts.append(f'<rect x="{tail}" y="{y}" width="10" height="10" fill="#000000"/>'
                 f'<text x="{tail + 14}" y="{y + 9}">count differs / non-finite</text>'
                 f'<rect x="{tail + 180}" y="{y}" width="10" height="10" fill="#f2f2f2" stroke="#ccc"/>'
                 f'<text x="{tail + 194}" y="{y + 9}">identical</text>')
    return "".join(parts)


def heat_map(drift: Mapping[str, Any], marks: Sequence[tuple[str, str, str]] = ()) -> str:
    """SVG heat map: one row per (module, kind), one column per step (or step bin); marks = (module, kind, column)
    cells outlined in red (first divergence, origins)."""
    rows, kinds = list(drift.get("rows") or []), list(drift.get("kinds") or [])
    cols, values = list(drift.get("columns") or []), list(drift.get("values") or [])
    if not rows or not cols:
        return '<p class="empty">drift heat map: nothing to plot</p>'
    cw = max(2.0, _MAP_W / len(cols))
    top, width = 40, _NAME_W + cw * len(cols) + 20
    height = top + _CELL_H * len(rows) + 70
    parts = [f'<svg viewBox="0 0 {width:.0f} {height}" width="{width:.0f}" height="{height}" role="img" '
             f'aria-label="per-module drift heat map">',
             f'<text x="{_NAME_W}" y="16" class="t">per-module drift: max over statistics of |rel diff| / tolerance '
             f'(log colour scale)</text>']
    marked = {(m, k, c) for m, k, c in marks}
    for r, (name, kind, line) in enumerate(zip(rows, kinds, values, strict=True)):
        y = top + r * _CELL_H
        label = _short(str(name)) + (" (grad)" if kind == "grad" else "")
        parts.append(f'<text x="{_NAME_W - 6}" y="{y + _CELL_H - 3}" text-anchor="end">'
                     f"<title>{esc(name)} ({esc(kind)})</title>{html.escape(label)}</text>")
        for c, value in enumerate(line):
            ratio = _ratio(value)
            if ratio is None:
                continue
            x = _NAME_W + c * cw
            stroke = ' stroke="#d62728" stroke-width="2"' if (name, kind, cols[c]) in marked else ""
            parts.append(f'<rect x="{x:.1f}" y="{y}" width="{cw:.1f}" height="{_CELL_H}" fill="{_color(ratio)}"'
                         f"{stroke}><title>{esc(name)} ({esc(kind)}), step {esc(cols[c])}: {esc(ratio)}</title></rect>")
    axis_y = top + _CELL_H * len(rows)
    every = max(1, math.ceil(len(cols) / 12))
    for c in range(0, len(cols), every):
        x = _NAME_W + (c + 0.5) * cw
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 14}" text-anchor="middle">{esc(cols[c])}</text>')
    parts.append(f'<text x="{_NAME_W + cw * len(cols) / 2:.1f}" y="{axis_y + 30}" text-anchor="middle">step</text>')
    parts.append(_heat_legend(_NAME_W, axis_y + 42))
    parts.append("</svg>")
    return "".join(parts)


def _marks(report: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Heat map cells to outline: the first divergence and B's origins, at their step's column."""
    drift = report.get("drift") or {}
    cols = list(drift.get("columns") or [])

    def column(step: Any) -> str | None:
        for label in cols:
            lo, _, hi = str(label).partition("-")
            if lo.isdigit() and int(lo) <= int(step) <= int(hi or lo):
                return str(label)
        return None

    found = [report.get("first_divergence")]
    found += [(report.get("run_b") or {}).get(k) for k in ("nonfinite_origin", "overflow_origin")]
    out = []
    for row in found:
        if isinstance(row, Mapping) and (col := column(row.get("step"))) is not None:
            out.append((str(row.get("module")), str(row.get("kind")), col))
    return out


# ---------------------------------------------------------------- HTML


def _findings(report: Mapping[str, Any]) -> list[list[str]]:
    """Rows (finding, run, step, module, kind, detail) as plain strings; the HTML escapes them."""
    rows = []
    div = report.get("first_divergence")
    if isinstance(div, Mapping):
        detail = (f"{fmt(div.get('statistic'))}: A {fmt(div.get('a'))}, B {fmt(div.get('b'))}, rel diff "
                  f"{fmt(div.get('rel_diff'))} > tol {fmt(div.get('tolerance'))} "
                  f"({fmt(div.get('tolerance_source'))})")
        rows.append(["first divergence", "A vs B", fmt(div.get("step")), fmt(div.get("module")),
                     fmt(div.get("kind")), detail])
    else:
        rows.append(["first divergence", "A vs B", "-", "-", "-", "none: every aligned row within tolerance"])
    for side in ("a", "b"):
        run = report.get(f"run_{side}") or {}
        for key, label in (("nonfinite_origin", "first NaN/Inf origin"), ("overflow_origin", "first overflow")):
            o = run.get(key)
            if isinstance(o, Mapping):
                detail = (f"nan {fmt(o.get('nan'))}, inf {fmt(o.get('inf'))}, over fp16 {fmt(o.get('over_fp16'))}, "
                          f"absmax {fmt(o.get('absmax'))}, input non-finite {fmt(o.get('in_nonfinite'))}; "
                          f"{fmt(o.get('note'))}")
                rows.append([label, side.upper(), fmt(o.get("step")), fmt(o.get("module")), fmt(o.get("kind")),
                             detail])
            else:
                rows.append([label, side.upper(), "-", "-", "-", "none"])
        if run.get("loss_nonfinite_step") is not None:
            rows.append(["non-finite loss", side.upper(), fmt(run.get("loss_nonfinite_step")), "-", "-", ""])
    return rows


def _runs_rows(report: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for side in ("a", "b"):
        run = report.get(f"run_{side}") or {}
        path = str(run.get("path"))
        if int(run.get("world_size") or 1) > 1:
            path += f" [rank {run.get('rank')} of {run.get('world_size')}]"
        rows.append([esc(side.upper()), esc(path), esc(run.get("device")), esc(run.get("precision")),
                     esc(run.get("mode")), esc(run.get("steps")), esc(run.get("modules")), esc(run.get("rows"))])
    return rows


def _loss_charts(report: Mapping[str, Any]) -> str:
    loss = report.get("loss") or {}
    steps = [str(s) for s in loss.get("steps") or []]
    names = {side: f"{side.upper()} {fmt((report.get(f'run_{side}') or {}).get('device'))} "
                   f"{fmt((report.get(f'run_{side}') or {}).get('precision'))}" for side in ("a", "b")}
    charts = []
    for key, title, y_label in (("", "loss", "loss"), ("grad_norm_", "gradient norm", "grad norm")):
        series = [Series(names["a"], [num(v) for v in loss.get(f"{key}a") or []], _A_COLOR, markers=False),
                  Series(names["b"], [num(v) for v in loss.get(f"{key}b") or []], _B_COLOR, dash=True,
                         markers=False)]
        charts.append(line_chart(title, series, x_label="step", y_label=y_label, log_y=False, x_labels=steps))
    return "".join(charts)


def render_html(report: Mapping[str, Any]) -> str:
    """A self-contained page (inline CSS and SVG, no scripts, no external resources)."""
    verdict = str(report.get("verdict", "diverged"))
    title = f"crosschip probe compare: {verdict.upper()}"
    only = [[esc(side.upper()), esc(what), esc(", ".join(str(v) for v in items[:50]) + (" ..." * (len(items) > 50)))]
            for side in ("a", "b") for what, items in (report.get(f"only_in_{side}") or {}).items() if items]
    worst = [[esc(w.get("module")), esc(w.get("kind")), esc(w.get("max_ratio")), esc(w.get("at"))]
             for w in report.get("worst") or []]
    tol = ("tolerance = max(margin &times; noise, margin &times; u &times; &radic;step); "
           f"margin {esc(report.get('margin'))}, "
           f"u {esc(report.get('unit_roundoff'))} ({esc(report.get('coarser_precision'))}), noise run "
           f"{esc(report.get('noise') or 'none')}")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f'<h1>crosschip probe compare: <span class="{"pass" if verdict == "match" else "fail"}">'
        f"{esc(verdict.upper())}</span></h1>",
        f'<p class="muted">created {esc(report.get("created"))} &middot; '
        f'crosschip {esc(report.get("crosschip_version"))}'
        f" &middot; schema {esc(report.get('schema_version'))}</p>",
        "".join(f"<p>{esc(r)}</p>" for r in report.get("reasons") or []),
        "<h2>Runs</h2>", html_table(["run", "path", "device", "precision", "mode", "steps", "modules", "rows"],
                                _runs_rows(report)),
        f"<p>{esc(report.get('aligned_rows'))} rows aligned over {esc(report.get('aligned_steps'))} steps; "
        f"{esc(report.get('divergent_rows'))} out of tolerance. {tol}</p>",
        "<h2>First divergence and NaN/Inf origins</h2>",
        html_table(["finding", "run", "step", "module", "kind", "detail"],
               [[html.escape(cell) for cell in row] for row in _findings(report)]),
        "<h2>Loss</h2>", _loss_charts(report),
        "<h2>Drift per module</h2>", heat_map(report.get("drift") or {}, _marks(report)),
    ]
    if worst:
        parts += ["<h3>Largest drift</h3>", html_table(["module", "kind", "max ratio", "at step"], worst)]
    if only:
        parts += ["<h2>Recorded in one run only</h2>", html_table(["run", "what", "items"], only)]
    parts += [f'<p class="muted">{esc(n)}</p>' for n in report.get("notes") or []]
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------- terminal


def render_table(report: Mapping[str, Any]) -> list[Table]:
    """Terminal tables: the findings (first divergence, origins) and the modules that drift most."""
    findings = Table("finding", "run", "step", "module", "kind", "detail",
                     title=Text(f"probe compare: {str(report.get('verdict', '')).upper()}"))
    for row in _findings(report):
        findings.add_row(*(Text(cell) for cell in row))
    tables = [findings]
    worst = report.get("worst") or []
    if worst:
        table = Table("module", "kind", "max rel diff / tol", "at step", title="largest drift")
        for w in worst[:5]:
            table.add_row(Text(fmt(w.get("module"))), Text(fmt(w.get("kind"))), Text(fmt(w.get("max_ratio"))),
                          Text(fmt(w.get("at"))))
        tables.append(table)
    return tables


def _rank_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """Per-rank rows (rank, steps, grad scope, first NaN/Inf, first divergence vs the reference) as strings."""
    pairs = {p.get("rank"): p for p in report.get("pairs") or []}
    rows = []
    for s in report.get("ranks") or []:
        o, pair = s.get("nonfinite_origin"), pairs.get(s.get("rank"))
        nan = f"step {o.get('step')}, {o.get('module')} ({o.get('kind')})" if isinstance(o, Mapping) else "none"
        d = pair.get("first_divergence") if pair is not None else None
        div = "reference" if pair is None else (
            f"step {d.get('step')}, {d.get('module')} ({d.get('kind')}): {d.get('statistic')}"
            if isinstance(d, Mapping) else "none")
        steps = s.get("steps") or []
        span = f"{steps[0]}..{steps[-1]}" if steps else "-"
        rows.append([fmt(s.get("rank")), span, fmt(s.get("grad_scope")), nan, div])
    return rows


def render_ranks_table(report: Mapping[str, Any]) -> list[Table]:
    """Terminal tables of `probe ranks`: the first rank/step/module to go wrong, then one row per rank."""
    findings = Table("finding", "rank", "step", "module", "kind", "detail",
                     title=Text(f"probe ranks: {str(report.get('verdict', '')).upper()}"))
    for key in ("first_nonfinite", "first_divergence"):
        f = report.get(key)
        if isinstance(f, Mapping):
            findings.add_row(*(Text(fmt(f.get(k))) for k in ("finding", "rank", "step", "module", "kind", "detail")))
        else:
            label = "first NaN/Inf" if key == "first_nonfinite" else "first divergence"
            findings.add_row(Text(label), *(Text("-") for _ in range(4)), Text("none"))
    against = f"first divergence vs rank {fmt(report.get('reference_rank'))}"
    per_rank = Table("rank", "steps", "grads", "first NaN/Inf", against, title="per rank")
    for row in _rank_rows(report):
        per_rank.add_row(*(Text(cell) for cell in row))
    return [findings, per_rank]
