"""The vocabulary between the owner thread and the pure core (state.py).

Events are what the owner saw or was asked (records read, scheduler answers, caller
requests); actions are what the core decided (submit, scancel, resolve a future, ...).
All are frozen dataclasses of plain values, so the core's tests need no processes.
`Deliver` carries a run of one task's results as plain tuples: a million-call map
builds no object per call (`Deliver.each` gives them named).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from slurmexecutor.schedulers import TaskKey, TaskState

# -- events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchAdded:
    batch: int
    chunks: list[Sequence[int]]
    planned: int
    steal: bool = True
    attempt: int = 1
    time_limit: str | None = None
    throttled: bool = False
    arrays: tuple[tuple[str, int, int], ...] = ()  # (job id, offset, size) already out
    open_calls: frozenset[int] | None = None  # None: all of its calls
    resources: str = ""  # its resources key: only warm tasks of the same may join it
    attached: bool = False  # an earlier client's (attach): its warm tasks may join it
    reruns: int = 0  # its calls ran again this often without using up a retry
    #: idle slots the scheduler reported for its resources (a cached query; None: not
    #: asked), and the task-seconds per call measured for its functions (None: never)
    free: int | None = None
    measured: float | None = None


@dataclass(frozen=True)
class TasksSubmitted:
    batch: int
    job_id: str
    offset: int
    size: int


@dataclass(frozen=True)
class SubmitFailed:
    batch: int
    error: BaseException


@dataclass(frozen=True)
class SubmitDeferred:
    """sbatch was refused by a limit that passes (MaxJobCount, a QOS's submit limit):
    tasks first..first+count-1 are still to be submitted."""

    batch: int
    first: int
    count: int
    throttled: bool
    error: BaseException


@dataclass(frozen=True)
class Record:
    batch: int
    task: int
    kind: str
    call_id: int | None
    body: Any
    attempt: int = 0  # of the stream it was read from (tIIII.rA.out: A, Slurm's restarts)


@dataclass(frozen=True)
class Records:
    """The records one read of a task's stream found, in order: what many `Record`s
    would say, at one event's cost (a map's calls are a record each)."""

    batch: int
    task: int
    records: Sequence[tuple[str, int | None, Any]]  # (kind, call id, body)
    attempt: int = 0  # of the stream they were read from


@dataclass(frozen=True)
class StreamState:
    """What the engine saw of a task's stream: a failed signature, bytes of an incomplete
    record at its end, and whether it could be opened."""

    batch: int
    task: int
    error: str | None = None
    truncated: str | None = None
    #: the stream was opened (it exists): once the task has ended, a later open shows
    #: all it holds (NFS close-to-open), so no result_grace is needed to judge it
    seen: bool = False
    attempt: int = 0  # which of the task's streams (a requeued job writes a new one)


@dataclass(frozen=True)
class StreamFound:
    """A stream of a task the core does not know yet: a warm task joined the batch."""

    batch: int
    task: int


@dataclass(frozen=True)
class StreamsRead:
    """The owner read every live task's stream, in a scan that began at `started`."""

    started: float


@dataclass(frozen=True)
class SchedulerAnswer:
    states: Mapping[TaskKey, TaskState]


@dataclass(frozen=True)
class FinalAnswer:
    tasks: tuple[tuple[int, int], ...]  # the (batch, task) that were asked about
    finals: Mapping[TaskKey, TaskState]
    alive: frozenset[tuple[int, int]] = frozenset()  # (batch, task) whose worker lives


@dataclass(frozen=True)
class CancelRequested:
    call_ids: frozenset[int]
    kill: bool = True  # also stop those running (ex.cancel; not shutdown's cancel)


@dataclass(frozen=True)
class ClaimsWon:
    """The client claimed `asked` of a batch's chunks and won `chunks` of them."""

    batch: int
    chunks: tuple[int, ...]
    asked: tuple[int, ...] = ()


@dataclass(frozen=True)
class ShutdownRequested:
    cancel_futures: bool


Event = (BatchAdded | TasksSubmitted | SubmitFailed | SubmitDeferred | Record | Records
         | StreamState
         | StreamsRead | StreamFound | SchedulerAnswer | FinalAnswer | CancelRequested | ClaimsWon
         | ShutdownRequested)

# -- actions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskRef:
    """Which array task, for error messages and log files."""

    batch: int
    index: int
    job_id: str | None
    array_index: int | None
    attempt: int = 1


@dataclass(frozen=True)
class AnnounceBatch:
    """Ask idle warm tasks to look at this earlier batch again: chunks of it wait while
    its own tasks have not started (warm tasks may hold the CPUs they wait for)."""

    batch: int


@dataclass(frozen=True)
class SubmitTasks:
    batch: int
    first: int
    count: int
    throttled: bool
    width: int = 1  # tasks at once while throttled (more when it starts wide)


@dataclass(frozen=True)
class LiftThrottle:
    batch: int
    to: int = 0  # tasks of the batch at once; 0: as many as it planned


@dataclass(frozen=True)
class CancelTasks:
    """Cancel tasks that have not started (`scancel --state=PENDING`): a started task is
    never ended by the core; a running call is stopped by its worker (WriteCancel)."""

    refs: tuple[str, ...]


@dataclass(frozen=True)
class QueryScheduler:
    job_ids: frozenset[str]


@dataclass(frozen=True)
class QueryFinal:
    tasks: tuple[tuple[int, int], ...]  # (batch, task)
    keys: tuple[TaskKey, ...]  # their (job id, array index)
    #: (batch, task) -> (host, pid, its process's start time or None)
    workers: Mapping[tuple[int, int], tuple[str, int, int | None]]


class Delivery(NamedTuple):
    """One call's result in a `Deliver`."""

    call_id: int
    kind: str
    body: Any
    cancelled_here: bool = False  # the user cancelled it through this client


@dataclass(frozen=True)
class Deliver:
    """Results of `task`'s calls in the order read, each a plain (call id, kind, body,
    cancelled here) tuple; the core appends to the list while it builds its actions.
    `late`: after a verdict, each wins where the future is still unresolved."""

    task: TaskRef
    calls: list[tuple[int, str, Any, bool]]
    late: bool = False

    def each(self) -> Iterator[Delivery]:
        return (Delivery(*call) for call in self.calls)


@dataclass(frozen=True)
class Failure:
    """Why calls failed; the engine turns it into an exception (with the log tail)."""

    error_type: type[BaseException]
    message: str
    task: TaskRef | None = None
    state: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    error: BaseException | None = None  # a ready exception (e.g. a submission error)


@dataclass(frozen=True)
class Fail:
    call_ids: tuple[int, ...]
    failure: Failure


@dataclass(frozen=True)
class WriteCancel:
    """Workers skip these calls; with `stop`, the one running them ends it (cooperative
    cancel: its supervisor watches the chunk's stop file while a call runs)."""

    batch: int
    chunk: int
    call_ids: tuple[int, ...]
    stop: bool = False


@dataclass(frozen=True)
class ReadStreams:
    """What the owner reads this round, as the core asks (`Core.to_read`): the streams of
    these tasks, those of them the scheduler says ended (opened by name), and the
    folders of batches a warm task may join unannounced."""

    streams: frozenset[tuple[int, int]]
    ended: tuple[tuple[int, int], ...]
    folders: tuple[int, ...]


@dataclass(frozen=True)
class ClaimChunks:
    """Claim chunks for the client, so that no task will run them."""

    batch: int
    chunks: tuple[int, ...]


@dataclass(frozen=True)
class Retry:
    batch: int
    attempt: int  # of the new batch
    calls: Mapping[int, tuple[int, ...]]  # chunk -> its calls to run again
    state: str
    reruns: int = 0  # of the new batch's calls so far (they use up no retry)


@dataclass(frozen=True)
class Claimed:
    batch: int
    chunk: int
    task: TaskRef
    call_ids: tuple[int, ...]


@dataclass(frozen=True)
class BatchDone:
    batch: int
    #: task-seconds per call the batch cost: the seconds its tasks spent in chunks, or
    #: at most its first task's start to its last result times the tasks that started;
    #: None when unknown: the next batch of the same functions is chunked and started
    #: (policies.start_width) by it
    seconds_per_call: float | None = None


Action = (AnnounceBatch | SubmitTasks | LiftThrottle | CancelTasks | QueryScheduler
          | QueryFinal | Deliver | Fail | WriteCancel | ClaimChunks | Retry | Claimed | BatchDone)
