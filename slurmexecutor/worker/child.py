"""The forked child of an array task's worker (supervisor.py): it claims chunks and runs
their calls, announcing each to the supervisor (channel.py) and appending their
records (outbox.py); then, with backups, runs straggling chunks again, and with
keep_alive waits for the next batch (warm.py).
"""

from __future__ import annotations

import mmap
import os
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from slurmexecutor.folder import cancels, claims, formats, spool
from slurmexecutor.folder.folders import writable_by_others
from slurmexecutor.worker import checkpoints
from slurmexecutor.worker.channel import (
    CLAIMED,
    DONE,
    IDLE,
    JOIN,
    JOIN_TASK,
    POSITION,
    CancelList,
    Whereabouts,
)
from slurmexecutor.worker.outbox import Outbox, Pending
from slurmexecutor.worker.outcome import (
    dump_result,
    environment_mismatch,
    exception_text,
    loads,
    raised_record,
)

if TYPE_CHECKING:
    from slurmexecutor.folder.sharing import SharedObjects
    from slurmexecutor.worker.walltime import Clock

class Supervising(Protocol):
    """What the child uses of the supervisor that forked it (supervisor.py): where it
    works (run folder, batch, task index, manifest), its stream, key and host facts, and
    the chunks a requeued attempt runs again first."""

    run_dir: Path
    batch: int
    task: int
    manifest: dict
    out: spool.RecordWriter
    key: bytes
    where: dict
    reruns: list[int]
    clock: Clock  # the time the task has left (walltime.py)
    checkpointing: mmap.mmap  # whether the running call may save its state (checkpoints.py)
    whereabouts: Whereabouts  # where the child is (the call it runs)
    pending: Pending  # call records the child has not appended yet (outbox.py)


class _ChildStop:
    requested = False
    #: what a checkpointable call does when told to stop (save its state, leave)
    on_stop: Callable[[], None] | None = None

    @classmethod
    def request(cls, signum: int, frame: object) -> None:
        cls.requested = True
        hook, cls.on_stop = cls.on_stop, None
        if hook is not None:
            hook()


class ChildRunner:
    """Inside the forked child: claims chunks and runs their calls in order."""

    def __init__(self, supervisor: Supervising, pipe: int) -> None:
        self.sup = supervisor
        self.pipe = pipe
        self.functions: dict[int, object] = {}
        self.loading = 0.0  # seconds this chunk spent unpickling (imports included)
        self.mismatch: str | None = None  # why this interpreter cannot run the batch
        self.table: dict = {}
        self.table_file: str | None = None  # where `table` was read from
        self.shared: SharedObjects | None = None
        #: the running call's chunk and position: it and those after it are what a
        #: checkpoint hands back (a slice only then: per call it would cost O(chunk))
        self.rest: tuple[Sequence[int], int] = ((), 0)
        self.late = False  # its next chunk would outlast the task (walltime.py): it leaves
        self.outbox = self._outbox(supervisor.out.path)

    def _outbox(self, path: Path) -> Outbox:
        """Write the stream at `path` from now on, letting fast calls' records wait."""
        self.sup.out = Outbox(path, self.sup.key, self.sup.pending, raised_record)
        return self.sup.out

    def run(self, resume: tuple[int, int] | None) -> None:
        self._load_batch()
        if self.mismatch is None:
            import cloudpickle  # noqa: F401  (needed to unpickle by-value functions)

        if resume is not None:
            self._run_chunk(resume[0], resume[1])
        for index in list(self.sup.reruns):
            self._run_chunk(index, 0)
        self._work()
        keep_alive = self.sup.manifest.get("keep_alive") or 0
        if keep_alive > 0 and not _ChildStop.requested and not self.late:
            self._serve_warm(keep_alive)
        self.outbox.flush()

    def _load_batch(self) -> None:
        """The functions (and shared arguments) of the supervisor's current batch."""
        sup = self.sup
        if sup.manifest["functions"] != self.table_file:  # warm: the
            self.table_file = sup.manifest["functions"]  # same file, already unpickled
            self.table = spool.read_blob(sup.run_dir / self.table_file, sup.key)
            self.functions = {}
        self.mismatch = environment_mismatch(self.table.get("env"))
        for entry in self.table["sys_path"]:  # before any argument is unpickled
            if entry not in sys.path and writable_by_others(entry) is None:
                sys.path.append(entry)
        self.shared = None
        shared_file = sup.manifest.get("shared")
        if shared_file:  # arguments many calls share: each unpickled once, when needed
            from slurmexecutor.folder.sharing import SharedObjects

            self.shared = SharedObjects(
                lambda: spool.read_blob(sup.run_dir / shared_file, sup.key)["objects"])

    def _work(self) -> None:
        """Claim and run chunks of the current batch until none is left (then, with
        backups, run stragglers again)."""
        manifest, task = self.sup.manifest, self.sup.task
        order = claims.claim_order(manifest["chunks"], manifest["tasks"], task) if (
            manifest["steal"]) else [task] if task < manifest["chunks"] else []
        folder = spool.claims_dir(self.sup.run_dir, self.sup.batch)
        claimer = claims.Claimer(folder, order, str(task))
        backups = claims.Backups(folder, str(task)) if manifest.get("backups") else None
        took: list[float] = []  # seconds per chunk it ran whole
        try:
            if _ChildStop.requested:  # claim nothing it cannot start
                return
            for index in claimer.claims():
                self._timed_chunk(index, took, backups is not None)
                if _ChildStop.requested:
                    return
                if not self.sup.clock.fits(manifest):  # the next chunk would outlast it:
                    self.late = True  # claim no more, and leave (others or a re-run take them)
                    self.sup.out.write(("late", None, {"time": time.time(),
                                                       "end": self.sup.clock.end}))
                    return
            while backups is not None and took:  # every chunk is taken: stragglers?
                straggler = backups.next(set(claimer.taken_by_me), sum(took) / len(took),
                                         lambda: _ChildStop.requested)
                if straggler is None:
                    return
                claimer.taken_by_me.append(straggler)
                self._timed_chunk(straggler, took, True, record="backup")
        finally:
            stats = claimer.stats()
            if backups is not None:
                stats["listings"] += backups.listings
            self.sup.out.write(("claims", None, stats))

    def _serve_warm(self, keep_alive: float) -> None:
        """Warm: wait up to `keep_alive` idle seconds for a batch of the same resources,
        join it, work, and wait again (see warm.py)."""
        from slurmexecutor.folder import warm

        sup = self.sup
        watcher = warm.Watcher(sup.run_dir, sup.key, sup.batch, sup.manifest.get("resources"),
                               lambda: _ChildStop.requested, sup.clock.fits)
        while not _ChildStop.requested and not self.late:
            sup.whereabouts.announce(IDLE, 0)  # a crash while idle is no call's crash
            sup.out.write(("idle", None, {"time": time.time(), "keep_alive": keep_alive}))
            found = watcher.wait(keep_alive)
            if found is None:
                break
            batch, manifest = found
            start = ("start", None, {**sup.where, "time": time.time(), "warm": True})
            index = warm.join_stream(sup.run_dir, sup.key, batch, start)
            sup.out.write(("end", None, {"time": time.time(), "joined": batch, "as": index,
                                         "polls": watcher.polls}))
            os.write(self.pipe, POSITION.pack(JOIN, batch))
            os.write(self.pipe, POSITION.pack(JOIN_TASK, index))
            sup.batch, sup.task, sup.manifest = batch, index, manifest
            self.outbox.close()
            self.outbox = self._outbox(spool.stream_path(sup.run_dir, batch, index, 0))
            self._load_batch()
            self._work()
        sup.out.write(("idle", None, {"time": time.time(), "polls": watcher.polls,
                                      "leaving": True, "aside_for": watcher.stepped_aside,
                                      "too_late": watcher.too_late}))

    def _timed_chunk(self, index: int, took: list[float], mark: bool,
                     record: str = "claim") -> None:
        started = time.monotonic()
        if self._run_chunk(index, 0, record) and mark:
            took.append(time.monotonic() - started)
            claims.mark_done(spool.claims_dir(self.sup.run_dir, self.sup.batch), index)

    def _run_chunk(self, index: int, first: int, record: str = "claim") -> bool:
        """Run a chunk's calls from position `first`; False if stopped before the end.
        `record`: how the chunk is announced (claim, or backup: a second copy)."""
        sup = self.sup
        started, self.loading = time.time(), 0.0
        if first == 0:  # the client knows the chunk's calls: say which chunk, first
            sup.out.write((record, index, {"time": started}))
            sup.whereabouts.announce(index, CLAIMED)
            os.write(self.pipe, POSITION.pack(index, CLAIMED))
        took = array("f")  # seconds of each call run, from position `first` on
        try:
            return self._run_calls(index, first, took)
        finally:  # call_id None: the client's core ignores it (report.py reads it)
            sup.clock.ran(sup.manifest.get("names", ""), sum(took), len(took))
            sup.out.write(("times", None, {"chunk": index, "first": first, "start": started,
                                           "end": time.time(), "backup": record == "backup",
                                           "took": took.tobytes(), "load": self.loading}))

    def _run_calls(self, index: int, first: int, took: array) -> bool:
        sup = self.sup
        chunk = spool.read_blob(spool.chunk_path(sup.run_dir, sup.batch, index), sup.key)
        call_ids = chunk["calls"]
        cancel = CancelList(cancels.cancel_path(sup.run_dir, sup.batch, index), sup.key)
        announce = sup.whereabouts.announce
        position = 0
        for fn_index, blob, count in chunk["parts"]:
            if position + count <= first:
                position += count
                continue
            arguments: dict | None = None  # unpickled once its first call is announced:
            error: Exception | None = None  # unpickling runs user code, which may crash
            for offset in range(count):
                if position >= first:
                    if _ChildStop.requested:  # the time limit is near: the calls not
                        sup.out.write(("handback", None,  # started go to other tasks
                                       {"calls": list(call_ids[position:])}))
                        return False
                    call_id = call_ids[position]
                    began = time.time()
                    if call_id in cancel.ids(began):
                        record: tuple = ("skip", call_id, None)
                    elif self.mismatch is not None:  # unpickle nothing: say why
                        record = ("mismatch", call_id, self.mismatch)
                    else:
                        announce(index, position)
                        sys.stderr.flush()  # what the last call printed goes before
                        sys.stdout.flush()
                        os.write(1, b"--- slurmexecutor call %d ---\n" % call_id)
                        if arguments is None and error is None:
                            loading = time.time()
                            try:
                                arguments = self.shared.loads(blob) if (
                                    self.shared) else loads(blob)
                            except Exception as exc:  # noqa: BLE001  (this part's calls)
                                error = exc
                            self.loading += time.time() - loading
                        call = formats.call_at(arguments, offset) if (
                            arguments is not None) else None
                        self.rest = (call_ids, position)  # a checkpoint hands them back
                        record = self._call(call_id, fn_index, call, error)
                    took.append(time.time() - began)
                    self.outbox.result(record, took[-1])
                position += 1
        return True

    def _checkpointable(self, call_id: int, fn: Any, args: tuple, kwargs: dict) -> Any:
        """Run a call that can save its state (checkpoints.py): from its last checkpoint,
        if an earlier attempt saved one; told to stop, it saves its state, hands itself
        and the rest of its chunk back (at a SIGTERM the task's end decides: a requeue or
        a preemption runs it again, a cancel fails it), and the child leaves."""
        sup = self.sup
        fn = checkpoints.resumed(sup.run_dir, sup.key, call_id, fn)

        def stop() -> None:
            if checkpoints.save(sup.run_dir, sup.key, call_id, fn, args, kwargs):
                print(f"slurmexecutor worker: call {call_id} saved its state", flush=True)
                if sup.checkpointing[0] != checkpoints.TERMINATING:  # the limit's warning
                    calls, position = self.rest
                    sup.out.write(("handback", None, {"calls": list(calls[position:])}))
                os.write(self.pipe, POSITION.pack(*DONE))
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
            sup.checkpointing[0] = 0  # declined: a SIGTERM need not wait for it

        _ChildStop.on_stop = stop
        sup.checkpointing[0] = checkpoints.RUNNING  # the supervisor lets it save at SIGTERM
        try:
            value = fn(*args, **kwargs)
        finally:
            _ChildStop.on_stop = None
            sup.checkpointing[0] = 0
        checkpoints.forget(sup.run_dir, call_id)
        return value

    def _function(self, index: int):
        if index not in self.functions:
            loading = time.time()
            try:
                self.functions[index] = loads(self.table["functions"][index])
            finally:
                self.loading += time.time() - loading
        return self.functions[index]

    def _call(self, call_id: int, fn_index: int, call: tuple | None,
              error: BaseException | None) -> tuple:

        if error is not None or call is None:  # its arguments could not be unpickled
            return raised_record(call_id, error or ValueError("no arguments"))
        try:
            fn = self._function(fn_index)
            args, kwargs = call
            if checkpoints.checkpointable(fn):
                value = self._checkpointable(call_id, fn, args, kwargs)
            else:
                value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001  (SystemExit in a call is its failure)
            return raised_record(call_id, exc)
        try:
            return ("ok", call_id, dump_result(value))
        except BaseException as exc:  # noqa: BLE001  (a __reduce__ may raise SystemExit)
            message = (f"the result ({type(value).__name__}) cannot be pickled: "
                       f"{type(exc).__name__}: {exception_text(exc)}")
            return ("unpicklable", call_id, {"message": message,
                                             "error": raised_record(call_id, exc)[2]})


