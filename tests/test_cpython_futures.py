"""CPython's own `test_concurrent_futures`, run against `SlurmExecutor` on both backends.

The tests are imported from the standard library of the running Python (its `test`
package: 3.12+ ship `test.test_concurrent_futures` as a package, 3.10 as one module).
Some builds omit the `test` package (pyenv's 3.11 here): then this module is skipped
with that reason, never silently; `scripts/other_pythons.sh` runs it on 3.13 with the
real Slurm cluster and the local backend.

Each CPython test class (`ExecutorTest`, `WaitTests`, `AsCompletedTests`,
`ExecutorShutdownTest`, `ExecutorDeadlockTest`) is combined with `SlurmMixin`, which
builds a `SlurmExecutor` per test in place of the pool. Tests that cannot apply to a
remote executor are listed in `EXCLUDED`, each with its reason.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
import unittest
from typing import ClassVar

import pytest

from slurmexecutor import SlurmExecutor


def _load() -> dict[str, type]:
    """The CPython test classes by name, from whichever layout this Python ships."""
    names = ("ExecutorTest", "WaitTests", "AsCompletedTests", "ExecutorShutdownTest",
             "ExecutorDeadlockTest")
    found: dict[str, type] = {}
    try:
        for module in ("executor", "test_wait", "test_as_completed", "test_shutdown",
                       "test_deadlock"):
            loaded = importlib.import_module(f"test.test_concurrent_futures.{module}")
            found.update({n: getattr(loaded, n) for n in names if hasattr(loaded, n)})
        found["BaseTestCase"] = importlib.import_module(
            "test.test_concurrent_futures.util").BaseTestCase
    except ModuleNotFoundError:
        try:  # 3.10, 3.11: one module
            loaded = importlib.import_module("test.test_concurrent_futures")
        except ModuleNotFoundError as error:
            pytest.skip(f"this Python's standard library has no test_concurrent_futures "
                        f"({error}); other_pythons.sh runs it on 3.13", allow_module_level=True)
        found = {n: getattr(loaded, n) for n in (*names, "BaseTestCase")}
    return found


CLASSES = _load()

#: CPython tests that cannot apply to a remote executor, with the reason.
EXCLUDED: dict[str, str] = {
    "test_max_workers_negative": "max_workers is a pool argument; the cluster sizes a run",
    "test_shutdown_race_issue12456": "relies on ProcessPoolExecutor internals",
    "test_processes_terminate": "ProcessPoolExecutor internals (_processes)",
    "test_hang_gh94440": "uses a multiprocessing context (mp_context)",
    "test_hang_gh83386": "runs a subprocess with ProcessPoolExecutor's spawn context",
    "test_interpreter_shutdown": "runs a child interpreter that builds the stdlib pool "
                                 "by class name (covered by tests/test_contract.py)",
    "test_submit_after_interpreter_shutdown": "same: a child interpreter with the pool "
                                              "(tests/test_futures_end.py covers ours)",
    "test_error_at_task_pickle": "an argument that cannot be pickled raises at submit "
                                 "(SerializationError, a PicklingError): the call never "
                                 "leaves the client (tests/test_executor.py)",
    "test_error_at_task_unpickle": "an argument that fails to unpickle on the worker is "
                                   "that call's exception (its own type), not a broken pool",
    "test_error_during_result_unpickle_in_result_handler": "a result that fails to "
        "unpickle in the client is that call's SerializationError, not a broken pool",
    "test_exit_during_result_unpickle_in_result_handler": "same: the call's own error",
    "test_cancel_futures": "calls handed to the cluster are RUNNING at once (tasks claim "
                           "them asynchronously), so shutdown(cancel_futures=True) cancels "
                           "the window only; handed-over calls not started fail with "
                           "JobCancelledError (README: Futures, cancel and shutdown)",
    "test_exit_at_task_unpickle": "a worker that dies fails only the call it ran, with "
                                  "WorkerCrashedError; the stdlib pool breaks "
                                  "(BrokenProcessPool) and fails every call",
    "test_crash_at_task_unpickle": "same: WorkerCrashedError for that call only",
    "test_crash_during_func_exec_on_worker": "same: WorkerCrashedError for that call only",
    "test_crash_during_result_pickle_on_worker": "same: WorkerCrashedError for that call",
    "test_shutdown_deadlock": "uses ProcessPoolExecutor internals (_executor_manager_thread)",
    "test_shutdown_deadlock_pickle": "uses ProcessPoolExecutor internals",
    "test_crash_big_data": "BrokenProcessPool contract",
    "test_gh105829_should_not_deadlock_if_wakeup_pipe_full": "ProcessPoolExecutor's "
                                                             "wakeup pipe",
    "test_pending_calls_race": "ThreadPool only",
}


class SlurmMixin:
    """Build a SlurmExecutor in place of the pool (`backend` set by the subclass)."""

    backend = "local"
    worker_count = 5
    executor_kwargs: ClassVar[dict] = {}

    def executor_type(self, max_workers: int | None = None,
                      mp_context: object = None) -> SlurmExecutor:
        """What ExecutorDeadlockTest builds for itself: another executor, same backend."""
        folder = tempfile.mkdtemp(prefix="cpython-futures-")
        self.addCleanup(shutil.rmtree, folder, True)  # type: ignore[attr-defined]
        return SlurmExecutor(folder, backend=self.backend, keep_alive=5,
                             poll_interval=0.3 if self.backend == "slurm" else 0.05)

    def get_context(self) -> None:
        return None

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        import time

        self.t1 = time.monotonic()
        self._folder = tempfile.TemporaryDirectory(prefix="cpython-futures-")
        self.executor = SlurmExecutor(self._folder.name, backend=self.backend,
                                      poll_interval=0.3 if self.backend == "slurm" else 0.05,
                                      keep_alive=5)

    def tearDown(self) -> None:
        self.executor.shutdown(wait=True)
        self.executor = None
        self._folder.cleanup()
        super().tearDown()  # type: ignore[misc]


def _skip_excluded(cls: type) -> type:
    for name in dir(cls):
        if name in EXCLUDED:
            setattr(cls, name, unittest.skip(EXCLUDED[name])(getattr(cls, name)))
    return cls


def _make(name: str, backend: str) -> type:
    bases = (SlurmMixin, CLASSES[name], CLASSES["BaseTestCase"])
    cls = type(f"{backend.title()}{name}", bases, {"backend": backend})
    if backend == "slurm":
        cls = pytest.mark.slurm(cls)
        cls = pytest.mark.usefixtures("slurm_cluster")(cls)
    return _skip_excluded(cls)


for _backend in ("local", "slurm"):
    for _name in ("ExecutorTest", "WaitTests", "AsCompletedTests", "ExecutorShutdownTest",
                  "ExecutorDeadlockTest"):
        _cls = _make(_name, _backend)
        globals()[_cls.__name__] = _cls
del _cls, _backend, _name
