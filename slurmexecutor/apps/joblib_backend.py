"""The joblib backend "slurmexecutor": `joblib.Parallel`, and so scikit-learn's `n_jobs`,
on a SlurmExecutor.

    with joblib.parallel_config(backend="slurmexecutor", partition="short", time="1:00:00"):
        results = joblib.Parallel(n_jobs=-1)(joblib.delayed(f)(x) for x in xs)

`import slurmexecutor` registers it: at once if joblib is imported already, else the moment
it is (a `sys.meta_path` hook: neither the client nor the worker pays for importing joblib).
`parallel_config`'s keywords other than joblib's own go to `SlurmExecutor`, and
`executor_backend` is the executor's `backend` ("slurm", "local", "auto"): joblib has that name.

How joblib's protocol maps onto the executor:

- `configure` (a Parallel call starts) makes one `SlurmExecutor(**options)`, in
  $SLURMEXECUTOR_FOLDER when no `folder` is given; `terminate` (it ends) shuts it down.
  n_jobs=1 runs in this process, as with every joblib backend.
- `submit` (`apply_async` before joblib 1.5): one joblib batch (`BatchedCalls`) is one
  `executor.submit`; batches dispatched together share a job array (submission window),
  and warm tasks run the later ones without a new sbatch.
- auto-batching: the duration reported for a batch is its run time on the worker, not
  dispatch-to-result (which here includes the queue and polling, and would pin batches
  at one call): batches grow until one runs ~0.2 s, joblib's target.
- errors: a task's exception comes back as its own type (remote traceback as `__cause__`);
  joblib then aborts and `abort_everything` cancels the outstanding batches and waits
  (up to ABORT_WAIT s) until they ended (`executor.cancel`: calls not started are
  skipped, running ones are stopped by their workers within ~0.5 s).
  The same on Ctrl-C, a Parallel `timeout`, or a `return_as="generator"` dropped early.
- effective_n_jobs: a positive n_jobs as given; negative ones (and None: -1) count back
  from the executor's slots (CPUs per `sinfo`, or this machine's for the local backend,
  over `cpus_per_task`, at most `array_parallelism`).
- a `Parallel` nested in a task runs sequentially in that task.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

NAME = "slurmexecutor"
#: seconds an abort waits for the cancelled calls to end (running ones are stopped by
#: their workers, which look every 0.5 s)
ABORT_WAIT = 10.0


def register() -> None:
    """Register the backend with joblib under NAME (this imports joblib)."""
    from joblib.parallel import register_parallel_backend

    register_parallel_backend(NAME, backend_class())


def register_on_import() -> None:
    """Register now if joblib is imported, else when it is (without importing it)."""
    if "joblib" in sys.modules:
        _register_or_warn()
    elif not any(isinstance(finder, _Hook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Hook())


def _register_or_warn() -> None:
    try:
        register()
    except Exception as error:  # noqa: BLE001  (never break `import joblib`)
        import warnings

        warnings.warn(f"slurmexecutor: joblib backend not registered: {error!r}", stacklevel=3)


class _Hook:
    """A `sys.meta_path` finder: runs joblib's own loader, then registers the backend."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "joblib":
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            spec = None if isinstance(finder, _Hook) or find is None else find(name, path, target)
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenRegister(spec.loader)
                return spec
        return None


class _ThenRegister:
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # joblib's own from here on
        self.loader.exec_module(module)
        for finder in [f for f in sys.meta_path if isinstance(f, _Hook)]:
            sys.meta_path.remove(finder)
        _register_or_warn()


def run_batch(batch: Any) -> tuple[float, Any]:
    """What an array task runs: a joblib batch, and how long it took (for auto-batching)."""
    import time

    start = time.perf_counter()
    results = batch()
    return time.perf_counter() - start, results


@functools.cache
def backend_class() -> type:
    """The backend class, built on first use (joblib is imported only then)."""
    import inspect
    import threading
    from concurrent.futures import Future

    import joblib._parallel_backends as jb

    class SlurmExecutorBackend(jb.AutoBatchingMixin, jb.ParallelBackendBase):
        """joblib's backend protocol on a SlurmExecutor (see joblib_backend.py)."""

        default_n_jobs = -1  # n_jobs=None under parallel_config(backend="slurmexecutor")
        supports_retrieve_callback = True  # results are read in the futures' callbacks

        def __init__(self, nesting_level: int | None = None,
                     inner_max_num_threads: int | None = None, **options: Any) -> None:
            super().__init__(nesting_level=nesting_level,
                             inner_max_num_threads=inner_max_num_threads)
            from slurmexecutor.executor import SlurmExecutor
            from slurmexecutor.schedulers.script import validate_resources

            if "executor_backend" in options:
                options["backend"] = options.pop("executor_backend")
            named = set(inspect.signature(SlurmExecutor).parameters)
            self.resources = validate_resources(
                {k: v for k, v in options.items() if k not in named})  # typos fail here
            self.options = options
            self.executor: SlurmExecutor | None = None
            self._slots: int | None = None
            self._futures: set[Future] = set()
            self._lock = threading.Lock()

        def effective_n_jobs(self, n_jobs: int | None) -> int:
            if n_jobs == 0:
                raise ValueError("n_jobs == 0 in Parallel has no meaning")
            if n_jobs is None or n_jobs < 0:
                return max(self.slots() + 1 + (n_jobs or -1), 1)
            return n_jobs

        def slots(self) -> int:
            """How many tasks the executor runs at once (asks the scheduler once)."""
            if self.executor is not None:
                return self.executor.backend.slots()
            if self._slots is None:  # before configure (or outside Parallel, as sklearn)
                from slurmexecutor.schedulers.choose import make_backend

                scheduler = make_backend(self.options.get("backend", "auto"), self.resources)
                self._slots = scheduler.slots()
                scheduler.close()
            return self._slots

        def configure(self, n_jobs: int = 1, parallel: Any = None, **joblib_options: Any) -> int:
            n_jobs = self.effective_n_jobs(n_jobs)
            if n_jobs == 1:
                raise jb.FallbackToBackend(jb.SequentialBackend(nesting_level=self.nesting_level))
            self.parallel = parallel
            if self.executor is None:
                from slurmexecutor.executor import SlurmExecutor

                self.executor = SlurmExecutor(**self.options)
            return n_jobs

        def submit(self, func: Any, callback: Any = None) -> Future:
            try:
                assert self.executor is not None, "submit before configure"
                future: Future = self.executor.submit(run_batch, func)
            except Exception as error:  # noqa: BLE001  (e.g. an argument that cannot
                future = Future()  # be pickled: the batch's error, which joblib raises)
                future.set_exception(error)
            else:
                with self._lock:
                    self._futures.add(future)
                future.add_done_callback(self._forget)
            if callback is not None:
                future.add_done_callback(callback)
            return future

        apply_async = submit  # joblib < 1.5 calls this name

        def _forget(self, future: Future) -> None:
            with self._lock:
                self._futures.discard(future)

        def retrieve_result_callback(self, future: Future) -> Any:
            seconds, results = future.result()
            jb.AutoBatchingMixin.batch_completed(self, len(results), seconds)
            return results

        def batch_completed(self, batch_size: int, duration: float) -> None:
            pass  # joblib's dispatch-to-result time: retrieve_result_callback reports instead

        def abort_everything(self, ensure_ready: bool = True) -> None:
            with self._lock:
                futures = list(self._futures)  # they leave the set as they settle
            if self.executor is not None:
                from concurrent.futures import wait  # (not at import: workers import this)

                self.executor.cancel(futures)
                wait(futures, timeout=ABORT_WAIT)  # stopped, not running
            if not ensure_ready:  # no more calls will come: shut down without waiting
                self.terminate()

        def terminate(self) -> None:
            with self._lock:
                cancel = bool(self._futures)  # after an abort; else all are done: wait
            executor, self.executor = self.executor, None
            if executor is not None:
                executor.shutdown(wait=not cancel, cancel_futures=cancel)
            self.reset_batch_stats()

        def get_nested_backend(self) -> tuple[Any, None]:
            return jb.SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None

    return SlurmExecutorBackend

