"""The local backend: array tasks as local subprocesses, at most one per CPU by default.

It runs the very batch script Slurm would (with bash; `#SBATCH` lines are comments), once
its signature checks with the folder's key (spool.sign_script), and
mimics Slurm's states, including the time limit: SIGUSR1 shortly before it, then
SIGTERM, then SIGKILL, and the TIMEOUT state.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from slurmexecutor._log import log
from slurmexecutor.folder import spool
from slurmexecutor.schedulers.base import Backend, TaskKey, TaskState
from slurmexecutor.schedulers.script import parse_directives, time_limit_seconds, warning_seconds

KILL_WAIT = 2.0  # seconds between SIGTERM and SIGKILL, like Slurm's KillWait
#: seconds `close` waits for running tasks to end by themselves (after the executor's
#: last result they only write their end record, or leave warm) before ending them
CLOSE_WAIT = 10.0
_job_numbers = itertools.count(1)


@dataclass
class _Task:
    key: TaskKey
    script: Path
    log_file: Path
    process: subprocess.Popen | None = None
    started: float = 0.0
    warned: bool = False
    ending: str | None = None  # why we are killing it: CANCELLED or TIMEOUT
    limit: int | None = None  # its time limit (s): its script's `--time`
    kill_at: float = 0.0
    kills: int = 0  # how many times the kill deadline passed
    text: str = ""  # the script as verified at submission: what bash runs


class LocalBackend(Backend):
    """Runs array tasks as child processes. Subclasses (the allocation backend) change
    how a task is started, signalled and judged through the `_command`, `_final`,
    `_warn`, `_stop` and `_kill` hooks; the queue, throttles and limits are shared."""

    name = "local"
    same_host = True
    cheap_states = True  # allocation.py's steps too

    def __init__(self, resources: dict) -> None:
        self._slots = self._count_slots(resources)
        if resources.get("array_parallelism"):
            self._slots = min(self._slots, int(resources["array_parallelism"]))
        self._limit = time_limit_seconds(resources["time"]) if "time" in resources else None
        self._queue: deque[_Task] = deque()
        self._throttles: dict[str, int] = {}  # job id -> tasks at once (0: no limit)
        self._running: dict[TaskKey, _Task] = {}
        self._states: dict[TaskKey, TaskState] = {}
        self._lock = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="slurmexecutor-local",
                                        daemon=True)
        self._thread.start()

    def submit_array(self, script: Path, size: int, log_dir: Path,
                     throttle: int | None = None) -> str:
        job_id = self._new_job_id()
        text = spool.verified_script(script, spool.load_key(script.parent.parent.parent))
        limit = parse_directives(text).get("time")  # a view's own, too
        seconds = time_limit_seconds(limit) if limit else self._limit
        with self._lock:
            self._throttles[job_id] = throttle or 0
            for index in range(size):
                key = (job_id, index)
                self._queue.append(_Task(key, script, log_dir / f"{job_id}_{index}.log",
                                         limit=seconds, text=text))
                self._states[key] = TaskState("PENDING")
            self._lock.notify()
        log.info("%s array job %s: %d tasks", self.name, job_id, size)
        return job_id

    def set_throttle(self, job_id: str, throttle: int) -> None:
        with self._lock:
            self._throttles[job_id] = throttle
            self._lock.notify()

    def states(self, job_ids: Collection[str]) -> dict[TaskKey, TaskState]:
        with self._lock:
            return {key: state for key, state in self._states.items() if key[0] in job_ids}

    def cancel(self, refs: Collection[str], pending_only: bool = False) -> None:
        def matches(key: TaskKey, ref: str) -> bool:
            return ref == key[0] or ref == f"{key[0]}_{key[1]}"

        with self._lock:
            for task in list(self._queue):
                if any(matches(task.key, ref) for ref in refs):
                    self._queue.remove(task)
                    self._states[task.key] = TaskState("CANCELLED")
            for task in [] if pending_only else self._running.values():
                if any(matches(task.key, ref) for ref in refs) and not task.ending:
                    self._terminate(task, "CANCELLED")
            self._lock.notify()

    def max_array_size(self) -> int:
        return 1_000_000

    def idle_slots(self, resources: dict) -> int | None:
        with self._lock:
            return max(0, self._slots - len(self._running) - len(self._queue))

    def slots(self) -> int:
        return self._slots

    def close(self) -> None:
        """Start nothing more, and return once every task process has ended and been
        reaped: those still running after CLOSE_WAIT s are terminated (then killed)."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(CLOSE_WAIT)
        if self._thread.is_alive():
            with self._lock:
                for task in self._running.values():
                    if not task.ending:
                        self._terminate(task, "CANCELLED")
                self._lock.notify()
            self._thread.join(2 * KILL_WAIT + 1)

    # -- what subclasses change ---------------------------------------------------------

    def _count_slots(self, resources: dict) -> int:
        """Tasks at once before `array_parallelism`: one per `cpus_per_task` CPUs."""
        return max(1, (os.cpu_count() or 1) // int(resources.get("cpus_per_task") or 1))

    def _new_job_id(self) -> str:
        return f"{os.getpid()}{next(_job_numbers):04d}"

    def _command(self, task: _Task) -> tuple[list[str], dict[str, str]]:
        """The command and environment that run the task's batch script (the text
        verified at submission, not the file as it may be now)."""
        env = dict(os.environ, SLURMEXECUTOR_TASK=str(task.key[1]),
                   SLURMEXECUTOR_JOB=str(task.key[0]))
        if task.limit:  # as Slurm's: when the limit ends it (the worker's walltime.py)
            env["SLURM_JOB_END_TIME"] = str(int(time.time()) + task.limit)
        return ["bash", "-c", task.text, str(task.script)], env

    def _final(self, task: _Task, code: int) -> TaskState:
        """How a task whose process exited with `code` (negative: a signal) ended."""
        return _final_state(code, task.ending)

    def _warn(self, task: _Task) -> None:
        """The warning before the time limit (SIGUSR1 to the worker, as Slurm's B:USR1)."""
        self._signal(task, signal.SIGUSR1, group=False)

    def _stop(self, task: _Task) -> None:
        """Ask a task to end (cancel, time limit): SIGTERM to its process group."""
        self._signal(task, signal.SIGTERM)

    def _kill(self, task: _Task) -> None:
        """The task did not end KILL_WAIT s after `_stop`: SIGKILL its process group."""
        self._signal(task, signal.SIGKILL)

    # -- the launcher thread -----------------------------------------------------------

    def _loop(self) -> None:
        with self._lock:
            while not (self._closed and not self._running):
                self._reap()
                for task in list(self._queue):
                    if len(self._running) >= self._slots or self._closed:
                        break
                    if self._may_start(task):
                        self._queue.remove(task)
                        try:
                            self._start(task)
                        except OSError as error:  # no bash, no log folder, no fds...
                            log.warning("local task %s_%s could not start: %s",
                                        *task.key, error)
                            self._states[task.key] = TaskState("FAILED", 127)
                self._lock.wait(0.01 if self._running else 0.5)

    def _may_start(self, task: _Task) -> bool:
        throttle = self._throttles.get(task.key[0], 0)
        running = sum(1 for key in self._running if key[0] == task.key[0])
        return not throttle or running < throttle

    def _start(self, task: _Task) -> None:
        command, env = self._command(task)
        with open(task.log_file, "ab") as log_file:
            task.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        task.started = time.monotonic()
        self._running[task.key] = task
        self._states[task.key] = TaskState("RUNNING")

    def _reap(self) -> None:
        now = time.monotonic()
        for key, task in list(self._running.items()):
            assert task.process is not None  # _start sets it before the task runs
            code = task.process.poll()
            if code is None:
                self._enforce_limits(task, now)
                continue
            del self._running[key]
            self._states[key] = self._final(task, code)

    def _enforce_limits(self, task: _Task, now: float) -> None:
        if task.ending and now >= task.kill_at:
            task.kills += 1
            self._kill(task)
        elif task.limit is not None and not task.ending:
            elapsed = now - task.started
            if elapsed >= task.limit:
                self._terminate(task, "TIMEOUT")
            elif not task.warned and elapsed >= task.limit - warning_seconds(task.limit):
                task.warned = True
                self._warn(task)

    def _terminate(self, task: _Task, why: str) -> None:
        task.ending, task.kill_at = why, time.monotonic() + KILL_WAIT
        self._stop(task)

    @staticmethod
    def _signal(task: _Task, signum: int, group: bool = True) -> None:
        if task.process is None:  # not started: no process to signal
            return
        try:
            if group:
                os.killpg(task.process.pid, signum)
            else:
                task.process.send_signal(signum)
        except ProcessLookupError:
            pass


def _final_state(code: int, ending: str | None) -> TaskState:
    if ending:
        return TaskState(ending, None if code < 0 else code, -code if code < 0 else None)
    if code == 0:
        return TaskState("COMPLETED", 0)
    if code < 0:
        return TaskState("FAILED", None, -code)
    return TaskState("FAILED", code)
