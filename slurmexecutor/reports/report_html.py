"""A run's report as one self-contained HTML page: inline CSS, the charts drawn by the
vendored uPlot inlined (report_charts.py), the task timeline as an SVG drawn here, and
(live pages only) a few lines of script that reload the report in place. Nothing is
fetched from the network when the page is viewed."""

from __future__ import annotations

import html
import json
import time

from slurmexecutor.reports import report_charts as charts
from slurmexecutor.reports.report_data import ReportData, Span

WIDTH = 1100  # the timeline's drawing width, pixels
LABEL = 150  # room for task labels at the left
CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:22px 0 6px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:right;border-bottom:1px solid #eee}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.bad td{background:#fde8e8}.counts span{margin-right:14px}.live{color:#080;font-weight:bold}
pre{background:#f7f7f7;padding:6px;max-height:240px;overflow:auto;font-size:12px}
code{background:#f1f1f1;padding:1px 4px}.legend span{margin-right:12px}
.sw{display:inline-block;width:12px;height:10px;margin-right:4px;vertical-align:middle}
details{margin:6px 0}summary{cursor:pointer;font-weight:bold;color:#b00}
svg text{font-size:11px;fill:#333}.grid{stroke:#eee}
"""
COLORS = {"queue": "#e2e2e2", "chunk": "#4a7fc1", "call": "#7aa6db", "failed": "#d62728",
          "backup": "#9467bd", "lost": "#f4a3a3", "warm": "#ff9f1c"}
LIVE_SCRIPT = """
setInterval(function(){fetch(location.href,{cache:'no-store'})
.then(function(r){return r.ok?r.text():null;},function(){return null;})
.then(function(t){if(t===null)return;var d=new DOMParser().parseFromString(t,'text/html');
document.getElementById('report').replaceWith(d.getElementById('report'));
window.slurmexecutorCharts();});},%d);
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def seconds(value: float) -> str:
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    if value >= 60:
        return f"{value / 60:.1f} min"
    return f"{value:.3g} s" if value >= 0.001 else f"{value * 1000:.2g} ms"


def render(data: ReportData, refresh: float | None = None) -> str:
    """The page; `refresh` (seconds) makes it reload its report while open (--serve)."""
    body = "".join([
        _header(data), _section("timeline", "Timeline of tasks", _timeline(data)),
        _section("progress", "Calls finished and tasks running", charts.progress(data)),
        _section("durations", "Call durations", _durations(data)),
        _section("batches", "Queue wait vs run time per batch", _batches(data)),
        _section("nodes", "Nodes", _nodes(data)),
        _section("failures", f"Failures ({sum(g.count for g in data.failures)})",
                 _failures(data)),
        _section("settings", "Run settings", _settings(data))])
    script = f"<script>{LIVE_SCRIPT % int(refresh * 1000)}</script>" if refresh else ""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>slurmexecutor run "
            f"{esc(data.run_id)}</title>{charts.head()}<style>{CSS}</style></head><body>"
            f"<div id='report'>{body}</div>{charts.draw_script()}{script}</body></html>")


def _section(name: str, title: str, content: str) -> str:
    return f"<section id='{name}'><h2>{esc(title)}</h2>{content}</section>"


def _header(data: ReportData) -> str:
    counts = "".join(f"<span>{esc(name)}: <b id='{esc(name)}'>{count}</b></span>"
                     for name, count in data.counts.items() if count or name == "done")
    state = ("<span class='live'>live</span>" if data.live else "finished")
    return (f"<h1>slurmexecutor run {esc(data.run_id)}</h1><div>{state} · "
            f"{esc(', '.join(data.functions) or '-')} · {data.total} calls · "
            f"{len(data.rows)} tasks · {data.warm_joins} warm joins · {data.retried} "
            f"retried · {data.backups} backups · report of "
            f"{esc(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(data.now)))}</div>"
            f"<div class='counts'>{counts}</div>")


def _legend(*names: str) -> str:
    return "<div class='legend'>" + "".join(
        f"<span><i class='sw' style='background:{COLORS[name]}'></i>{esc(label)}</span>"
        for name, label in (n.split(":", 1) for n in names)) + "</div>"


def _rect(x: float, y: float, w: float, h: float, color: str, tip: str = "",
          extra: str = "") -> str:
    title = f"<title>{esc(tip)}</title>" if tip else ""
    return (f"<rect x='{x:.1f}' y='{y:.1f}' width='{max(w, 0.6):.1f}' height='{h:.1f}' "
            f"fill='{color}'{extra}>{title}</rect>")


def _timeline(data: ReportData) -> str:
    if not data.rows:
        return "<p>No task has started yet.</p>"
    t0, t1 = data.start, data.end
    scale = (WIDTH - LABEL - 10) / max(t1 - t0, 1e-3)
    row_h = 16 if len(data.rows) <= 60 else max(2, 900 // len(data.rows))
    top = 18
    height = top + row_h * len(data.rows) + 4
    x = lambda t: LABEL + (t - t0) * scale
    out = [(f"<svg id='timeline-svg' width='{WIDTH}' height='{height}' xmlns="
           "'http://www.w3.org/2000/svg'>")]
    for tick in _ticks(t1 - t0):
        out.append(f"<line class='grid' x1='{x(t0 + tick):.1f}' x2='{x(t0 + tick):.1f}' "
                   f"y1='{top}' y2='{height}'/><text x='{x(t0 + tick):.1f}' y='12'>"
                   f"{esc(seconds(tick) if tick else '0')}</text>")
    bar = max(1.0, row_h - 3)
    for number, row in enumerate(data.rows):
        y = top + number * row_h
        if row_h >= 10:
            mark = " ↪warm" if row.warm else ""
            out.append(f"<text x='2' y='{y + row_h - 4}'>{esc(row.label)} "
                       f"{esc(row.host[:12])}{mark}</text>")
        if row.queued is not None and row.start:
            out.append(_rect(x(row.queued), y, (row.start - row.queued) * scale, bar,
                             COLORS["queue"], f"task {row.label} ({row.ref}) waited "
                             f"{seconds(row.start - row.queued)} in the queue"))
        if row.warm and row.start:
            out.append(f"<path d='M{x(row.start):.1f} {y}l4 {bar / 2:.1f}l-4 {bar / 2:.1f}z' "
                       f"fill='{COLORS['warm']}'><title>task {esc(row.label)}: a warm task "
                       "joined this batch (no sbatch, no queue)</title></path>")
    out += [_span(span, top + span.row * row_h, bar, x, scale) for span in data.spans]
    out.append("</svg>")
    return (_legend("queue:queue wait", "chunk:chunk", "call:call", "failed:failed",
                    "backup:backup copy", "lost:lost with its task", "warm:warm join")
            + "".join(out))


def _span(span: Span, y: float, bar: float, x, scale: float) -> str:
    color = COLORS["lost" if span.lost else "failed" if span.failed and not span.call_bars
                   else "backup" if span.backup else "chunk"]
    extra = " stroke='#d62728' stroke-dasharray='3 2'" if span.lost else ""
    parts = [_rect(x(span.start), y, (span.end - span.start) * scale, bar, color,
                   span.tip, extra + " class='span'")]
    for start, end, error in span.call_bars:
        if error:
            parts.append(_rect(x(start), y, max(3.0, (end - start) * scale), bar, COLORS["failed"],
                               error, " class='failed'"))
        elif (end - start) * scale >= 3:
            parts.append(_rect(x(start) + 0.5, y + 1, (end - start) * scale - 1, bar - 2,
                               COLORS["call"]))
    return "".join(parts)


def _ticks(span: float) -> list[float]:
    steps = [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600]
    step = next((s for s in steps if span / s <= 10), span / 10)
    return [i * step for i in range(int(span / step) + 1)]


def _durations(data: ReportData) -> str:
    if not data.histogram:
        return "<p>No call has finished yet.</p>"
    slow = "".join(f"<tr><td>{call}</td><td>{esc(seconds(sec))}</td><td>{esc(task)}</td>"
                   f"<td>{esc(status)}</td></tr>" for sec, call, task, status in data.slowest)
    return (f"<p>{data.timed_calls} call executions measured.</p><div style='display:flex;"
            f"gap:30px;flex-wrap:wrap'><div>{charts.histogram(data)}</div><div><b>Slowest calls</b><table>"
            f"<tr><th>call</th><th>took</th><th>task</th><th>status</th></tr>{slow}"
            "</table></div></div>")


def _batches(data: ReportData) -> str:
    table = "".join(
        f"<tr><td>{b['batch']}</td><td>{esc(b['kind'])}</td><td>{b['attempt']}</td>"
        f"<td>{b['calls']}</td><td>{b['tasks']}</td><td>{b['warm']}</td>"
        f"<td>{esc(seconds(b['wait']))}</td><td>{esc(seconds(b['wait_max']))}</td>"
        f"<td>{esc(seconds(b['run']))}</td><td>{esc(seconds(b['run_max']))}</td></tr>"
        for b in data.batches)
    return (f"<table><tr><th>batch</th><th>kind</th><th>attempt</th><th>calls</th>"
            f"<th>tasks</th><th>warm</th><th>wait (median)</th><th>wait (max)</th>"
            f"<th>run (median)</th><th>run (max)</th></tr>{table}</table>"
            + (charts.batches(data) if data.batches else ""))


def _nodes(data: ReportData) -> str:
    rows = "".join(
        f"<tr class='{'bad' if n['failed'] or n['lost'] else ''}'><td>{esc(n['host'])}</td>"
        f"<td>{n['tasks']}</td><td>{esc(seconds(n['busy']))}</td><td>{n['failed']}</td>"
        f"<td>{n['lost']}</td></tr>" for n in data.nodes)
    return ("<table><tr><th>node</th><th>tasks</th><th>busy</th><th>failed calls</th>"
            f"<th>tasks lost</th></tr>{rows}</table>" + (charts.nodes(data) if data.nodes
                                                          else ""))


def _failures(data: ReportData) -> str:
    if not data.failures:
        return "<p>No failed call.</p>"
    return "".join(
        f"<details class='failure' open><summary>{esc(group.kind)}: {group.count} call(s)"
        f"</summary><div>{esc(group.message)}</div><div>calls "
        f"{esc(', '.join(map(str, group.calls)))}{' ...' if group.count > len(group.calls) else ''}"
        f"</div><pre>{esc(group.tail or '(no log)')}</pre><div>the rest: <code>"
        f"{esc(group.command)}</code></div></details>" for group in data.failures)


def _settings(data: ReportData) -> str:
    meta = data.meta
    items = [("backend", meta.get("backend")), ("created", time.strftime(
        "%Y-%m-%d %H:%M:%S", time.localtime(meta.get("created", 0)))),
        ("host", meta.get("host")), ("python", meta.get("python", "-")),
        ("resources", json.dumps(meta.get("resources") or {})),
        ("setup", "; ".join(meta.get("setup") or []) or "-"),
        ("sbatch extra", " ".join(meta.get("sbatch_extra") or []) or "-"),
        ("working directory", meta.get("cwd")),
        ("Slurm job ids", " ".join(data.job_ids) or "-"),
        ("result cache", f"{data.cache[0]} hits, {data.cache[1]} misses" if data.cache
         else "not used")]
    return "<table>" + "".join(f"<tr><td>{esc(k)}</td><td style='text-align:left'>{esc(v)}"
                               "</td></tr>" for k, v in items) + "</table>"
