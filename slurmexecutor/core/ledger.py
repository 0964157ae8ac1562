"""The core's bookkeeping (state.py): its knobs, batches and tasks, and which error fits
how a task ended. Plain values only."""

from __future__ import annotations

import statistics
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from slurmexecutor.core.events import Failure, TaskRef
from slurmexecutor.errors import (
    ERROR_FOR_STATE,
    CallLostError,
    JobTimeoutError,
    TaskFailedError,
    WorkerCrashedError,
)
from slurmexecutor.folder.diskio import EXIT_FULL, EXIT_NO_FOLDER, EXIT_NO_PYTHON, EXIT_SETUP
from slurmexecutor.schedulers import TaskState

#: Final states after which Slurm may requeue the task: settle them only when a second
#: scheduler answer still shows them final.
REQUEUEABLE = frozenset({"NODE_FAIL", "PREEMPTED", "REQUEUED", "BOOT_FAIL"})


@dataclass(frozen=True)
class Config:
    """The policies' knobs (seconds)."""

    poll_interval: float
    result_grace: float
    retry_on: frozenset[str] = frozenset()
    max_retries: int = 0
    probe: float = 0.3  # how often a throttled batch's running work is measured
    horizon: float = 3.0  # one more task per this many seconds of estimated work left
    vanish_grace: float = 5.0  # a task missing from the queue this long has left it
    keep_alive: float = 0.0  # idle tasks wait this long for another batch (warm.py)
    warm_wait: float = 1.0  # a new batch waits this long for a warm task to join it
    #: the folder's filesystem shows a closed file's data on open (NFS): a seen stream
    #: of an ended task is judged without result_grace
    close_to_open: bool = True


@dataclass(eq=False)
class Submission:
    """A batch's tasks still to go out (tasks `next` .. `end` - 1): its one pending
    submission record (policies.py: ask, submit_deferred, submit_when_due)."""

    next: int
    end: int
    due: float  # not asked before then (a warm task may join; back-off after a refusal)
    warm: bool = False  # nothing asked yet: a warm task may take the batch first
    asked: int = 0  # tasks of an sbatch in flight, not answered yet
    #: after a refusal, at most this many tasks per sbatch (halved per refusal: an array
    #: larger than a per-user submit limit would never fit whole; doubled per part that
    #: went out); 0: all at once
    cap: int = 0
    refusals: int = 0

    @property
    def left(self) -> int:
        return self.end - self.next


class CallSet:
    """A batch's open calls: one bit per call id over their span (a 1,000,000-call map
    holds 125 kB here, not the ~64 MB of a set of ints), with the set operations the
    core uses: `in`, `discard`, `len`, iteration and `&` with a set."""

    __slots__ = ("_base", "_bits", "_count", "_span")

    def __init__(self, chunks: Iterable[Sequence[int]], only: Iterable[int] | None = None
                 ) -> None:
        chunks = [c for c in chunks if len(c)]
        ends = [(c.start, c[-1]) if isinstance(c, range) and c.step == 1 else (min(c), max(c))
                for c in chunks]
        self._base = min((lo for lo, _ in ends), default=0)
        self._bits = bytearray((max((hi for _, hi in ends), default=-1) - self._base) // 8 + 1)
        self._span, self._count = 8 * len(self._bits), 0
        if only is not None:
            ids = {c for chunk in chunks for c in chunk}
            for call_id in only:
                if call_id in ids:
                    self._add(call_id)
            return
        for chunk in chunks:
            if isinstance(chunk, range) and chunk.step == 1:
                self._fill(chunk.start, chunk.stop)
            else:
                for call_id in chunk:
                    self._add(call_id)

    def _add(self, call_id: int) -> None:
        if call_id not in self:
            i = call_id - self._base
            self._bits[i >> 3] |= 1 << (i & 7)
            self._count += 1

    def _fill(self, start: int, stop: int) -> None:
        """Add start..stop-1 (whole bytes at once)."""
        i, end = start - self._base, stop - self._base
        while i < end and i & 7:
            self._add(i + self._base)
            i += 1
        whole = (end - i) >> 3
        if whole:
            self._count += 8 * whole - sum(b.bit_count() for b in self._bits[i >> 3:(
                i >> 3) + whole])
            self._bits[i >> 3:(i >> 3) + whole] = b"\xff" * whole
            i += 8 * whole
        for call_id in range(i + self._base, stop):
            self._add(call_id)

    def __contains__(self, call_id: object) -> bool:
        i = call_id - self._base if type(call_id) is int else -1
        return 0 <= i < self._span and bool(self._bits[i >> 3] >> (i & 7) & 1)

    def discard(self, call_id: int) -> None:
        i = call_id - self._base
        if 0 <= i < self._span:
            byte, mask = self._bits[i >> 3], 1 << (i & 7)
            if byte & mask:
                self._bits[i >> 3] = byte ^ mask
                self._count -= 1

    def among(self, calls: Sequence[int]) -> tuple[int, ...]:
        """Those of `calls` that are in the set, in their order (one loop: a claim asks
        this for every call of its chunk)."""
        bits, base, span = self._bits, self._base, self._span
        return tuple(c for c in calls if 0 <= (i := c - base) < span and bits[i >> 3] >> (
            i & 7) & 1)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        for index, byte in enumerate(self._bits):
            if byte:
                base = self._base + 8 * index
                yield from (base + k for k in range(8) if byte >> k & 1)

    def __and__(self, other: Iterable[int]) -> frozenset[int]:
        return frozenset(c for c in other if c in self)

    __rand__ = __and__

    def __eq__(self, other: object) -> bool:
        return set(self) == set(other) if isinstance(other, (set, frozenset, CallSet)) else (
            NotImplemented)

    def __repr__(self) -> str:
        return f"CallSet({sorted(self)})"


@dataclass(eq=False)
class Batch:
    """Calls handed over together: chunks that up to `planned` array tasks claim."""

    number: int
    chunks: list[Sequence[int]]
    planned: int
    steal: bool
    attempt: int
    time_limit: str | None
    open_calls: CallSet
    unclaimed: set[int] = field(default_factory=set)
    first_start: float | None = None
    tasks: list[Task] = field(default_factory=list)
    last_failed: Task | None = None
    submit_error: BaseException | None = None
    throttle: int = 1  # tasks allowed to run at once while throttled
    done: int = 0  # results read so far (the measure of the work's cost)
    busy: float = 0.0  # its calls' own seconds so far (`times` records: calls_seconds)
    next_scale: float = 0.0
    measured: float | None = None  # task-seconds per call its functions took before
    free: int | None = None  # idle slots the scheduler reported when it came (None: not asked)
    #: a measured batch's scale-out counts from here: (when, results read by then)
    counted_from: tuple[float, int] | None = None
    resources: str = ""  # the resources key of its tasks (warm tasks join only equal)
    pending: Submission | None = None  # tasks still to go out; None: all out, or refused
    submitted: int = 0  # array tasks that went out (indices 0 .. submitted - 1)
    reruns: int = 0  # its calls ran again this often without using up a retry
    created: float = 0.0  # when the core learned of it
    wanted_sent: bool = False  # idle warm tasks were asked to look at it again
    joiners: set[int] = field(default_factory=set)  # indices of warm tasks ever seen join
    attached: bool = False  # an earlier client's: joiners it never saw may be in it
    #: chunks whose claim the client lost that no task has reported yet, and since when
    lost: set[int] = field(default_factory=set)
    lost_since: float = 0.0
    owner: dict[int, Task] = field(default_factory=dict)  # call -> the task that claimed it
    backup: dict[int, Task] = field(default_factory=dict)  # call -> its backup's task
    _chunk_index: dict[int, int] | None = None  # call -> its chunk, built when first asked

    def chunk_of(self, call_id: int) -> int:
        """The chunk that holds a call (an index built on first use: cancels and retries
        need it, a plain map does not)."""
        if self._chunk_index is None:
            self._chunk_index = {c: i for i, chunk in enumerate(self.chunks) for c in chunk}
        return self._chunk_index[call_id]

    @property
    def throttled(self) -> bool:
        """Fewer of its tasks may run than it planned (scale-out may raise that)."""
        return self.throttle < self.planned


@dataclass(eq=False)
class Task:
    """One array task as the core follows it."""

    batch: Batch
    index: int
    job_id: str | None
    array_index: int | None
    registered: float
    unresolved: set[int] = field(default_factory=set)
    started: bool = False
    worker: tuple[str, int] | None = None
    worker_started: int | None = None  # its process's start time (a reused pid is not it)
    limit_notice: bool = False
    late: bool = False  # it stopped claiming: its next chunk would outlast it
    #: a joiner whose Slurm job was requeued: the job restarts as its own batch's task,
    #: never here again, so what it left runs again (free, answers.py)
    moved: bool = False
    ended: bool = False
    killed: bool = False  # its worker was ended by a signal (scancel, time limit)
    final: TaskState | None = None
    final_since: float = 0.0
    final_polls: int = 0
    error: str | None = None
    truncated: str | None = None
    #: the latest attempt whose stream was opened (StreamState.seen); -1: none yet
    seen: int = -1
    attempt: int = 0  # the latest attempt whose start record was read
    requeues: int = 0  # requeues of its job the scheduler showed (answers.py)
    verdicts: set[int] = field(default_factory=set)  # calls failed without a result
    linger_until: float = 0.0
    _ref: TaskRef | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.batch.number, self.index)

    @property
    def latest_attempt(self) -> int:
        """Its job's latest attempt known. Only that attempt's end record and stream
        judge the task: an earlier attempt's say nothing of the calls it reruns."""
        return max(self.attempt, self.requeues)

    def attempt_ended(self, attempt: int, signal: object) -> None:
        """An attempt's `end` record: the latest attempt's ends the task (killed: by a
        signal); an earlier one's, read late, ends nothing (its job ran again since)."""
        if attempt >= self.latest_attempt:
            self.ended, self.killed = True, bool(signal)

    @property
    def slurm_key(self) -> tuple[str, int]:
        """(job id, array index): one Slurm task, in whichever batch it shows up."""
        return (self.job_id or "", self.array_index or 0)

    @property
    def slurm_id(self) -> str:
        """Its Slurm task id, `JOB_INDEX` (scancel's form)."""
        return f"{self.job_id}_{self.array_index}"

    @property
    def ref(self) -> TaskRef:
        if self._ref is None or self._ref.job_id != self.job_id:
            self._ref = TaskRef(self.batch.number, self.index, self.job_id, self.array_index,
                                self.batch.attempt)
        return self._ref


def task_failure(task: Task, started: bool, result_grace: float) -> Failure:
    """The failure that fits how `task` ended, for calls it left without a result
    (`started`: they had begun, else they could not start)."""
    state = task.final
    what = "this call finished" if started else "this call could start"
    error_type: type[TaskFailedError]
    if task.limit_notice:
        error_type, message = JobTimeoutError, (
            f"the call did not finish within the time limit ({task.batch.time_limit})")
    elif task.ended and not task.killed:
        error_type, message = CallLostError, (
            "the worker ended without running this call (see the log)")
    elif state is None or state.state == "UNKNOWN":
        error_type, message = CallLostError, (
            "the task left the queue without a result and the scheduler has no record "
            "of how it ended (no accounting)")
    else:
        error_type = ERROR_FOR_STATE.get(state.state, WorkerCrashedError)
        message = f"the task ended ({state.state}) before {what}"
        if state.exit_code == EXIT_FULL:
            message += ("; it could not write to the run folder: the disk or your quota "
                        "is full (ENOSPC or EDQUOT; see the log)")
        elif state.exit_code == EXIT_NO_PYTHON and task.worker is None:
            message += ("; the batch script could not run the worker's interpreter (not "
                        "found or not executable on the node: see python= and the log)")
        elif state.exit_code == EXIT_SETUP and task.worker is None:
            message += "; a setup= line failed before the worker started (see the log)"
        elif state.exit_code == EXIT_NO_FOLDER:
            message += ("; the compute node does not see the run folder: it is likely not "
                        "on a filesystem the compute nodes share (see the log)")
        elif task.worker is None and not task.ended and task.seen < 0:
            message += ("; nothing of it reached the run folder (is the folder on a "
                        "filesystem the compute nodes share, with space left?)")
        elif task.worker is None and not task.ended:
            message += "; its worker never started (see the log)"
        if not task.ended and task.seen < 0 and state.exit_code not in (
                EXIT_FULL, EXIT_NO_FOLDER, EXIT_NO_PYTHON, EXIT_SETUP):
            message += (f"; no result was seen within result_grace="
                        f"{result_grace:g} s of the end (if a shared "
                        "filesystem shows results late, raise result_grace)")
    name = "TIMEOUT" if error_type is JobTimeoutError else (
        state.state if state else None)
    return Failure(error_type, message, task.ref, name, state.exit_code if state else None,
                   state.signal if state else None)


def calls_seconds(times: dict) -> float:
    """The seconds a chunk's calls ran (its `times` record's `took`), less what they spent
    unpickling the function and arguments (`load`: a task's first call imports their
    modules; 16 tasks starting at once on a busy node made trivial calls look 0.2 s
    each), with its first call counted at most as its median other (imports inside the
    function)."""
    took = times.get("took")
    if took is None:
        return max(0.0, times["end"] - times["start"])
    calls = array("f", took)
    load = float(times.get("load") or 0.0)
    seconds = max(0.0, float(sum(calls)) - load)
    if len(calls) >= 2:
        seconds -= max(0.0, calls[0] - load - statistics.median(calls[1:]))
    return max(0.0, seconds)
