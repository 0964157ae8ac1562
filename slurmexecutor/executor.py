"""SlurmExecutor: a `concurrent.futures.Executor` whose calls run as Slurm job arrays.

Data flow (compare CPython's concurrent/futures/process.py):

  client thread(s)                 run folder (spool)                  array task i
  ----------------                 ------------------                  ------------
  submit(fn, *a) --+
    pickle args now|  window: calls wait up to `submit_window` s
    (bad arg fails |  for company; flushed when full, expired, or
     at submit)    |  someone calls .result()
  map(fn, items) --+--> _launch(batch) -> bNNNN.fn     (functions, once)
                   |                      bNNNN.cJJJJ.in  C chunks of calls (signed)
                   |                      bNNNN.json   (journal)
                   |    ONE sbatch --array=0-(K-1)%1; the throttle ------> python -m
                   |    is lifted when chunks stay unclaimed (scale-out)     slurmexecutor.worker
                   |                      bNNNN.cJJJJ.claim  <------------ claims a chunk,
                   |                      bNNNN.tIIII.rA.out <------------ signed records,
                   |                      logs/JOB_IDX.log   <------------ one per call
  monitor thread <-+-- scandir + read new records (every tick, cheap)
    one squeue for all live arrays per poll_interval (flat scheduler load)
    -> Future.set_running_or_notify_cancel / set_result / set_exception
    -> tasks that ended without results: their calls fail (or are retried)

Each `submit` returns a `SlurmFuture` (a real `concurrent.futures.Future`); `map` packs
calls into one batch with one internal future per chunk, and yields in order. A batch
plans K = min(slots, C) tasks; tasks claim chunks dynamically, so cheap work is done by
the first task alone and uneven calls balance across tasks.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle

from . import spool
from .errors import SerializationError, SubmissionError
from .monitor import Batch, CallSink, ChunkSink, FutureSink, Monitor, Task, read_tail
from .progress import CallProgress
from .schedulers import TaskState, make_backend
from .schedulers.script import ScriptSpec, render_script, validate_resources

log = logging.getLogger("slurmexecutor")

DEFAULT_RETRY_ON = ("NODE_FAIL", "PREEMPTED")
#: chunks per cluster slot when chunk sizes are chosen for you: finer chunks balance
#: uneven calls across tasks, coarser ones cost fewer claims
CHUNKS_PER_SLOT = 4


def default_folder() -> Path:
    """$SLURMEXECUTOR_FOLDER, else ~/.slurmexecutor (home is shared on most clusters)."""
    return Path(os.environ.get("SLURMEXECUTOR_FOLDER") or "~/.slurmexecutor").expanduser()


def dumps(obj: Any, what: str) -> bytes:
    """cloudpickle `obj`, or raise SerializationError naming `what` could not be."""
    try:
        return cloudpickle.dumps(obj)
    except Exception as exc:
        raise SerializationError(f"{what} cannot be pickled: {exc!r}") from exc


def shipped_sys_path() -> list[str]:
    """The client's sys.path, absolute, so modules next to the user import on workers."""
    return [os.path.abspath(entry or os.getcwd()) for entry in sys.path]


class SlurmFuture(Future):
    """A `concurrent.futures.Future` that knows its call and its task's log.

    Waiting on it (`result`, `exception`) first flushes the submission window, so a
    lone call is not held back for company.
    """

    def __init__(self, executor: SlurmExecutor, call_ids: list[int]) -> None:
        super().__init__()
        self._executor = executor
        self.call_ids = call_ids
        self.chunk: tuple[int, int] | None = None  # (batch, chunk) once submitted

    @property
    def call_id(self) -> int:
        return self.call_ids[0]

    def result(self, timeout: float | None = None) -> Any:
        self._executor._flush_window()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._executor._flush_window()
        return super().exception(timeout)

    @property
    def attempts(self) -> int:
        """How many times the call was submitted (more than 1 after retries)."""
        return self._executor._attempts.get(self.call_id, 1)

    @property
    def log_path(self) -> Path | None:
        """The stdout/stderr log of the array task that runs (or ran) this call."""
        if self.chunk is None:
            return None
        task = self._executor.monitor.task_of_chunk(*self.chunk)
        return self._executor.monitor.log_file(task) if task else None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the task's log (the log is shared by the task's calls)."""
        return read_tail(self.log_path, lines)

    def log(self) -> str:
        """This call's own part of its task's log (the worker marks where each begins)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return call_log(self.log_path.read_text(errors="replace"), self.call_id)


def call_log(text: str, call_id: int) -> str:
    """Cut one call's output out of a task log, using the worker's markers."""
    marker = f"--- slurmexecutor call {call_id} ---\n"
    start = text.find(marker)
    if start < 0:
        return ""
    start += len(marker)
    end = text.find("--- slurmexecutor call ", start)
    return text[start:] if end < 0 else text[start:end]


@dataclass
class PendingCall:
    call_id: int
    fn_index: int
    arguments: bytes  # pickled [(args, kwargs)]
    future: SlurmFuture


@dataclass
class Window:
    """Calls submitted close together, waiting to go out as one array."""

    opened: float = field(default_factory=time.monotonic)
    touched: float = field(default_factory=time.monotonic)
    functions: list[bytes] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    function_index: dict[int, int] = field(default_factory=dict)
    keep_alive: list[Callable] = field(default_factory=list)
    calls: list[PendingCall] = field(default_factory=list)

    def add_function(self, fn: Callable) -> int:
        """Pickle `fn` once per window; return its index in the window's table."""
        index = self.function_index.get(id(fn))
        if index is None:
            self.functions.append(dumps(fn, f"the function {_name(fn)}"))
            self.names.append(_name(fn))
            self.keep_alive.append(fn)
            index = self.function_index[id(fn)] = len(self.functions) - 1
        return index


@dataclass
class Chunk:
    """Calls that run together: (fn index, pickled [(args, kwargs)...], count) parts."""

    call_ids: list[int]
    parts: list[tuple[int, bytes, int]]
    sinks: dict[int, CallSink]
    futures: list[SlurmFuture]


def _job_name(names: list[str]) -> str:
    """slurmexecutor-<function>, with only characters safe on an #SBATCH line."""
    short = names[0].rsplit(".", 1)[-1] if names else ""
    return "slurmexecutor" + ("-" + re.sub(r"[^A-Za-z0-9_.-]", "_", short) if short else "")


def chunks_sinks(chunks: list[Chunk]) -> dict[int, CallSink]:
    return {call_id: sink for chunk in chunks for call_id, sink in chunk.sinks.items()}


def _name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


class SlurmExecutor(Executor):
    """Run calls on Slurm (or locally) as packed job arrays; see the module docstring.

    Resources are sbatch long options as keywords (`partition="short"`, `time="1:00:00"`,
    `mem="4G"`, `cpus_per_task=2`, `array_parallelism=50`, ...); `sbatch_extra` adds raw
    options and `setup` adds shell lines run before the worker (`module load ...`).
    """

    def __init__(
        self,
        folder: str | os.PathLike | None = None,
        *,
        backend: str = "auto",
        chunksize: int | None = None,
        max_retries: int = 0,
        retry_on: Iterable[str] = DEFAULT_RETRY_ON,
        python: str | None = None,
        setup: Iterable[str] = (),
        sbatch_extra: Iterable[str] = (),
        submit_window: float = 0.05,
        max_window: float = 1.0,
        max_batch: int = 10_000,
        poll_interval: float | None = None,
        result_grace: float | None = None,
        _run: str | None = None,
        **resources: Any,
    ) -> None:
        self.resources = validate_resources(resources)
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, not {chunksize!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, not {max_retries!r}")
        self.folder = spool.ensure_private_dir(Path(folder or default_folder()).expanduser())
        self.key = spool.load_key(self.folder, create=True)
        self.backend = make_backend(backend, self.resources)
        self.chunksize = chunksize
        self.max_retries, self.retry_on = max_retries, frozenset(retry_on)
        self.python = python or sys.executable
        self.setup, self.sbatch_extra = list(setup), list(sbatch_extra)
        self.submit_window, self.max_window, self.max_batch = (
            submit_window, max_window, max_batch)
        local = self.backend.name == "local"
        self.run_id = _run or time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        self.run_dir = spool.ensure_private_dir(self.folder / self.run_id)
        spool.ensure_private_dir(self.run_dir / "logs")
        if _run is None:
            spool.write_json(self.run_dir / "run.json", {
                "created": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
                "backend": self.backend.name, "resources": self.resources,
                "cwd": os.getcwd(), "setup": self.setup, "sbatch_extra": self.sbatch_extra,
            })
        self._lock = threading.Lock()
        self._window: Window | None = None
        self._next_call = 0  # call ids are handed out under self._lock
        self._batch_ids = itertools.count()
        self._attempts: dict[int, int] = {}
        self._journals: dict[int, dict] = {}
        self._cancelled: dict[tuple[int, int], set[int]] = {}
        self._shutdown = False
        self._cancelling = False  # shutdown(cancel_futures=True): no more retries
        self.monitor = Monitor(
            self.run_dir, self.key, self.backend,
            poll_interval=poll_interval if poll_interval is not None else (
                0.05 if local else 2.0),
            result_grace=result_grace if result_grace is not None else (
                0.0 if local else 1.0),
            retry=self._retry,
            scale_out=self._scale_out,
        )
        #: every call's future, by call id, for runs reattached with `attach`
        self.futures: dict[int, SlurmFuture] = {}
        if _run is not None:
            self._reattach()
        self._flusher_wake = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                         name="slurmexecutor-window")
        self._flusher.start()
        log.info("run %s in %s on the %s backend", self.run_id, self.folder, self.backend.name)

    # -- reattaching to a run -----------------------------------------------------------

    @classmethod
    def attach(cls, run: str, folder: str | os.PathLike | None = None,
               **options: Any) -> SlurmExecutor:
        """Reopen a run from its folder (e.g. after the client died) and watch it again.

        `executor.futures` maps every call id of the run to a future: calls with a result
        on disk resolve at once, live tasks are watched, lost ones fail with
        CallLostError. Options (poll_interval, ...) are as for the constructor; backend
        and resources default to the run's own.
        """
        root = Path(folder or default_folder()).expanduser()
        meta_path = root / run / "run.json"
        if not meta_path.exists():
            from .errors import RunNotFoundError

            raise RunNotFoundError(f"no run {run!r} in {root}")
        meta = spool.read_json(meta_path)
        options.setdefault("backend", meta["backend"])
        for name in ("setup", "sbatch_extra"):
            options.setdefault(name, meta.get(name, ()))
        resources = {**meta["resources"], **options.pop("resources", {})}
        return cls(root, _run=run, **options, **resources)

    def _reattach(self) -> None:
        """Rebuild the futures and the monitor's batches and tasks from the journals."""
        journals = spool.read_journals(self.run_dir)
        owner: dict[int, int] = {}  # call -> the latest batch that carries it (retries)
        for journal in journals:
            for ranges in journal["chunks"]:
                for call_id in spool.expand_ids(ranges):
                    owner[call_id] = journal["batch"]
        for call_id in sorted(owner):
            self.futures[call_id] = SlurmFuture(self, [call_id])
        for journal in journals:
            number = journal["batch"]
            chunks = [spool.expand_ids(ranges) for ranges in journal["chunks"]]
            batch = Batch(number, chunks, journal["planned"], journal["steal"],
                          journal["attempt"], self.resources.get("time"),
                          journal.get("throttled", False))
            batch.open_calls = {c for c in batch.open_calls if owner[c] == number}
            if not batch.open_calls:
                continue
            self._journals[number] = journal
            for index, chunk in enumerate(chunks):
                for call_id in chunk:
                    if owner[call_id] == number:
                        self.futures[call_id].chunk = (number, index)
                        self._attempts[call_id] = batch.attempt
            batch.index_places()
            self.monitor.add_batch(batch, {c: FutureSink(self.futures[c])
                                           for c in batch.open_calls})
            for array in journal["arrays"]:
                self.monitor.add_tasks(batch, [
                    Task(batch, index, array["job_id"], index - array["offset"])
                    for index in range(array["offset"], array["offset"] + array["size"])])
            if batch.submitted == 0:  # the client died before submitting it
                self._submit_tasks(batch, batch.planned)
        last_call = max(owner, default=-1)
        last_batch = max((journal["batch"] for journal in journals), default=-1)
        self._next_call = last_call + 1
        self._batch_ids = itertools.count(last_batch + 1)
        self.monitor.poke()

    # -- the Executor interface ---------------------------------------------------------

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> SlurmFuture:
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        arguments = dumps([(args, kwargs)], f"an argument of {_name(fn)}")
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            window = self._window = self._window or Window()
            fn_index = window.add_function(fn)
            future = SlurmFuture(self, [self._next_call])
            self._next_call += 1
            window.calls.append(PendingCall(future.call_id, fn_index, arguments, future))
            window.touched = time.monotonic()
            full = len(window.calls) >= self.max_batch
            if full:
                self._window = None
        future.add_done_callback(self._on_future_done)
        if full:
            self._launch_window(window)
        else:
            self._flusher_wake.set()
        return future

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int | None = None, progress: bool | None = None) -> Iterator:
        """Like `Executor.map`: all calls go out now, as one array; results in order."""
        end_time = None if timeout is None else timeout + time.monotonic()
        futures, bar = self._submit_map(fn, list(zip(*iterables)), chunksize, progress)
        return _chained_results(futures, end_time, bar)

    def submit_many(self, fn: Callable, calls: Iterable[tuple], *,
                    chunksize: int | None = None,
                    task_per_chunk: bool = False) -> list[SlurmFuture]:
        """Submit `fn(*args)` for each tuple in `calls` now, as one batch, with one
        Future per call and `chunksize` calls per chunk. With `task_per_chunk`, every
        chunk gets an array task of its own, all submitted at once (map_reduce's
        fractions); otherwise tasks claim chunks as usual."""
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        window = Window()
        fn_index = window.add_function(fn)
        for args in calls:
            arguments = dumps([(tuple(args), {})], f"an argument of {_name(fn)}")
            future = SlurmFuture(self, [self._reserve_ids(1)])
            window.calls.append(PendingCall(future.call_id, fn_index, arguments, future))
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        self._flush_window()
        for call in window.calls:
            call.future.add_done_callback(self._on_future_done)
        self._launch_window(window, chunksize, task_per_chunk=task_per_chunk)
        return [call.future for call in window.calls]

    def cancel(self, futures: Iterable[Future]) -> None:
        """Cancel the calls that have not started and kill the tasks running the others
        (their futures then fail with JobCancelledError)."""
        doomed: dict[int, set[int]] = {}  # id(task) -> its calls being cancelled
        tasks = {}
        for future in futures:
            if future.done() or future.cancel() or getattr(future, "chunk", None) is None:
                continue
            number, index = future.chunk
            spool.append_cancelled(spool.cancel_path(self.run_dir, number, index),
                                   future.call_ids)  # not started yet: skipped
            task = self.monitor.task_of_chunk(number, index)
            if task is not None and task.job_id is not None:
                tasks[id(task)] = task
                doomed.setdefault(id(task), set()).update(future.call_ids)
        refs = [f"{task.job_id}_{task.array_index}" for key, task in tasks.items()
                if task.unresolved <= doomed[key]]  # nothing else depends on that task
        self.backend.cancel(sorted(refs))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            window, self._window = self._window, None
        if cancel_futures:
            self._cancelling = True
            if window:
                for call in window.calls:
                    call.future.cancel()
            for future in {id(s.future): s.future for s in list(self.monitor.sinks.values())
                           }.values():
                future.cancel()  # only those that have not started
        if window:
            self._launch_window(window)
        self._flusher_wake.set()
        if wait and not self.monitor.is_monitor_thread():
            self._wait_for_batches()
            self.monitor.stop()
            self.backend.close()
        else:
            threading.Thread(target=self._finish_in_background, daemon=True).start()

    # -- submission ---------------------------------------------------------------------

    def _submit_map(self, fn: Callable, items: list[tuple], chunksize: int | None,
                    progress: bool | None) -> tuple[list[SlurmFuture], CallProgress]:
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
        self._flush_window()
        bar = CallProgress(len(items), progress and bool(items), desc=_name(fn))
        if not items:
            return [], bar
        chunksize = chunksize or self.chunksize or self._auto_chunksize(len(items))
        window = Window()
        window.add_function(fn)
        first_id = self._reserve_ids(len(items))
        chunks, futures = [], []
        for start in range(0, len(items), chunksize):
            part = items[start : start + chunksize]
            ids = list(range(first_id + start, first_id + start + len(part)))
            future = SlurmFuture(self, ids)
            future.add_done_callback(self._on_future_done)
            sink = ChunkSink(future, ids[0], len(ids), progress=bar)
            blob = dumps([(args, {}) for args in part], f"an argument of {_name(fn)}")
            chunks.append(Chunk(ids, [(0, blob, len(ids))], dict.fromkeys(ids, sink),
                                [future]))
            futures.append(future)
        self._launch_safely(window.functions, window.names, chunks, kind="map")
        return futures, bar

    def _reserve_ids(self, count: int) -> int:
        """Reserve `count` consecutive call ids; return the first."""
        with self._lock:
            first, self._next_call = self._next_call, self._next_call + count
        return first

    def _auto_chunksize(self, calls: int) -> int:
        """Chunks enough for CHUNKS_PER_SLOT per slot: tasks claim them as they go."""
        return max(1, math.ceil(calls / (CHUNKS_PER_SLOT * self.backend.slots())))

    def _flush_window(self) -> None:
        with self._lock:
            window, self._window = self._window, None
        if window:
            self._launch_window(window)

    def _flush_loop(self) -> None:
        while True:
            self._flusher_wake.wait()
            self._flusher_wake.clear()
            while True:
                with self._lock:
                    window = self._window
                    if window is None:
                        break
                    now = time.monotonic()
                    due = min(window.touched + self.submit_window,
                              window.opened + self.max_window)
                    if now >= due:
                        self._window = None
                if now >= due:
                    try:
                        self._launch_window(window)
                    except Exception:
                        log.exception("slurmexecutor: could not submit a batch")
                    break
                time.sleep(min(due - now, self.submit_window))
            if self._shutdown and self._window is None:
                return

    def _launch_window(self, window: Window, chunksize: int | None = None, *,
                       task_per_chunk: bool = False) -> None:
        calls = [call for call in window.calls if not call.future.cancelled()]
        if not calls:
            return
        size = chunksize or self.chunksize or self._auto_chunksize(len(calls))
        chunks = []
        for start in range(0, len(calls), size):
            group = calls[start : start + size]
            chunks.append(Chunk(
                [call.call_id for call in group],
                [(call.fn_index, call.arguments, 1) for call in group],
                {call.call_id: FutureSink(call.future) for call in group},
                [call.future for call in group],
            ))
        self._launch_safely(window.functions, window.names, chunks, kind="submit",
                            task_per_chunk=task_per_chunk)

    def _launch(self, functions: list[bytes] | str, names: list[str], chunks: list[Chunk],
                *, kind: str, attempt: int = 1, task_per_chunk: bool = False) -> None:
        """Write a batch to the folder and submit its first task(s).

        `functions` is the pickled function table, or the name of an earlier batch's
        functions file (retries reuse it). A batch plans min(slots, chunks) tasks that
        claim chunks, submitted as ONE array throttled to one task at a time; the
        monitor lifts the throttle when the work is not done at once (`_scale_out`).
        With `task_per_chunk` every chunk gets its own task, all free to run.
        """
        number = next(self._batch_ids)
        if isinstance(functions, str):
            functions_file = functions
        else:
            functions_file = spool.functions_path(self.run_dir, number).name
            spool.write_blob(self.run_dir / functions_file, self.key, {
                "functions": functions, "names": names, "sys_path": shipped_sys_path()})
        planned = len(chunks) if task_per_chunk else min(self.backend.slots(), len(chunks))
        steal = not task_per_chunk
        spool.write_blob(spool.manifest_path(self.run_dir, number), self.key, {
            "functions": functions_file, "chunks": len(chunks), "tasks": planned,
            "steal": steal})
        for index, chunk in enumerate(chunks):
            spool.write_blob(spool.chunk_path(self.run_dir, number, index), self.key, {
                "calls": chunk.call_ids, "parts": chunk.parts})
            for future in chunk.futures:
                future.chunk = (number, index)
        throttled = steal and planned > 1
        self._journals[number] = journal = {
            "batch": number, "kind": kind, "created": time.time(), "functions": names,
            "functions_file": functions_file, "attempt": attempt, "planned": planned,
            "steal": steal, "throttled": throttled,
            "chunks": [spool.compress_ids(c.call_ids) for c in chunks], "arrays": [],
        }
        spool.write_json(spool.journal_path(self.run_dir, number), journal)
        batch = Batch(number, [chunk.call_ids for chunk in chunks], planned, steal, attempt,
                      self.resources.get("time"), throttled)
        sinks = chunks_sinks(chunks)
        if kind != "map":
            batch.index_places()  # each call has its own future: track which one runs
        self.monitor.add_batch(batch, sinks)
        self._submit_tasks(batch, planned)

    def _launch_safely(self, functions: list[bytes], names: list[str], chunks: list[Chunk],
                       **options: Any) -> None:
        """`_launch`, but a failure (disk full, no Slurm) fails the calls, which get the
        error instead of waiting forever; it is raised to the caller too."""
        try:
            self._launch(functions, names, chunks, **options)
        except Exception as error:
            failure = error if isinstance(error, SubmissionError) else SubmissionError(
                f"could not write or submit the batch: {error!r}")
            self.monitor.fail_pending(
                [c for chunk in chunks for c in chunk.call_ids], chunks_sinks(chunks), failure)
            raise

    def _scale_out(self, batch: Batch) -> None:
        """The monitor's call: chunks are left, so let all the batch's tasks run."""
        journal = self._journals[batch.number]
        journal["throttled"] = False
        spool.write_json(spool.journal_path(self.run_dir, batch.number), journal)
        throttle = self.resources.get("array_parallelism") or 0
        for array in journal["arrays"]:
            try:
                self.backend.set_throttle(array["job_id"], throttle)
            except SubmissionError as error:  # the array may have ended meanwhile
                log.info("batch %d: could not lift the throttle: %s", batch.number, error)

    def _submit_tasks(self, batch: Batch, count: int) -> None:
        """Submit tasks batch.submitted .. +count as arrays (split at MaxArraySize)."""
        journal = self._journals[batch.number]
        first, end = batch.submitted, batch.submitted + count
        offset = first
        while offset < end:
            throttle = 1 if batch.throttled else None  # scale-out may come in between
            try:
                size = min(self.backend.max_array_size(), end - offset)
                job_id = self._submit_array(batch.number, offset, size, journal["functions"],
                                            throttle)
            except Exception as error:  # noqa: BLE001  (fail the calls, do not hang them)
                if not isinstance(error, SubmissionError):
                    error = SubmissionError(f"could not submit the batch: {error!r}")
                batch.planned = batch.submitted  # no more attempts at scaling out
                batch.submit_error = error
                if not self.monitor.has_live_tasks(batch):
                    self.monitor.fail_calls(batch, sorted(batch.open_calls), error)
                else:
                    log.warning("batch %d: could not add tasks: %s", batch.number, error)
                return
            journal["arrays"].append({"job_id": job_id, "offset": offset, "size": size})
            self.monitor.add_tasks(batch, [Task(batch, index, job_id, index - offset)
                                           for index in range(offset, offset + size)])
            offset += size
            try:
                spool.write_json(spool.journal_path(self.run_dir, batch.number), journal)
            except OSError as error:  # the job runs; only reattaching would miss it
                log.warning("batch %d: could not update its journal: %s", batch.number, error)
        self.monitor.poke()

    def _submit_array(self, batch: int, offset: int, size: int, names: list[str],
                      throttle: int | None = None) -> str:
        spec = ScriptSpec(
            run_dir=self.run_dir, batch=batch, size=size, offset=offset,
            job_name=_job_name(names), python=self.python, throttle=throttle, setup=self.setup,
            sbatch_extra=self.sbatch_extra)
        script = self.run_dir / f"{spool.batch_name(batch)}.a{offset}.sh"
        spool.write_atomic(script, render_script(self.resources, spec).encode())
        throttle = throttle if throttle is not None else self.resources.get(
            "array_parallelism")
        return self.backend.submit_array(script, size, self.run_dir / "logs", throttle)

    # -- retries and cancellation -------------------------------------------------------

    def _retry(self, batch: Batch, call_ids: list[int], state: TaskState) -> bool:
        """Resubmit calls a task left unfinished when its end state allows; True if so."""
        if (state.state not in self.retry_on or batch.attempt > self.max_retries
                or self._cancelling):
            return False
        wanted, parts, ids = set(call_ids), [], []
        for index, chunk_ids in enumerate(batch.chunks):
            if wanted.isdisjoint(chunk_ids):
                continue
            chunk = spool.read_blob(spool.chunk_path(self.run_dir, batch.number, index),
                                    self.key)
            position = 0
            for fn_index, blob, count in chunk["parts"]:
                calls = cloudpickle.loads(blob)
                for offset in range(count):
                    call_id = chunk["calls"][position + offset]
                    if call_id in wanted:
                        ids.append(call_id)
                        parts.append((fn_index, dumps([calls[offset]], "an argument"), 1))
                position += count
        log.warning("retrying %d call(s) of batch %d after %s (attempt %d of %d)",
                    len(ids), batch.number, state.state, batch.attempt + 1,
                    self.max_retries + 1)
        futures = [sink.future for call_id in ids
                   if isinstance(sink := self.monitor.sinks.get(call_id), FutureSink)]
        for call_id in ids:
            self._attempts[call_id] = batch.attempt + 1
        journal = self._journals[batch.number]
        try:
            self._launch(journal["functions_file"], journal["functions"],
                         [Chunk(ids, parts, {}, futures)], kind="retry",
                         attempt=batch.attempt + 1)
        except Exception:
            log.exception("batch %d: the retry could not be submitted", batch.number)
            return False
        return True

    def _on_future_done(self, future: Future) -> None:
        """A cancelled future: its calls are skipped, or never claimed at all."""
        if not future.cancelled() or future.chunk is None:
            return  # still in the window: the flush leaves it out
        number, index = future.chunk
        batch = next((b for b in self.monitor.live_batches() if b.number == number), None)
        if batch is None:
            return
        spool.append_cancelled(spool.cancel_path(self.run_dir, number, index),
                               future.call_ids)
        cancelled = self._cancelled.setdefault(future.chunk, set())
        cancelled.update(future.call_ids)
        chunk_ids = batch.chunks[index]
        claim = spool.claim_path(self.run_dir, number, index)
        if cancelled >= set(chunk_ids) and spool.try_claim(claim, "client"):
            self.monitor.drop_chunk(batch, index)  # no task will ever take it

    # -- shutdown -----------------------------------------------------------------------

    def _wait_for_batches(self) -> None:
        while self.monitor.live_batches() or self._window is not None:
            self._flush_window()
            time.sleep(0.02)

    def _finish_in_background(self) -> None:
        self._wait_for_batches()
        self.monitor.stop()
        self.backend.close()


def _chained_results(futures: list[SlurmFuture], end_time: float | None,
                     bar: CallProgress) -> Iterator:
    """Yield the calls' results in order; raise a call's exception at its position."""
    try:
        futures.reverse()
        while futures:
            future = futures[-1]
            if end_time is None:
                outcomes = future.result()
            else:
                outcomes = future.result(end_time - time.monotonic())
            futures.pop()
            for ok, value in outcomes:
                if not ok:
                    raise value
                yield value
    finally:
        for future in futures:
            future.cancel()
        bar.close()
