"""SlurmExecutor: a `concurrent.futures.Executor` whose calls run as Slurm job arrays.

Data flow (compare CPython's concurrent/futures/process.py):

 caller threads                owner thread (engine.py)                run folder      array task
 --------------                ------------------------                ----------      ----------
 submit(fn, *a) (calls.py;
   ex.options(...) views too)
   pickle args now (a bad
   argument fails here)
   put Submit --------------> window of its resource set (submit_window
   (futures among the args:     s, flushed by .result(), max_window,
    put Dependent: it waits     max_batch) (intake.py)
    for InputDone, then joins
    the window)
 map / submit_many
   pickle chunks now (an      write batch (batches.py) ---------> bNNNN/ fn, manifest,
   argument shared by many    futures RUNNING from here on          shared, cJJJJ.in;
   calls: once, sharing.py)   keep_alive: announce it ----------> batches (signal) --> warm tasks
   put Launch --------------> |                                     bNNNN.json         join it
 cancel / shutdown              v                                                    python -c ..
   put CancelCalls/Shutdown  core.state.Core.step(events, now) -> actions            worker
   (never touch state,          SubmitTasks (unless a warm task joined): ONE sbatch  (supervisor,
    never run a scheduler       --array=0-(K-1)%W (W: 1, or the idle slots) -------> child):
    command or folder write)    (refused by a limit: asked again, backing off)       claims chunks
                                LiftThrottle (scontrol) from the measured work       (claims/J,
                                WriteCancel (stop: the worker ends a running call)   O_EXCL),
                                CancelTasks (pending only), ClaimChunks, Retry       appends
                             each round: the streams the core asks for <------- bNNNN/tIIII.rA.out
                               (created empty at submit; a warm join: the old stream's end)
                             one squeue per poll_interval for all live arrays
                             Deliver/Fail -> set_result / set_exception (callbacks here)
                             renew the run's lease (heartbeat file)
                             wait: 1 ms after news, and for 15 ms after it (<= 64
                               tasks live); then backing off to 50 ms

Each `submit` returns a `SlurmFuture` (a real `concurrent.futures.Future`); `map` packs
calls into one batch with one internal future per chunk and yields in order. The
decisions (settling tasks, scale-out, retries, cancellation) are the pure core in
core/ (state.py over store.py's state; policies.py, joins.py, answers.py); the owner in owner/engine.py only
carries them out.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slurmexecutor import __version__
from slurmexecutor._log import log
from slurmexecutor.calls import CallMaker, callable_name
from slurmexecutor.core.ledger import Config
from slurmexecutor.core.state import Core
from slurmexecutor.errors import RunFormatError, RunNotFoundError
from slurmexecutor.folder import formats, spool
from slurmexecutor.folder.folders import default_folder
from slurmexecutor.folder.lease import Lease
from slurmexecutor.owner.batches import BatchSpec, Settings, dumps
from slurmexecutor.owner.caching import CallCache, open_cache
from slurmexecutor.owner.engine import Engine
from slurmexecutor.owner.futures import FutureSink, SlurmFuture, call_log
from slurmexecutor.owner.handoff import CancelCalls, Launch, Shutdown
from slurmexecutor.schedulers.choose import make_backend, warn_if_node_local
from slurmexecutor.schedulers.script import (
    SBATCH_OPTIONS,
    link_package,
    validate_extra,
    validate_resources,
)

if TYPE_CHECKING:
    from slurmexecutor.reports.report_serve import ReportServer

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
#: set at interpreter exit (as `_global_shutdown` in concurrent/futures/process.py): no
#: executor takes new calls from then on, whichever thread makes them
_global_shutdown = False


def _finish_at_exit() -> None:
    """Interpreter exit: finish submitted work, as the stdlib executors do."""
    global _global_shutdown
    _global_shutdown = True
    engines = list(_live_engines)
    for engine in engines:
        engine.put(Shutdown(cancel_futures=False))
    for engine in engines:
        engine.join()


threading._register_atexit(_finish_at_exit)  # type: ignore[attr-defined]


class SlurmExecutor(CallMaker, Executor):
    """Run calls on Slurm (or locally) as packed job arrays; see the module docstring.

    Resources are sbatch long options as keywords (`partition="short"`, `time="1:00:00"`,
    `mem="4G"`, `cpus_per_task=2`, `array_parallelism=50`, ...); `sbatch_extra` adds raw
    options and `setup` adds shell lines run before the worker (`module load ...`).
    `cache=True` keeps successful results in `<folder>/cache` (`cache="PATH"`: there) and
    answers repeated calls from it without a job; `ex.options(mem=...)` makes calls with
    other resources (calls.py); futures may be passed as arguments (dependencies.py).
    """

    def __init__(
        self,
        folder: str | os.PathLike | None = None,
        *,
        backend: str = "auto",
        chunksize: int | None = None,
        max_retries: int = 0,
        retry_on: Iterable[str] = DEFAULT_RETRY_ON,
        retry_resources: Mapping[str, Callable[[Any, int], Any]] | None = None,
        python: str | None = None,
        setup: Iterable[str] = (),
        sbatch_extra: Iterable[str] = (),
        submit_window: float = 0.05,
        max_window: float = 1.0,
        max_batch: int = 10_000,
        poll_interval: float | None = None,
        result_grace: float | None = None,
        close_to_open: bool = True,
        backups: bool = False,
        keep_alive: float = DEFAULT_KEEP_ALIVE,
        cache: bool | str | os.PathLike = False,
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
        retry_resources = dict(retry_resources or {})
        if retry_resources:  # growth rules for OUT_OF_MEMORY: those retries are wanted
            unknown = set(retry_resources) - set(SBATCH_OPTIONS)
            if unknown or max_retries < 1 or not all(map(callable, retry_resources.values())):
                raise ValueError("retry_resources needs max_retries >= 1 and a callable "
                                 "rule(value, attempt) per resource option (unknown: "
                                 f"{sorted(unknown)})")
            retry_on = {*retry_on, "OUT_OF_MEMORY"}
        if isinstance(keep_alive, bool) or not isinstance(keep_alive, (int, float)) or (
                keep_alive < 0):
            raise ValueError(f"keep_alive must be seconds >= 0, not {keep_alive!r}")
        self.folder = spool.ensure_private_dir(Path(folder or default_folder()).expanduser())
        self.key = spool.load_key(self.folder, create=True)
        store = open_cache(cache, self.folder, self.key)
        self.backend = make_backend(backend, self.resources)
        warn_if_node_local(self.folder, self.backend)
        self.chunksize = chunksize
        local = self.backend.same_host
        self.run_id = _run or time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        self.run_dir = spool.ensure_private_dir(self.folder / self.run_id)
        spool.ensure_private_dir(self.run_dir / "logs")
        link_package(self.run_dir)
        lease = Lease(self.run_dir)
        lease.acquire(take_over=_take_over)
        if _run is None:
            spool.write_signed_json(self.run_dir / "run.json", self.key, {
                "format": formats.RUN_FORMAT, "version": __version__,
                "created": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
                "backend": self.backend.name, "resources": self.resources,
                "cwd": os.getcwd(), "setup": setup, "sbatch_extra": sbatch_extra,
                "python": python or sys.executable,
            })
        poll = poll_interval if poll_interval is not None else (
            0.05 if self.backend.cheap_states else 2.0)
        core = Core(Config(
            poll_interval=poll,
            result_grace=result_grace if result_grace is not None else (
                0.0 if local else DEFAULT_RESULT_GRACE),
            retry_on=frozenset(retry_on), max_retries=max_retries,
            keep_alive=float(keep_alive), close_to_open=close_to_open))
        self._executor = self
        self._settings = Settings(
            resources=self.resources, python=python or sys.executable, setup=setup,
            sbatch_extra=sbatch_extra, chunksize=chunksize, submit_window=submit_window,
            max_window=max_window, max_batch=max_batch, slots=self.backend.slots(),
            backups=backups, keep_alive=float(keep_alive), retry_resources=retry_resources)
        #: the result cache (caching.py), or None
        self._cache = CallCache(store) if store is not None else None
        self._engine = Engine(self.run_dir, self.key, self.backend, core, self._settings, lease,
                              self._cache)
        self._lock = threading.Lock()  # call ids, and the shutdown flag vs. new requests
        self._next_call = 0
        self._shutdown = False
        self._report_server: ReportServer | None = None  # report_url()'s, until shutdown
        #: every call's future, by call id, for runs reattached with `attach`
        self.futures: dict[int, SlurmFuture] = {}
        if _run is not None:
            from slurmexecutor.owner.reattach import reattach

            try:
                self.futures = reattach(self._engine, self.resources.get("time"))
            except BaseException:  # a failed attach leaves the run as it found it
                lease.release()
                raise
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
        CallLostError, and those an earlier client cancelled stay cancelled
        (JobCancelledError). A run of another run format raises RunFormatError. A run
        whose lease is live (its client still runs, on any host)
        raises RunInUseError unless `take_over=True`; the other client then stops.
        """
        root = Path(folder or default_folder()).expanduser()
        meta_path = root / run / "run.json"
        if not meta_path.exists():
            raise RunNotFoundError(f"no run {run!r} in {root}")
        meta = spool.read_signed_json(meta_path, spool.load_key(root))
        if meta.get("format", 1) != formats.RUN_FORMAT:
            raise RunFormatError(
                f"run {run!r} was written by slurmexecutor {meta.get('version', '< 0.1.0')} "
                f"in the run format {meta.get('format', 1)}; this slurmexecutor "
                f"({__version__}) reads format {formats.RUN_FORMAT} only: attach it with "
                "the version that wrote it")
        options.setdefault("backend", meta["backend"])
        for name in ("setup", "sbatch_extra"):
            options.setdefault(name, meta.get(name, ()))
        resources = {**meta["resources"], **options.pop("resources", {})}
        return cls(root, _run=run, _take_over=take_over, **options, **resources)

    # -- the Executor interface (submit, map, submit_many, options: calls.py) ---------

    def cancel(self, futures: Iterable[Future]) -> None:
        """Cancel calls still in the window; stop the handed-over ones: the workers skip
        those not started and end those running (cooperatively, within ~0.5 s; the task
        carries on). Those futures then fail with JobCancelledError (or keep a result that
        came first)."""
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
            server, self._report_server = self._report_server, None
        if server is not None:  # report_url()'s page ends with the executor
            server.close()
        if wait:
            self._engine.join()

    # -- watching the run (report.py); nothing is served unless asked -------------------

    def report_url(self, port: int = 0) -> str:
        """Serve this run's live report on 127.0.0.1 and return its address. The first
        call starts the server (a daemon thread); it stops at `shutdown()` (the `with`
        block's end, or interpreter exit), after which this raises RuntimeError (then:
        `slurmexecutor report RUN --serve`)."""
        with self._lock:
            if self._shutdown:
                raise RuntimeError(f"executor of run {self.run_id} is shut down: its report "
                                   f"is no longer served (slurmexecutor report {self.run_id}"
                                   " --serve serves it)")
            if self._report_server is None:
                from slurmexecutor.reports.report_serve import ReportServer

                self._report_server = ReportServer(self.run_dir, port).start()
                log.info("run %s: live report at %s", self.run_id, self._report_server.url)
            return self._report_server.url

    def _repr_html_(self) -> str:
        from slurmexecutor.reports.report import summary

        return summary(self.run_dir, self.key)

    # -- helpers -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if _global_shutdown:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if self._engine.error is not None or not self._engine.alive:
            raise RuntimeError(f"this executor has stopped: {self._engine.error}")

    def _reserve(self, count: int) -> int:
        with self._lock:
            first, self._next_call = self._next_call, self._next_call + count
        return first

    def _put_launch(self, spec: BatchSpec, sinks: list[FutureSink],
                    cache_keys: dict[int, str] | None = None) -> None:
        with self._lock:
            self._check_open()
            self._engine.put(Launch(spec, sinks, cache_keys))

    def _slots_for(self, settings: Settings) -> int:
        """How many tasks of these resources can run at once (a view's)."""
        return self.backend.slots_for(settings.resources)

    def _pickled(self, fn: Callable, fingerprint: str | None = None) -> tuple[Any, bytes]:
        """The function pickled now, at submit, like the arguments: a bound method whose
        object changes, or a changed global of `__main__`, is seen by the next call. Calls
        whose pickles are equal share one copy in their batch (the key is its digest);
        nothing here keeps the function alive."""
        blob = dumps(fn, f"the function {callable_name(fn)}")
        return (hashlib.blake2b(blob, digest_size=16).digest(), fingerprint), blob
