"""The report's charts, drawn by uPlot (vendored: reports/vendor/, from
scripts/vendor_uplot.py) and inlined into the page, so nothing is fetched when it is
viewed. Each chart is a `<div class='chart'>` holding its data as JSON; one script draws
every such div (again after the live page replaced its report). The task timeline (rows
of bars) stays an SVG of report_html.py: uPlot draws series over one x axis, not Gantt
rows."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from slurmexecutor.reports.report_data import ReportData

VENDOR = Path(__file__).resolve().parent / "vendor"
MAX_POINTS = 2000  # points of the progress chart

DRAW = r"""
(function(){
function sec(v){if(v==null)return '-';var a=Math.abs(v);if(a>=3600)return (v/3600).toFixed(1)+' h';
if(a>=60)return (v/60).toFixed(1)+' min';if(a>=1)return +v.toPrecision(3)+' s';
return a?+(v*1000).toPrecision(2)+' ms':'0';}
var STEPS=[0.001,0.002,0.005,0.01,0.02,0.05,0.1,0.2,0.5,1,2,5,10,15,30,60,120,300,600,900,
1800,3600,7200,10800,21600,43200,86400,172800,604800];
function bars(align){return uPlot.paths.bars({size:[0.4,60],align:align});}
function secAxis(label,side){return {label:label,side:side||3,size:60,incrs:STEPS,values:function(u,s){
return s.map(sec);}};}
var KINDS={
progress:function(d,w){return [{width:w,height:230,scales:{x:{time:false},tasks:{}},
 series:[{label:'since start',value:function(u,v){return sec(v);}},{label:'calls finished',stroke:'#4a7fc1',fill:'rgba(74,127,193,.15)',width:2},
 {label:'tasks running',stroke:'#ff9f1c',scale:'tasks',width:2,
  paths:uPlot.paths.stepped({align:1})}],
 axes:[{label:'time since the run started',space:70,incrs:STEPS,
  values:function(u,s){return s.map(sec);}},
  {label:'calls',size:60},{label:'tasks',side:1,scale:'tasks',grid:{show:false}}]},
 [d.t,d.done,d.tasks]];},
histogram:function(d,w){var n=d.counts.length,x=d.counts.map(function(_,i){return i;});
 return [{width:Math.min(w,760),height:230,scales:{x:{time:false,range:[-0.6,n-0.4]}},
 series:[{label:'duration',value:function(u,i){return i==null?'-':sec(d.lo[i])+' – '+sec(d.hi[i]);}},
 {label:'calls',fill:'#4a7fc1',stroke:'#4a7fc1',paths:bars(0),points:{show:false}}],
 axes:[{label:'call duration'+(d.log?' (logarithmic bins)':''),incrs:[1,2,5,10],
  values:function(u,s){return s.map(function(i){return d.lo[i]==null?'':sec(d.lo[i]);});}},
  {label:'calls',size:60}]},[x,d.counts]];},
batches:function(d,w){var x=d.batch.map(function(_,i){return i;});
 return [{width:w,height:230,scales:{x:{time:false,range:[-0.8,x.length-0.2]}},
 series:[{label:'batch',value:function(u,i){return i==null?'-':d.batch[i];}},
 {label:'queue wait (median)',fill:'#b0b0b0',stroke:'#8c8c8c',paths:bars(-1),
  points:{show:false},value:function(u,v){return sec(v);}},
 {label:'run (median)',fill:'#4a7fc1',stroke:'#4a7fc1',paths:bars(1),points:{show:false},
  value:function(u,v){return sec(v);}}],
 axes:[{label:'batch',incrs:[1,2,5,10,20,50,100],values:function(u,s){
  return s.map(function(i){return d.batch[i]==null?'':d.batch[i];});}},secAxis('seconds')]},
 [x,d.wait,d.run]];},
nodes:function(d,w){var x=d.host.map(function(_,i){return i;});
 return [{width:w,height:230,scales:{x:{time:false,range:[-0.8,x.length-0.2]},n:{}},
 series:[{label:'node',value:function(u,i){return i==null?'-':d.host[i];}},
 {label:'busy',fill:'#4a7fc1',stroke:'#4a7fc1',paths:bars(-1),points:{show:false},
  value:function(u,v){return sec(v);}},
 {label:'failed calls + tasks lost',scale:'n',fill:'#d62728',stroke:'#d62728',paths:bars(1),
  points:{show:false}}],
 axes:[{label:'node',incrs:[1,2,5,10,20,50,100],values:function(u,s){
  return s.map(function(i){return d.host[i]==null?'':d.host[i];});}},secAxis('busy'),
  {label:'failures',side:1,scale:'n',grid:{show:false}}]},[x,d.busy,d.bad]];}};
window.slurmexecutorCharts=function(){
 document.querySelectorAll('div.chart').forEach(function(el){
  if(el.querySelector('.uplot'))return;
  var d=JSON.parse(el.querySelector('script').textContent);
  var w=Math.max(400,Math.min(1100,(el.parentNode.clientWidth||1100)-20));
  var made=KINDS[el.getAttribute('data-kind')](d,w);new uPlot(made[0],made[1],el);});};
window.slurmexecutorCharts();
})();
"""


@functools.lru_cache(maxsize=1)
def assets() -> tuple[str, str]:
    """uPlot's script and stylesheet (the vendored files)."""
    try:
        return ((VENDOR / "uPlot.iife.min.js").read_text(encoding="utf-8"),
                (VENDOR / "uPlot.min.css").read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"the report's plotting library is missing ({error.filename}"
                                "): install slurmexecutor with its package data, or run "
                                "scripts/vendor_uplot.py in a checkout") from error


def head() -> str:
    """uPlot, inline (its style and script), for the page's head."""
    script, style = assets()
    return f"<style>{style}</style><script>{script}</script>"


def draw_script() -> str:
    """Draws every chart of the page; `window.slurmexecutorCharts()` draws new ones."""
    return f"<script>{DRAW}</script>"


def chart(kind: str, data: dict) -> str:
    """A chart's container with its data (drawn by the page's script)."""
    text = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")
    return (f"<div class='chart' data-kind='{kind}' id='chart-{kind}'>"
            f"<script type='application/json'>{text}</script></div>")


def progress(data: ReportData) -> str:
    """Calls finished (at their chunks' ends) and tasks running, over the seconds since
    the run started (the timeline's clock)."""
    start, end = data.start, data.end  # properties that go over every row: once
    events: list[tuple[float, int, int]] = []  # time, calls finished, tasks started
    last: dict[int, float] = {}  # row -> the end of its last bar
    for span in data.spans:
        last[span.row] = max(last.get(span.row, span.end), span.end)
        if not span.lost:
            events.append((span.end, span.calls, 0))
    for number, row in enumerate(data.rows):
        if row.start:
            ended = row.end or (end if row.state == "running" else last.get(number))
            events.append((row.start, 0, 1))
            events.append((max(ended or row.start, row.start), 0, -1))
    if not events:
        return "<p>No task has started yet.</p>"
    events.sort()
    times: list[float] = []
    done: list[int] = []
    tasks: list[int] = []
    finished = running = 0
    for at, calls, started in events:
        finished, running = finished + calls, running + started
        if times and at - times[-1] < 1e-6:
            done[-1], tasks[-1] = finished, running
        else:
            times.append(round(at - start, 3))
            done.append(finished)
            tasks.append(running)
    step = max(1, -(-len(times) // MAX_POINTS))
    keep = [*range(0, len(times) - 1, step), len(times) - 1]
    return chart("progress", {"t": [times[i] for i in keep], "done": [done[i] for i in keep],
                              "tasks": [tasks[i] for i in keep]})


def histogram(data: ReportData) -> str:
    lows = [low for low, _, _ in data.histogram]
    spread = len(lows) > 2 and lows[1] - lows[0] < (lows[-1] - lows[-2]) * 0.9
    return chart("histogram", {"lo": [round(low, 6) for low in lows],
                               "hi": [round(high, 6) for _, high, _ in data.histogram],
                               "counts": [count for _, _, count in data.histogram],
                               "log": spread})


def batches(data: ReportData) -> str:
    return chart("batches", {"batch": [b["batch"] for b in data.batches],
                             "wait": [round(b["wait"], 3) for b in data.batches],
                             "run": [round(b["run"], 3) for b in data.batches]})


def nodes(data: ReportData) -> str:
    """Busy time and failures per node (the table's order: failing nodes first)."""
    return chart("nodes", {"host": [n["host"] for n in data.nodes],
                           "busy": [round(n["busy"], 3) for n in data.nodes],
                           "bad": [n["failed"] + n["lost"] for n in data.nodes]})
