"""The run report as one self-contained HTML file: tables, and plots as inline SVG.

``onnxcomp optimize --report out.html`` writes it (``--report out.json`` the JSON it is made
from), and ``onnxcomp report run.json -o out.html`` turns a saved JSON report into one. No
script, no external file, no network: it opens anywhere, and diffs as text.

Contents: the before / after table (params, MACs, size, measured latency, fidelity); per pass,
every rewritten layer (what was done, params and MACs, measured latency alone, error) and
every skipped one with its reason; plots of per-layer latency before and after, of the error
per layer, and of the path the search walked (the speedups it measured on the way; for
``--auto``, every plan's speed against its loss).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from onnxcomp.report import human

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #1d2327; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border-bottom: 1px solid #dde; padding: .25em .7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.text { text-align: left; }
.note { color: #555; } .warn { color: #a15c00; }
svg { display: block; margin: .5em 0 1.5em; } svg text { font: 11px system-ui, sans-serif; }
"""
BEFORE, AFTER = "#9aa5b1", "#2e7d32"


def render(doc: Mapping[str, Any]) -> str:
    """The HTML page of a report (the JSON ``optimize --report`` writes)."""
    title = (f"{_name(doc.get('input', 'model'))} \u2192 {_name(doc.get('output', ''))}")
    parts = [f"<h1>onnxcomp: {_e(title)}</h1>", _summary(doc)]
    for step in doc.get("steps", []):
        parts.append(_step(step))
    if "auto" in doc:
        parts.append(_auto(doc["auto"]))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _summary(doc: Mapping[str, Any]) -> str:
    before, after = doc.get("cost_before", {}), doc.get("cost_after", {})
    size = doc.get("file_size", {})
    rows = [("params", human(before.get("params", 0)), human(after.get("params", 0))),
            ("MACs (per sample)", human(before.get("macs", 0)), human(after.get("macs", 0))),
            ("file size", human(size.get("before", 0), "B"), human(size.get("after", 0), "B"))]
    lat = doc.get("latency")
    if lat:
        rows.append((f"latency ({lat['provider']}, {lat['threads']} thread, median)",
                     f"{lat['before_ms']:.3f} ms",
                     f"{lat['after_ms']:.3f} ms: {lat['speedup']:.2f}x "
                     f"(p10 {lat['speedup_p10']:.2f}, p90 {lat['speedup_p90']:.2f})"))
    fid = doc.get("fidelity_vs_original") or {}
    if fid:
        kept = fid.get("decision_agreement") or fid.get("score_agreement")
        rows.append(("fidelity vs original", "",
                     f"rel. L2 error {fid.get('rel_l2', 0):.4g}"
                     + (f", kept on {kept:.1%} of samples" if kept is not None else "")))
    calib = doc.get("calibration", {})
    note = (f"<p class=\"note\">Calibration: {_e(calib.get('source', ''))}, "
            f"{calib.get('samples', '?')} samples"
            + (" (synthetic: fidelity figures are not meaningful)" if calib.get("synthetic")
               else "") + f". Measured on {_e(doc.get('measured_on', 'this machine'))}.</p>")
    return "<h2>Before and after</h2>" + _table(["", "before", "after"], rows) + note


def _step(step: Mapping[str, Any]) -> str:
    report = step.get("report", {})
    applied, skipped = report.get("applied", []), report.get("skipped", [])
    out = [f"<h2>{_e(step.get('pass', '?'))}"
           f"{' (lossless)' if step.get('lossless') else ''}: {len(applied)} rewritten, "
           f"{len(skipped)} skipped, {step.get('seconds', 0):.1f} s</h2>"]
    for warning in report.get("warnings", []):
        out.append(f"<p class=\"warn\">warning: {_e(_text(warning))}</p>")
    for note in report.get("notes", []):
        out.append(f"<p class=\"note\">{_e(_text(note))}</p>")
    if applied:
        rows = []
        for c in applied:
            d = c.get("details", {})
            ms = (f"{d['latency_before_ms']:.3f} \u2192 {d['latency_after_ms']:.3f}"
                  if "latency_before_ms" in d and "latency_after_ms" in d else "-")
            rows.append((c["node"], c["op_type"], c["what"],
                         f"{human(c['params_before'])} \u2192 {human(c['params_after'])}",
                         f"{human(c['macs_before'])} \u2192 {human(c['macs_after'])}", ms,
                         "-" if c.get("error") is None else f"{c['error']:.3g}"))
        out.append(_table(["layer", "op", "done", "params", "MACs", "ms alone", "error"],
                          rows, text_columns=(1, 2)))
        timed = [c for c in applied if "latency_before_ms" in c.get("details", {})]
        if timed:
            out.append("<p>Latency of each rewritten layer alone, before and after (ms):</p>")
            out.append(_bars([c["node"] for c in timed],
                             [c["details"]["latency_before_ms"] for c in timed],
                             [c["details"]["latency_after_ms"] for c in timed], "ms"))
        elif any(c["macs_before"] or c["macs_after"] for c in applied):
            out.append("<p>MACs of each rewritten layer, before and after:</p>")
            out.append(_bars([c["node"] for c in applied], [c["macs_before"] for c in applied],
                             [c["macs_after"] for c in applied], "MACs"))
        errors = [c for c in applied if c.get("error") is not None]
        if errors:
            out.append("<p>Error of each rewritten layer (relative, on calibration data):</p>")
            out.append(_bars([c["node"] for c in errors], None,
                             [c["error"] for c in errors], "error"))
    path = report.get("metrics", {}).get("probe_speedups")
    if path:
        out.append("<p>The search's path: whole-model speedup measured at each allocation "
                   "it probed (x: allocation, mildest first):</p>")
        points = sorted((int(k), float(v)) for k, v in path.items())
        out.append(_scatter(points, "allocation", "speedup", line=True))
    if skipped:
        out.append("<details><summary>skipped layers</summary>")
        out.append(_table(["layer", "op", "reason", "detail"],
                          [(s["node"], s["op_type"], s.get("reason_text", s["reason"]),
                            s.get("detail", "")) for s in skipped], text_columns=(1, 2, 3)))
        out.append("</details>")
    return "\n".join(out)


def _auto(auto: Mapping[str, Any]) -> str:
    plans = [p for p in auto.get("plans", []) if p.get("drop") is not None]
    out = [f"<h2>--auto: {_e(auto.get('chosen', ''))}</h2>",
           f"<p>{_e(auto.get('why', ''))}</p>",
           _table(["plan", "passes", "speedup (p10-p90)", "loss (metric)"],
                  [(p["plan"], " > ".join(p["passes"]),
                    f"{p['speedup']:.2f}x ({p['speedup_p10']:.2f}-{p['speedup_p90']:.2f})",
                    f"{p['drop']:.4g} ({p['drop_metric']})") for p in plans],
                  text_columns=(1,))]
    if plans:
        out.append("<p>Every plan: measured speedup against loss:</p>")
        out.append(_scatter([(p["speedup"], p["drop"]) for p in plans], "speedup", "loss",
                            labels=[p["plan"] for p in plans]))
    return "\n".join(out)


# ----------------------------------------------------------------------------- building blocks


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
           text_columns: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    text = ' class="text"'
    body = "".join("<tr>" + "".join(
        f"<td{text if i in text_columns else ''}>{_e(v)}</td>"
        for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _bars(labels: Sequence[str], before: Sequence[float] | None, after: Sequence[float],
          unit: str) -> str:
    """Horizontal bars per label: grey before (when given), green after."""
    top = max([*(before or []), *after, 1e-12])
    row, left, width = 22, 230, 560
    height = row * len(labels) + 10
    parts = [f"<svg width=\"{left + width + 90}\" "
             f"height=\"{height}\" role=\"img\" aria-label=\"{_e(unit)} per layer\">"]
    for i, label in enumerate(labels):
        y = 5 + i * row
        parts.append(f"<text x=\"{left - 6}\" y=\"{y + 14}\" text-anchor=\"end\">"
                     f"{_e(_short(label))}</text>")
        if before is not None:
            w = width * before[i] / top
            parts.append(f"<rect x=\"{left}\" y=\"{y + 2}\" width=\"{w:.1f}\" height=\"8\" "
                         f"fill=\"{BEFORE}\"><title>before {before[i]:.4g}</title></rect>")
        w = width * after[i] / top
        y_after = y + 10 if before is not None else y + 4
        parts.append(f"<rect x=\"{left}\" y=\"{y_after}\" width=\"{w:.1f}\" height=\"8\" "
                     f"fill=\"{AFTER}\"><title>{after[i]:.4g}</title></rect>")
        parts.append(f"<text x=\"{left + w + 4:.1f}\" y=\"{y_after + 8}\">{after[i]:.3g}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _scatter(points: Sequence[tuple[float, float]], xlabel: str, ylabel: str,
             labels: Sequence[str] | None = None, line: bool = False) -> str:
    """Points (x, y) on axes from their ranges; a polyline through them when ``line``."""
    w, h, pad = 520, 260, 45
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(0.0, min(ys)), max(ys) if max(ys) > min(0.0, min(ys)) else 1.0

    def sx(x: float) -> float:
        return pad + (w - 2 * pad) * (x - x0) / (x1 - x0)

    def sy(y: float) -> float:
        return h - pad - (h - 2 * pad) * (y - y0) / (y1 - y0)

    parts = [f"<svg width=\"{w}\" height=\"{h}\" "
             f"role=\"img\" aria-label=\"{_e(ylabel)} against {_e(xlabel)}\">",
             f"<line x1=\"{pad}\" y1=\"{h - pad}\" x2=\"{w - pad}\" y2=\"{h - pad}\" "
             "stroke=\"#888\"/>",
             f"<line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{h - pad}\" stroke=\"#888\"/>",
             f"<text x=\"{w / 2}\" y=\"{h - 8}\" text-anchor=\"middle\">{_e(xlabel)}</text>",
             f"<text x=\"12\" y=\"{h / 2}\" transform=\"rotate(-90 12 {h / 2})\" "
             f"text-anchor=\"middle\">{_e(ylabel)}</text>",
             f"<text x=\"{pad - 4}\" y=\"{sy(y1) + 4:.1f}\" text-anchor=\"end\">{y1:.3g}</text>",
             f"<text x=\"{pad - 4}\" y=\"{sy(y0) + 4:.1f}\" text-anchor=\"end\">{y0:.3g}</text>"]
    if line and len(points) > 1:
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        parts.append(f"<polyline points=\"{path}\" fill=\"none\" stroke=\"{AFTER}\"/>")
    for i, (x, y) in enumerate(points):
        parts.append(f"<circle cx=\"{sx(x):.1f}\" cy=\"{sy(y):.1f}\" r=\"4\" fill=\"{AFTER}\">"
                     f"<title>{x:.3g}, {y:.3g}</title></circle>")
        text = labels[i] if labels else f"{y:.3g}"
        parts.append(f"<text x=\"{sx(x) + 6:.1f}\" y=\"{sy(y) - 6:.1f}\">{_e(text)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _e(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        value = "-"
    return html.escape(str(value))


def _text(note: Any) -> str:
    return note["text"] if isinstance(note, Mapping) else str(note)


def _name(path: str) -> str:
    return str(path).replace("\\", "/").rsplit("/", 1)[-1]


def _short(label: str, width: int = 34) -> str:
    return label if len(label) <= width else "\u2026" + label[-(width - 1):]
