"""The exceptions users catch.

A call that raised is re-raised on the client as its *original* exception, with the
remote traceback attached as `__cause__` (a `RemoteTraceback`), as ProcessPoolExecutor
does. Everything else derives from `SlurmExecutorError`:

    SlurmExecutorError
     +-- SubmissionError          sbatch (or the local launcher) refused the work
     |    +-- SubmissionDeferred     refused for now by a limit (queue full, submit limit)
     +-- SerializationError       an argument or a result could not be pickled
     +-- IntegrityError           a spool file failed authentication or is truncated
     +-- RunNotFoundError         attach() to a run that is not in the folder
     +-- RunInUseError            attach() to a run whose client still holds its lease
     +-- RunFormatError           attach() to a run another slurmexecutor wrote its way
     +-- RemoteError              a call raised an exception that does not unpickle here
     +-- TaskFailedError          the array task carrying the call ended without its result
          +-- JobTimeoutError        the time limit (Slurm TIMEOUT)
          +-- OutOfMemoryError       Slurm OUT_OF_MEMORY
          +-- NodeFailureError       Slurm NODE_FAIL
          +-- PreemptedError         Slurm PREEMPTED
          +-- JobCancelledError      cancelled outside this client (scancel)
          +-- WorkerCrashedError     the worker died: non-zero exit code or a signal
          +-- CallLostError          the task left the queue and its state is unknown
"""

from __future__ import annotations

import pickle
from pathlib import Path


class SlurmExecutorError(Exception):
    """Base of every error slurmexecutor raises itself."""


class SubmissionError(SlurmExecutorError):
    """The scheduler refused a submission (bad partition, bad option, no Slurm, ...)."""


class SubmissionDeferred(SubmissionError):
    """The scheduler refused a submission only for now: a limit on queued jobs was
    reached (the controller's MaxJobCount, a QOS or association submit limit). The
    same submission is expected to pass once the queue shrinks. The message is the
    scheduler's; `retry_after` is a hint in seconds for when to try again; `kind` names
    the limit ("job_count", "submit_limit", "busy")."""

    def __init__(self, message: str, retry_after: float = 10.0, kind: str = "") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.kind = kind

    def __reduce__(self):
        return (type(self), (str(self), self.retry_after, self.kind))


class SerializationError(SlurmExecutorError, TypeError, pickle.PicklingError):
    """A function, argument or result could not be pickled (or unpickled). It is a
    `pickle.PicklingError` (what the stdlib pools give) and a `TypeError`; `__cause__`
    is the exception pickling raised."""


class DependencyError(SlurmExecutorError):
    """A call's input (a future passed as an argument) failed or was cancelled; the
    message names the input's call and `__cause__` is its exception."""


class EnvironmentMismatchError(SlurmExecutorError):
    """The worker's interpreter cannot run the client's calls: another Python major.minor
    or cloudpickle version (the message names both and the interpreters)."""


class IntegrityError(SlurmExecutorError):
    """A spool file failed authentication, or is truncated."""


class RunNotFoundError(SlurmExecutorError, LookupError):
    """No run of that name in the folder."""


class RunFormatError(SlurmExecutorError):
    """The run's files are in another layout than this slurmexecutor's (written by an
    older or newer version): attach it with the version that wrote it."""


class RunInUseError(SlurmExecutorError):
    """The run's lease is live: another client still drives it (`take_over=True` to
    take it anyway)."""


class RemoteError(SlurmExecutorError):
    """A call raised an exception that could not be sent back as its own type."""


class RemoteTraceback(Exception):
    """Carries the traceback text of an exception raised on a worker."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class TaskFailedError(SlurmExecutorError):
    """The array task that carried this call ended before writing the call's result."""

    def __init__(
        self,
        message: str,
        *,
        job_id: str | None = None,
        array_index: int | None = None,
        state: str | None = None,
        exit_code: int | None = None,
        signal: int | None = None,
        log_path: Path | None = None,
        log_tail: str = "",
        attempts: int = 1,
        call_id: int | None = None,
    ) -> None:
        self.job_id = job_id
        self.array_index = array_index
        self.state = state
        self.exit_code = exit_code
        self.signal = signal
        self.log_path = log_path
        self.log_tail = log_tail
        self.attempts = attempts
        self.call_id = call_id
        self.message = message
        super().__init__(message)

    def __reduce__(self):  # keyword-only arguments need help to pickle
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))

    def __str__(self) -> str:
        where = f"job {self.job_id}" + (
            f"_{self.array_index}" if self.array_index is not None else ""
        )
        facts = [f"state={self.state}"]
        if self.exit_code is not None:
            facts.append(f"exit code {self.exit_code}")
        if self.signal:
            facts.append(f"signal {self.signal}")
        if self.attempts > 1:
            facts.append(f"after {self.attempts} attempts")
        text = f"{self.message} ({where}, {', '.join(facts)})"
        if self.log_path:
            text += f"\nlog: {self.log_path}"
        if self.log_tail:
            text += "\n--- last lines of the log ---\n" + self.log_tail.rstrip()
        return text


def _rebuild(cls: type[TaskFailedError], message: str, state: dict) -> TaskFailedError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class JobTimeoutError(TaskFailedError):
    """The task hit its time limit before this call finished."""


class OutOfMemoryError(TaskFailedError):
    """The task ran out of memory."""


class NodeFailureError(TaskFailedError):
    """The node running the task failed."""


class PreemptedError(TaskFailedError):
    """The task was preempted."""


class JobCancelledError(TaskFailedError):
    """The task was cancelled outside this client (e.g. `scancel`)."""


class WorkerCrashedError(TaskFailedError):
    """The worker died: a non-zero exit code, or killed by a signal. Only the call it
    ran fails (the others of its chunk run on), where the stdlib's process pool breaks
    with `BrokenProcessPool`."""


class CallLostError(TaskFailedError):
    """The task left the queue without a result and the scheduler cannot say why."""


#: Slurm's final job states -> the error a call without a result gets.
ERROR_FOR_STATE: dict[str, type[TaskFailedError]] = {
    "TIMEOUT": JobTimeoutError,
    "DEADLINE": JobTimeoutError,
    "OUT_OF_MEMORY": OutOfMemoryError,
    "NODE_FAIL": NodeFailureError,
    "BOOT_FAIL": NodeFailureError,
    "PREEMPTED": PreemptedError,
    "CANCELLED": JobCancelledError,
    "FAILED": WorkerCrashedError,
    "COMPLETED": WorkerCrashedError,
}
