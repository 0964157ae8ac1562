"""SlurmExecutor: a `concurrent.futures.Executor` whose calls run as Slurm job arrays.

Data flow (compare CPython's concurrent/futures/process.py):

 caller threads                owner thread (engine.py)                run folder      array task
 --------------                ------------------------                ----------      ----------
 submit(fn, *a)
   pickle args now (a bad
   argument fails here)
   put Submit --------------> window (submit_window s, flushed by
 map / submit_many              .result(), max_window, max_batch)
   pickle chunks now (an      write batch (batches.py) ---------> bNNNN/ fn, manifest,
   argument shared by many    futures RUNNING from here on          shared, cJJJJ.in;
   calls: once, sharing.py)   keep_alive: announce it ----------> batches (signal) --> warm tasks
   put Launch --------------> |                                     bNNNN.json         join it
 cancel / shutdown              v                                                    python -c ..
   put CancelCalls/Shutdown  state.Core.step(events, now) -> actions                 worker (and
   (never touch state,          SubmitTasks (unless a warm task joined): ONE sbatch  child.py):
    never run a scheduler       --array=0-(K-1)%1 ---------------------------------> claims chunks
    command or folder write)    LiftThrottle (scontrol) from the measured work       (claims/J,
                                CancelTasks, WriteCancel, ClaimChunks, Retry         O_EXCL),
                             each round: scandir of live batches' folders          appends
                               + new records <--------------------------- bNNNN/tIIII.rA.out
                             one squeue per poll_interval for all live arrays
                             Deliver/Fail -> set_result / set_exception (callbacks here)
                             renew the run's lease (heartbeat file)

Each `submit` returns a `SlurmFuture` (a real `concurrent.futures.Future`); `map` packs
calls into one batch with one internal future per chunk and yields in order. The
decisions (settling tasks, scale-out, retries, cancellation) are the pure core in
state.py; the owner in engine.py only carries them out.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any

from . import spool
from ._log import log
from .bars import CallProgress
from .batches import BatchSpec, Chunk, Settings, auto_chunksize, dumps
from .engine import Engine
from .errors import RunNotFoundError
from .futures import ChunkSink, FutureSink, SlurmFuture, call_log
from .handoff import CancelCalls, Launch, Shutdown, Submit
from .lease import Lease
from .schedulers import make_backend
from .schedulers.script import link_package, validate_extra, validate_resources
from .sharing import SharedArguments
from .state import Config, Core

DEFAULT_RETRY_ON = ("NODE_FAIL", "PREEMPTED")
#: seconds a task that Slurm says has ended, but whose `end` record the client has not
#: read, is given for its results to show up: NFS caches attributes and directory
#: listings for up to 60 s by default (acregmax, acdirmax)
DEFAULT_RESULT_GRACE = 60.0
#: seconds an array task with nothing left to do waits for the executor's next batch
#: (warm.py): a follow-up call then starts in milliseconds, without sbatch; an idle
#: task holds its CPUs that long at most, and not after shutdown
DEFAULT_KEEP_ALIVE = 30.0
__all__ = ["DEFAULT_RETRY_ON", "SlurmExecutor", "SlurmFuture", "call_log", "default_folder"]

_live_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _finish_at_exit() -> None:
    """Interpreter exit: finish submitted work, as the stdlib executors do."""
    engines = list(_live_engines)
    for engine in engines:
        engine.put(Shutdown(cancel_futures=False))
    for engine in engines:
        engine.join()


threading._register_atexit(_finish_at_exit)  # type: ignore[attr-defined]


def default_folder() -> Path:
    """$SLURMEXECUTOR_FOLDER, else ~/.slurmexecutor (home is shared on most clusters)."""
    return Path(os.environ.get("SLURMEXECUTOR_FOLDER") or "~/.slurmexecutor").expanduser()


def _name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def function_key(fn: Callable) -> Any:
    """What makes two submitted callables the same function within a window: a bound
    method is re-created on every attribute access, so it is keyed by its object and
    function, anything else by identity."""
    owner, func = getattr(fn, "__self__", None), getattr(fn, "__func__", None)
    if owner is not None and func is not None:
        return ("method", id(owner), func)
    return ("id", id(fn))


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
        backups: bool = False,
        keep_alive: float = DEFAULT_KEEP_ALIVE,
        _run: str | None = None,
        _take_over: bool = False,
        **resources: Any,
    ) -> None:
        self.resources = validate_resources(resources)
        setup, sbatch_extra = [str(line) for line in setup], validate_extra(list(sbatch_extra))
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"chunksize must be >= 1, not {chunksize!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, not {max_retries!r}")
        if isinstance(keep_alive, bool) or not isinstance(keep_alive, (int, float)) or (
                keep_alive < 0):
            raise ValueError(f"keep_alive must be seconds >= 0, not {keep_alive!r}")
        self.folder = spool.ensure_private_dir(Path(folder or default_folder()).expanduser())
        self.key = spool.load_key(self.folder, create=True)
        self.backend = make_backend(backend, self.resources)
        self.chunksize = chunksize
        local = self.backend.same_host
        self.run_id = _run or time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        self.run_dir = spool.ensure_private_dir(self.folder / self.run_id)
        spool.ensure_private_dir(self.run_dir / "logs")
        lease = Lease(self.run_dir)
        lease.acquire(take_over=_take_over)
        link_package(self.folder)
        if _run is None:
            spool.write_json(self.run_dir / "run.json", {
                "created": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
                "backend": self.backend.name, "resources": self.resources,
                "cwd": os.getcwd(), "setup": setup, "sbatch_extra": sbatch_extra,
            })
        poll = poll_interval if poll_interval is not None else (0.05 if local else 2.0)
        core = Core(Config(
            poll_interval=poll,
            result_grace=result_grace if result_grace is not None else (
                0.0 if local else DEFAULT_RESULT_GRACE),
            retry_on=frozenset(retry_on), max_retries=max_retries,
            keep_alive=float(keep_alive)))
        self._engine = Engine(self.run_dir, self.key, self.backend, core, Settings(
            resources=self.resources, python=python or sys.executable, setup=setup,
            sbatch_extra=sbatch_extra, chunksize=chunksize, submit_window=submit_window,
            max_window=max_window, max_batch=max_batch, slots=self.backend.slots(),
            backups=backups, keep_alive=float(keep_alive)), lease)
        self._lock = threading.Lock()  # call ids, and the shutdown flag vs. new requests
        self._next_call = 0
        self._shutdown = False
        #: functions pickled for the current submission window: key -> (function, pickle)
        self._functions: dict[Any, tuple[Callable, bytes]] = {}
        self._functions_window = -1
        #: every call's future, by call id, for runs reattached with `attach`
        self.futures: dict[int, SlurmFuture] = {}
        if _run is not None:
            from .reattach import reattach

            self.futures = reattach(self._engine, self.resources.get("time"))
            self._next_call = max(self.futures, default=-1) + 1
        _live_engines.add(self._engine)
        self._engine.start()
        log.info("run %s in %s on the %s backend", self.run_id, self.folder, self.backend.name)

    @classmethod
    def attach(cls, run: str, folder: str | os.PathLike | None = None, *,
               take_over: bool = False, **options: Any) -> SlurmExecutor:
        """Reopen a run from its folder (e.g. after the client died) and follow it again.

        `executor.futures` maps every call id of the run to a future: calls with a result
        on disk resolve at once, live tasks are followed, lost ones fail with
        CallLostError. A run whose lease is live (its client still runs, on any host)
        raises RunInUseError unless `take_over=True`; the other client then stops.
        """
        root = Path(folder or default_folder()).expanduser()
        meta_path = root / run / "run.json"
        if not meta_path.exists():
            raise RunNotFoundError(f"no run {run!r} in {root}")
        meta = spool.read_json(meta_path)
        options.setdefault("backend", meta["backend"])
        for name in ("setup", "sbatch_extra"):
            options.setdefault(name, meta.get(name, ()))
        resources = {**meta["resources"], **options.pop("resources", {})}
        return cls(root, _run=run, _take_over=take_over, **options, **resources)

    # -- the Executor interface ----------------------------------------------------------

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> SlurmFuture:
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        arguments = dumps([(args, kwargs)], f"an argument of {_name(fn)}")
        key, blob = self._pickled(fn)
        with self._lock:
            self._check_open()
            future = SlurmFuture(self._engine, [self._next_call])
            self._next_call += 1
            self._engine.put(Submit(future, key, fn, blob, _name(fn), arguments))
        return future

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int | None = None, progress: bool | None = None) -> Iterator:
        """Like `Executor.map`: all calls go out now, as one array; results in order."""
        end_time = None if timeout is None else timeout + time.monotonic()
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        with self._lock:
            self._check_open()
        count, calls = _zipped(iterables)  # sized inputs are not copied into a list
        bar = CallProgress(count, progress and bool(count), desc=_name(fn))
        if not count:
            return _chained_results(self, [], end_time, bar)
        size = chunksize or self.chunksize or auto_chunksize(
            count, self._engine.settings.slots, self._engine.cost.get((_name(fn),)))
        blob = dumps(fn, f"the function {_name(fn)}")
        chunks, futures = [], []
        sinks: list[FutureSink] = []
        shared = SharedArguments()  # an object passed to many calls: stored once
        peek = list(itertools.islice(calls, max(2 * size, 16)))
        shared.find((args, {}) for args in peek)
        calls = itertools.chain(peek, calls)
        first = self._reserve(count)
        for start in range(0, count, size):
            part = list(itertools.islice(calls, size))
            ids = range(first + start, first + start + len(part))
            future = SlurmFuture(self._engine, ids)
            sinks.append(ChunkSink(future, ids[0], len(ids), progress=bar))
            chunks.append(Chunk(ids, [(0, dumps([(args, {}) for args in part],
                                                f"an argument of {_name(fn)}", shared),
                                       len(ids))]))
            futures.append(future)
        spec = BatchSpec("map", [blob], [_name(fn)], chunks,
                         min(self._engine.settings.slots, len(chunks)), shared=shared.blobs)
        self._put_launch(spec, sinks)
        return _chained_results(self, futures, end_time, bar)

    def submit_many(self, fn: Callable, calls: Iterable[tuple], *,
                    chunksize: int | None = None,
                    task_per_chunk: bool = False) -> list[SlurmFuture]:
        """Submit `fn(*args)` for each tuple in `calls` now, as one batch, with one
        Future per call and `chunksize` calls per chunk. With `task_per_chunk`, every
        chunk gets an array task of its own, all submitted at once (map_reduce's
        fractions); otherwise tasks claim chunks as usual."""
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        with self._lock:
            self._check_open()
        listed = [tuple(args) for args in calls]
        shared = SharedArguments()  # an object passed to many calls: stored once
        shared.find((args, {}) for args in listed)
        arguments = [dumps([(args, {})], f"an argument of {_name(fn)}", shared)
                     for args in listed]
        if not arguments:
            return []
        blob = dumps(fn, f"the function {_name(fn)}")
        first = self._reserve(len(arguments))
        futures = [SlurmFuture(self._engine, [first + i]) for i in range(len(arguments))]
        size = chunksize or self.chunksize or auto_chunksize(
            len(arguments), self._engine.settings.slots, self._engine.cost.get((_name(fn),)))
        chunks = [Chunk([f.call_id for f in futures[s:s + size]],
                        [(0, a, 1) for a in arguments[s:s + size]])
                  for s in range(0, len(arguments), size)]
        planned = len(chunks) if task_per_chunk else min(self._engine.settings.slots,
                                                         len(chunks))
        spec = BatchSpec("fractions" if task_per_chunk else "submit", [blob], [_name(fn)],
                         chunks, planned, steal=not task_per_chunk, shared=shared.blobs)
        self._put_launch(spec, [FutureSink(f) for f in futures])
        return futures

    def cancel(self, futures: Iterable[Future]) -> None:
        """Cancel calls still in the window; stop the handed-over ones best effort: the
        workers skip those not started, and tasks holding nothing else are killed. Those
        futures then fail with JobCancelledError (or keep a result that came first)."""
        call_ids: list[int] = []
        for future in futures:
            if future.done() or future.cancel():
                continue
            if isinstance(future, SlurmFuture) and future._engine is self._engine:
                call_ids += future.call_ids
        if call_ids:
            self._engine.put(CancelCalls(frozenset(call_ids)))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            self._engine.put(Shutdown(cancel_futures))
        if wait:
            self._engine.join()

    # -- helpers -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if self._engine.error is not None or not self._engine.alive:
            raise RuntimeError(f"this executor has stopped: {self._engine.error}")

    def _reserve(self, count: int) -> int:
        with self._lock:
            first, self._next_call = self._next_call, self._next_call + count
        return first

    def _put_launch(self, spec: BatchSpec, sinks: list[FutureSink]) -> None:
        with self._lock:
            self._check_open()
            self._engine.put(Launch(spec, sinks))

    def _pickled(self, fn: Callable) -> tuple[Any, bytes]:
        """The function pickled once per submission window (bound methods included)."""
        key = function_key(fn)
        if self._functions_window != self._engine.window_generation:
            self._functions, self._functions_window = {}, self._engine.window_generation
        cached = self._functions.get(key)
        if cached is None:  # the function is kept too: its id stays unique meanwhile
            cached = self._functions[key] = (fn, dumps(fn, f"the function {_name(fn)}"))
        return key, cached[1]


def _zipped(iterables: tuple[Iterable, ...]) -> tuple[int, Iterator[tuple]]:
    """How many calls a map makes, and an iterator over their argument tuples: sized
    inputs (lists, ranges, arrays) are not copied, others are read into a list once."""
    if all(hasattr(it, "__len__") for it in iterables):
        return min(len(it) for it in iterables), zip(*iterables)  # type: ignore[arg-type]
    items = list(zip(*iterables))
    return len(items), iter(items)


def _chained_results(executor: SlurmExecutor, futures: list[SlurmFuture],
                     end_time: float | None, bar: CallProgress) -> Iterator:
    """Yield the calls' results in order; raise a call's exception at its position.
    Abandoning the iterator stops the calls that have not run yet."""
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
        if futures:
            executor.cancel(futures)
        bar.close()
