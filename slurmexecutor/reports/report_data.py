"""What a run's report shows, gathered from the run folder (report_html.py draws it).

One pass over the folder: `runs.read_run` reads the journals and result streams, and a
`Collector` watches the same records go by (task start and end, chunk claims, the
workers' `times` records: seconds per call). Everything kept is aggregated: spans of
chunks (merged per task row when there are many), a histogram, the slowest calls, and
per batch, per node and per error type counts, so a 100,000-call run stays small.
"""

from __future__ import annotations

import heapq
import math
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from slurmexecutor.folder import procs
from slurmexecutor.folder.warm import JOIN_BASE
from slurmexecutor.owner.futures import call_log, read_tail
from slurmexecutor.reports.calltable import CODE
from slurmexecutor.reports.runs import RunInfo, TaskInfo

MAX_SPANS = 4000  # bars in the timeline; more are merged per task row
MAX_CALL_BARS = 1500  # calls drawn one by one when the run ran no more than this
SLOWEST = 15
EXAMPLES = 5  # call ids listed per failure group
FAILED_CODES = (CODE["failed"], CODE["lost"])


@dataclass
class Span:
    """A stretch of one task's row: a chunk it ran (or lost), or several merged."""

    row: int
    start: float
    end: float
    calls: int
    failed: int = 0
    backup: bool = False
    lost: bool = False  # its task ended without its results
    tip: str = ""
    call_bars: list[tuple[float, float, str]] = field(default_factory=list)  # failed: tip


@dataclass
class TaskRow:
    label: str  # batch.task
    ref: str  # JOB_INDEX, or "-"
    host: str = ""
    queued: float | None = None  # when its array was submitted (None: a warm join)
    start: float | None = None
    end: float | None = None
    state: str = ""
    warm: bool = False  # a warm task that joined this batch (no sbatch, no queue)
    joined: int | None = None  # it left for this batch (warm)
    calls: int = 0
    failed: int = 0


@dataclass
class FailureGroup:
    kind: str
    count: int
    message: str
    calls: list[int]
    tail: str
    command: str


@dataclass
class ReportData:
    run_id: str
    meta: dict
    now: float
    live: bool
    counts: dict[str, int]
    total: int
    functions: list[str]
    job_ids: list[str]
    cache: tuple[int, int] | None  # hits, misses
    rows: list[TaskRow]
    spans: list[Span]
    histogram: list[tuple[float, float, int]]  # bin start, bin end, calls
    slowest: list[tuple[float, int, str, str]]  # seconds, call id, task, status
    batches: list[dict]
    nodes: list[dict]
    failures: list[FailureGroup]
    retried: int = 0  # calls run again in a later batch (their task was lost)
    backups: int = 0  # chunks run a second time as backups
    warm_joins: int = 0
    timed_calls: int = 0  # calls with a measured duration

    @property
    def start(self) -> float:
        times = [t for row in self.rows if (t := row.queued or row.start)]
        return min(times, default=float(self.meta.get("created", self.now)))

    @property
    def end(self) -> float:
        ends = [span.end for span in self.spans] + [r.end for r in self.rows if r.end]
        return max([*ends, self.start + 1e-3]) if not self.live else self.now


@dataclass
class _Task:
    start: float | None = None
    end: float | None = None
    host: str = ""
    warm: bool = False
    joined: int | None = None
    claims: dict[int, float] = field(default_factory=dict)  # chunk -> when claimed
    times: list[dict] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # call id -> error (its record)


class Collector:
    """Watches a run's records as `runs.read_run` reads them (its `observe`)."""

    def __init__(self) -> None:
        self.tasks: dict[tuple[int, int], _Task] = {}
        self.backups = 0

    def observe(self, batch: int, index: int, records: list) -> None:
        task = self.tasks.setdefault((batch, index), _Task())
        for kind, call_id, body in records:
            if kind == "start":
                task.start = task.start or body.get("time")
                task.host, task.warm = body.get("host", ""), bool(body.get("warm"))
            elif kind == "end":
                task.end = (body or {}).get("time", task.end)
                task.joined = (body or {}).get("joined")
            elif kind in ("claim", "backup"):
                self.backups += kind == "backup"
                if isinstance(body, dict) and call_id not in task.claims:
                    task.claims[call_id] = body["time"]
            elif kind == "times":
                task.times.append(body)
            elif kind == "crash":
                task.failed[call_id] = f"WorkerCrashedError: {body.get('text', '')}"
            elif kind in ("raised", "unpicklable", "mismatch") and isinstance(call_id, int):
                task.failed[call_id] = (f"{body['type'].removeprefix('builtins.')}: "
                                        f"{body['message']}" if kind == "raised" else kind)


def build(info: RunInfo, collector: Collector, now: float | None = None) -> ReportData:
    """The report's numbers from a read (and classified) run and what its records said."""
    now = time.time() if now is None else now
    calls = info.calls
    queued = _submitted(info)
    rows: list[TaskRow] = []
    spans: list[Span] = []
    durations = array("f")
    slowest: list[tuple[float, int, str, str]] = []
    batch_times = [journal["created"] for journal in info.journals.values()]
    ids_of: dict[tuple[int, int], list[int]] = {}  # (batch, chunk) -> its call ids
    for task in sorted(info.tasks, key=lambda t: (t.batch, t.index)):
        seen = collector.tasks.get((task.batch, task.index), _Task())
        if not (seen.start or task.calls or task.state):
            continue  # never started, never needed
        label = f"{task.batch}." + (f"w{task.index - JOIN_BASE}" if task.index >= JOIN_BASE
                                     else str(task.index))
        row = TaskRow(label, task.ref or "-", seen.host,
                      None if task.index >= JOIN_BASE else queued.get(
                          (task.batch, task.index)), seen.start, seen.end,
                      _state(task, info.live), seen.warm or task.index >= JOIN_BASE,
                      task.joined, task.calls)
        rows.append(row)
        ran: set[int] = set()
        for times in seen.times:
            key = (task.batch, times["chunk"])
            if key not in ids_of:
                ids_of[key] = _chunk_ids(info, *key)
            took = array("f")
            took.frombytes(times["took"])
            ids = ids_of[key][times["first"]:times["first"] + len(took)]
            ran.add(times["chunk"])
            span = Span(len(rows) - 1, times["start"], times["end"], len(ids),
                        backup=times.get("backup", False))
            clock = times["start"]
            for call_id, seconds in zip(ids, took):
                durations.append(seconds)
                error = seen.failed.get(call_id, "")
                span.failed += bool(error)
                item = (seconds, call_id, row.label, "failed" if error else "done")
                if len(slowest) < SLOWEST:
                    heapq.heappush(slowest, item)
                elif seconds > slowest[0][0]:
                    heapq.heapreplace(slowest, item)
                span.call_bars.append((clock, clock + seconds,
                                       f"call {call_id}: {error}" if error else ""))
                clock += seconds
            row.failed += span.failed
            first_error = next((bar[2] for bar in span.call_bars if bar[2]), "")
            span.tip = (f"task {row.label}, chunk {times['chunk']}"
                        f"{' (backup)' if span.backup else ''}: {len(ids)} calls in "
                        f"{span.end - span.start:.2f} s"
                        + (f", {span.failed} failed: {first_error}" if span.failed else ""))
            spans.append(span)
        for chunk, claimed in seen.claims.items():  # claimed, but no times: lost
            if chunk not in ran:
                end = seen.end or (now if row.state == "running" else min(
                    [now, *(created for created in batch_times if created > claimed)]))
                spans.append(Span(len(rows) - 1, claimed, max(end, claimed), 0, lost=True,
                                  tip=f"task {row.label}, chunk {chunk}: its task ended "
                                      f"({row.state or 'lost'}) before its calls' results"))
    if len(durations) > MAX_CALL_BARS:
        for span in spans:
            span.call_bars = [bar for bar in span.call_bars if bar[2]][:20]
    spans = _merge(spans, len(rows))
    data = ReportData(
        info.run_id, info.meta, now, info.live,
        {name: info.count(name) for name in CODE if name != "unknown"} | (
            {"unknown": n} if (n := info.count("unknown")) else {}),
        len(calls), info.functions, info.job_ids,
        (info.cache.hits, info.cache.misses) if info.cache else None,
        rows, spans, histogram(durations),
        sorted(slowest, reverse=True), _batches(info, rows, queued),
        _nodes(rows, spans), _failures(info, collector),
        retried=_retried(info), backups=collector.backups,
        warm_joins=sum(row.warm for row in rows), timed_calls=len(durations))
    return data


def _submitted(info: RunInfo) -> dict[tuple[int, int], float]:
    """When each task's array went to the scheduler (the journal's time of it)."""
    when: dict[tuple[int, int], float] = {}
    for batch, journal in info.journals.items():
        for array_job in journal["arrays"]:
            at = array_job.get("time", journal.get("created"))
            for index in range(array_job["offset"], array_job["offset"] + array_job["size"]):
                when[(batch, index)] = at
    return when


def _chunk_ids(info: RunInfo, batch: int, chunk: int) -> list[int]:
    ranges = info.journals[batch]["chunks"][chunk]
    return [call_id for start, stop in ranges for call_id in range(start, stop)]


def _state(task: TaskInfo, live: bool) -> str:
    if task.state is not None:
        return task.state.state
    if task.joined is not None:
        return f"left for batch {task.joined}"
    if task.ended or not task.started:
        return "ended" if task.ended else ""
    if task.worker and procs.process_alive(*task.worker):
        return "running"
    return "running" if live and task.worker is None else "lost"


def _merge(spans: list[Span], rows: int) -> list[Span]:
    """At most ~MAX_SPANS bars: a row's neighbouring chunks become one bar."""
    if len(spans) <= MAX_SPANS:
        return spans
    per_row = max(2, MAX_SPANS // max(1, rows))
    by_row: dict[int, list[Span]] = {}
    for span in spans:
        by_row.setdefault(span.row, []).append(span)
    merged: list[Span] = []
    for row_spans in by_row.values():
        row_spans.sort(key=lambda s: s.start)
        size = math.ceil(len(row_spans) / per_row)
        for at in range(0, len(row_spans), size):
            group = row_spans[at:at + size]
            if len(group) == 1:
                merged.append(group[0])
                continue
            failed = sum(s.failed for s in group)
            calls = sum(s.calls for s in group)
            errors = [s.tip for s in group if s.failed or s.lost][:3]
            merged.append(Span(
                group[0].row, group[0].start, max(s.end for s in group), calls, failed,
                any(s.backup for s in group), all(s.lost for s in group),
                f"{len(group)} chunks, {calls} calls" + (f", {failed} failed" if failed
                                                         else "")
                + "".join(f"\n{tip}" for tip in errors),
                [bar for s in group for bar in s.call_bars if bar[2]][:20]))
    return merged


def histogram(durations: array, bins: int = 0) -> list[tuple[float, float, int]]:
    """Bins of call durations; logarithmic when they spread over decades."""
    if not durations:
        return []
    bins = bins or min(30, max(5, int(math.sqrt(len(durations)))))
    low, high = min(durations), max(durations)
    if high <= low:
        return [(low, high, len(durations))]
    if high / max(low, 1e-4) > 100:  # over decades: logarithmic bins
        floor = max(low, 1e-4)
        edges = [floor * (high / floor) ** (i / bins) for i in range(bins + 1)]
        counts = [0] * bins
        scale = bins / math.log(high / floor)
        for value in durations:
            at = int(math.log(max(value, floor) / floor) * scale)
            counts[min(at, bins - 1)] += 1
    else:
        width = (high - low) / bins
        edges = [low + i * width for i in range(bins + 1)]
        counts = [0] * bins
        for value in durations:
            counts[min(int((value - low) / width), bins - 1)] += 1
    return [(edges[i], edges[i + 1], counts[i]) for i in range(bins)]


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else 0.0


def _batches(info: RunInfo, rows: list[TaskRow],
             queued: dict[tuple[int, int], float]) -> list[dict]:
    """Per batch: its calls, tasks, and how long they waited in the queue vs ran."""
    result = []
    by_batch: dict[int, list[TaskRow]] = {}
    for row in rows:
        by_batch.setdefault(int(row.label.split(".")[0]), []).append(row)
    for batch, journal in sorted(info.journals.items()):
        tasks = by_batch.get(batch, [])
        waits = [row.start - row.queued for row in tasks if row.start and row.queued]
        ran = [row.end - row.start for row in tasks if row.start and row.end]
        result.append({
            "batch": batch, "kind": journal.get("kind", ""),
            "attempt": journal.get("attempt", 0),
            "calls": sum(stop - start for chunk in journal["chunks"] for start, stop in chunk),
            "tasks": len(tasks), "warm": sum(row.warm for row in tasks),
            "wait": _median(waits), "wait_max": max(waits, default=0.0),
            "run": _median(ran), "run_max": max(ran, default=0.0)})
    return result


def _nodes(rows: list[TaskRow], spans: list[Span]) -> list[dict]:
    """Per node: tasks, busy seconds (chunks run), failed calls, tasks lost."""
    nodes: dict[str, dict] = {}
    for row in rows:
        node = nodes.setdefault(row.host or "?", {"host": row.host or "?", "tasks": 0,
                                                  "busy": 0.0, "failed": 0, "lost": 0})
        node["tasks"] += 1
        node["failed"] += row.failed
        node["lost"] += row.state in ("NODE_FAIL", "FAILED", "TIMEOUT", "OUT_OF_MEMORY",
                                      "BOOT_FAIL", "PREEMPTED", "lost")
    for span in spans:
        host = rows[span.row].host or "?"
        if not span.lost:
            nodes[host]["busy"] += span.end - span.start
    return sorted(nodes.values(), key=lambda n: (-(n["failed"] + n["lost"]), n["host"]))


def _failures(info: RunInfo, collector: Collector) -> list[FailureGroup]:
    """Failed and lost calls grouped by error type; each with a log tail."""
    groups: dict[str, list[int]] = {}
    for call_id in info.calls.ids("failed", "lost"):
        error = info.calls.errors.get(call_id) or "lost: its task ended without its result"
        groups.setdefault(error.split(":", 1)[0], []).append(call_id)
    result = []
    for kind, ids in sorted(groups.items(), key=lambda item: -len(item[1])):
        first = info.calls[ids[0]]
        task = info.task(first.batch, first.task)
        tail = ""
        if task is not None and task.job_id:
            path = info.path / "logs" / f"{task.job_id}_{task.array_index}.log"
            try:
                part = call_log(path.read_text(errors="replace"), ids[0])
            except OSError:
                part = ""
            tail = "\n".join(part.splitlines()[-15:]) if part.strip() else read_tail(path, 15)
        message = first.error or (f"lost: task {first.batch}.{first.task} "
                                  f"({_state(task, info.live) if task else 'never claimed'})"
                                  " ended without its result")
        result.append(FailureGroup(kind, len(ids), message, ids[:EXAMPLES], tail,
                                   f"slurmexecutor logs {info.run_id} {ids[0]}"))
    return result


def _retried(info: RunInfo) -> int:
    """Calls that a later batch ran again (a retry of a lost task's calls)."""
    seen = bytearray(len(info.calls.codes))
    for journal in info.journals.values():
        for chunk in journal["chunks"]:
            for start, stop in chunk:
                seen[start:stop] = bytes(min(255, b + 1) for b in seen[start:stop])
    return len(seen) - seen.count(0) - seen.count(1)


#: reads and classifies one run while a Collector watches (cli or the executor)
Reader = Callable[[Path, Collector], RunInfo]
