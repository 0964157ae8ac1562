"""Turning the core's verdicts into what a future gets: a value or an exception.

`decode` reads a worker's record of a call (ok, raised, unpicklable, crash, skip);
`failure_error` builds the exception for a `Failure`, with the task's log tail.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

from slurmexecutor._log import log
from slurmexecutor.core.events import Failure, TaskRef
from slurmexecutor.errors import (
    EnvironmentMismatchError,
    IntegrityError,
    JobCancelledError,
    OutOfMemoryError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    TaskFailedError,
    WorkerCrashedError,
)
from slurmexecutor.owner.futures import read_tail


def log_file(run_dir: Path, task: TaskRef | None) -> Path | None:
    if task is None or task.job_id is None:
        return None
    return run_dir / "logs" / f"{task.job_id}_{task.array_index}.log"


def decode(run_dir: Path, kind: str, call_id: int, body: Any, task: TaskRef,
           cancelled_here: bool = False) -> tuple[bool, Any]:
    """A worker's record of a call -> (ok, value or exception)."""
    if kind == "ok":
        try:
            return True, pickle.loads(body)
        except BaseException as exc:  # noqa: BLE001  (even SystemExit from __setstate__)
            return False, SerializationError(
                f"the result of call {call_id} cannot be unpickled here: {exc!r}")
    if kind == "raised":
        return False, rebuild_exception(body)
    if kind == "unpicklable":
        return False, unpicklable_result(body)
    if kind == "mismatch":
        return False, EnvironmentMismatchError(body)
    if kind == "crash":
        log.warning("job %s_%s: the worker died running call %d (%s)", task.job_id,
                    task.array_index, call_id, body["text"])
        return False, task_error(run_dir, WorkerCrashedError,
                                 f"the worker died running this call: {body['text']}", task,
                                 call_id, state="CRASHED", exit_code=body["exit_code"],
                                 signal=body["signal"])
    if kind == "cancelled":  # ex.cancel while it ran: its worker ended it, went on
        return False, task_error(run_dir, JobCancelledError,
                                 "the call was cancelled while it ran (its worker ended it)",
                                 task, call_id, state="CANCELLED")
    if kind == "skip":
        where = "" if cancelled_here else " outside this client"
        return False, task_error(run_dir, JobCancelledError,
                                 f"the call was cancelled{where} before it started", task,
                                 call_id, state="CANCELLED")
    return False, IntegrityError(f"unknown record kind {kind!r} for call {call_id}")


def out_of_memory(message: str, resources: dict, task: TaskRef) -> str:
    """An OUT_OF_MEMORY verdict's message with the memory the task asked for, and where
    to read what it used (accounting, where the cluster has it)."""
    asked = resources.get("mem") or (f"{resources['mem_per_cpu']} per CPU" if resources.get(
        "mem_per_cpu") else "the partition's default")
    return (f"{message}; it asked for mem={asked}: raise mem=, and see "
            f"what it used with `sacct -j {task.job_id}_{task.array_index} "
            "--format=JobID,ReqMem,MaxRSS` where accounting is on")


def told(failure: Failure, resources: dict, calls: int) -> Failure:
    """A task's failure as the user is told it: an OOM kill names the memory asked for;
    a failed task (not a cancel) is logged once, with how many calls it took down."""
    task = failure.task
    if task is None:
        return failure
    if failure.error_type is OutOfMemoryError:
        failure = dataclasses.replace(failure, message=out_of_memory(
            failure.message, resources, task))
    if issubclass(failure.error_type, TaskFailedError) and (
            failure.error_type is not JobCancelledError):
        log.warning("job %s_%s: %d call(s) failed: %s", task.job_id, task.array_index,
                    calls, failure.message)
    return failure


def failure_error(run_dir: Path, failure: Failure, call_id: int) -> BaseException:
    """The exception a call gets for a `Failure` decided by the core."""
    if failure.error is not None:
        return failure.error
    if issubclass(failure.error_type, TaskFailedError):
        return task_error(run_dir, failure.error_type, failure.message, failure.task,
                          call_id, state=failure.state, exit_code=failure.exit_code,
                          signal=failure.signal)
    return failure.error_type(failure.message)


def task_error(run_dir: Path, error_type: type[TaskFailedError], message: str,
               task: TaskRef | None, call_id: int, *, state: str | None,
               exit_code: int | None = None, signal: int | None = None) -> TaskFailedError:
    path = log_file(run_dir, task)
    return error_type(
        message, job_id=task.job_id if task else None,
        array_index=task.array_index if task else None, state=state, exit_code=exit_code,
        signal=signal, log_path=path, log_tail=read_tail(path),
        attempts=task.attempt if task else 1, call_id=call_id)


def unpicklable_result(body: dict | str) -> BaseException:
    """A result the worker could not pickle: a `SerializationError` (a PicklingError)
    whose `__cause__` is what pickling raised; an exception that is not a pickling or
    type error (SystemExit from `__reduce__`, say) is the call's exception itself, as the
    stdlib pools give it."""
    if isinstance(body, str):  # a record of an earlier version
        return SerializationError(body)
    original = rebuild_exception(body["error"])
    if not isinstance(original, (pickle.PicklingError, TypeError, AttributeError,
                                 RemoteError)):
        return original
    error = SerializationError(body["message"])
    error.__cause__ = original
    return error


def rebuild_exception(body: dict) -> BaseException:
    """The exception a call raised, as its own type when it unpickles here."""
    error: BaseException | None = None
    if body.get("blob") is not None:
        try:
            error = pickle.loads(body["blob"])
        except Exception:  # noqa: BLE001
            error = None
    if not isinstance(error, BaseException):
        error = RemoteError(f"{body['type']}: {body['message']}")
    error.__cause__ = RemoteTraceback(f'\n"""\n{body["tb"]}"""')
    return error
