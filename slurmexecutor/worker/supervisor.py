"""What runs inside one array task: `python -m slurmexecutor.worker.supervisor RUN_DIR BATCH TASK`.

    supervisor (the batch script exec's into it)       child (child.py; forked, normally one)
    --------------------------------------------       --------------------------------------
    write a `start` record
    fork a child ---------------------------------->   while a chunk can be claimed (an
                                                       O_EXCL claim file, see claims.py:
                                                       its block first, then the rest):
                                                         write a `claim` record
    "running call k of chunk j" <-- shared memory -     for each call: skip it if the
                                                         client cancelled it, else run it
                                                         and append its result record
    (records of fast calls wait <-- shared memory -      (a fast call's may wait a ms for
      there: outbox.py)                                    the next ones: outbox.py)
                                                       with backups: run stragglers again
                                                       (a `backup` record per chunk)
    "idle"               <-- shared memory -----     keep_alive: wait for a batch of the
    "joined batch N as task T" <-- pipe --------       same resources (warm.py); its
      follow it: records go to the new stream          stream ends, a new one begins
    "done"                   <---- pipe --------     nothing left to claim (or stopped):
                                                       a `claims` record (its cost)
    the child ended? append the records it left
      waiting; without saying "done" (os._exit,
      any exit code, 0 too; segfault; kill)? append
      a `crash` record for the one call it announced
      last and fork a new child that resumes after it
    every 0.5 s while a call runs: is it in its
      chunk's stop file (ex.cancel)? then end the
      child, append a `cancelled` record for it and
      fork a new child that resumes after it
    SIGUSR1 (Slurm's warning before the time limit):
      append a `limit` record; the child finishes
      the call it is running and claims nothing more
      (a checkpointable call saves its state and is
      handed back: checkpoints.py; so at a SIGTERM)
    append an `end` record

After a Slurm requeue (SLURM_RESTART_COUNT > 0) the task first runs again the chunks its
earlier attempts claimed (their `claim` records); the client keeps the first result of
each call. The worker imports nothing of the client side, and the supervisor never
unpickles user objects.
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from slurmexecutor.folder import formats, spool
from slurmexecutor.folder.diskio import EXIT_FULL, EXIT_NO_FOLDER, FULL, named
from slurmexecutor.folder.procs import process_start
from slurmexecutor.worker import walltime
from slurmexecutor.worker.channel import (
    CLAIMED,
    DONE,
    JOIN,
    JOIN_TASK,
    POSITION,
    STOP_SIGNAL,
    BatchChunks,
    Whereabouts,
    describe_exit,
)
from slurmexecutor.worker.checkpoints import RUNNING, TERMINATING
from slurmexecutor.worker.child import ChildRunner, _ChildStop
from slurmexecutor.worker.earlier import claimed_before
from slurmexecutor.worker.outbox import Pending

#: seconds between looks at the running call's chunk's stop file (cooperative cancel)
STOP_POLL = 0.5
#: signals whose handlers append records: held back while a record is appended
HELD = (STOP_SIGNAL, signal.SIGTERM)
#: at most this long, after SIGTERM, for a checkpointable call to save its state (Slurm
#: kills the task KillWait s after SIGTERM: 30 by default, 2 on the test cluster)
CHECKPOINT_WAIT = 1.5


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m slurmexecutor.worker.supervisor RUN_DIR BATCH TASK", file=sys.stderr)
        return 2
    run_dir, batch, task = Path(argv[0]), int(argv[1]), int(argv[2])
    if not run_dir.is_dir():
        print(f"slurmexecutor: the run folder {run_dir} does not exist on "
              f"{socket.gethostname()}: is it on a filesystem the compute nodes share?",
              file=sys.stderr)
        return EXIT_NO_FOLDER
    try:
        return _run(run_dir, batch, task)
    except OSError as error:
        if error.errno not in FULL:
            raise
        print(f"slurmexecutor: {named(error, run_dir)}", file=sys.stderr)
        return EXIT_FULL


def _run(run_dir: Path, batch: int, task: int) -> int:
    attempt = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    where = _where_am_i(attempt)
    for name in ("SLURMEXECUTOR_TASK", "SLURMEXECUTOR_JOB"):  # not for executors the
        os.environ.pop(name, None)  # calls may start
    key = spool.load_key(run_dir.parent)
    manifest = spool.read_blob(spool.manifest_path(run_dir, batch), key)
    out = spool.RecordWriter(spool.stream_path(run_dir, batch, task, attempt), key, HELD)
    out.write(("start", None, where))
    supervisor = Supervisor(run_dir, batch, task, manifest, out, key, attempt)
    supervisor.where = where
    signal.signal(STOP_SIGNAL, supervisor.on_stop_signal)
    signal.signal(signal.SIGTERM, supervisor.on_terminate)
    supervisor.run()
    supervisor.out.write(("end", None, {"time": time.time(), "stopped": supervisor.stopping}))
    supervisor.out.close()
    return 0


def _where_am_i(attempt: int) -> dict:
    """Where the task runs; its job id and array index (the local backend's too), by
    which the client follows it, also in batches it joins (warm)."""
    environ = os.environ
    return {
        "time": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": process_start(os.getpid()),  # the pid may be reused once it exits
        # the local and allocation backends' own ids first: their tasks may run inside a
        # Slurm job (salloc, sbatch) whose SLURM_* ids are not theirs
        "job_id": environ.get("SLURMEXECUTOR_JOB") or environ.get("SLURM_ARRAY_JOB_ID") or (
            environ.get("SLURM_JOB_ID")),
        "array_index": environ.get("SLURMEXECUTOR_TASK") or environ.get("SLURM_ARRAY_TASK_ID"),
        "attempt": attempt,
        # when the batch script began (bash 5's $EPOCHREALTIME): the interpreter's start
        "launched": _launched(environ.get("SLURMEXECUTOR_LAUNCHED", "")),
    }


def _launched(text: str) -> float | None:
    try:
        return float(text.replace(",", "."))  # the locale's decimal point
    except ValueError:
        return None


class Supervisor:
    """Forks the child that runs the calls; records how each child ended."""

    def __init__(self, run_dir: Path, batch: int, task: int, manifest: dict,
                 out: spool.RecordWriter, key: bytes, attempt: int) -> None:
        self.run_dir, self.batch, self.task = run_dir, batch, task
        self.manifest, self.out, self.key = manifest, out, key
        self.where: dict = {}
        self.child_pid: int | None = None
        self.whereabouts = Whereabouts()  # the child's last announcement (shared memory)
        self.pending = Pending()  # call records the child had not appended (shared memory)
        self.joining: int | None = None
        self.done = False  # the child said it finished (DONE): its end is no crash
        self.stopping = False
        self.stop_seen = 0.0  # when the time limit's warning came
        self.handed_back = False  # the calls after the running one went back (handback)
        #: (chunk, position, call id) of a call this supervisor ended (`ex.cancel`)
        self.stopped: tuple[int, int, int] | None = None
        self.chunks = BatchChunks(run_dir, batch, key)  # of the current batch
        #: set by the child while it runs a checkpointable call (shared memory)
        self.checkpointing = mmap.mmap(-1, 1)
        self._pipe: int | None = None  # the read end of the running child's pipe
        self._said = b""  # an incomplete message read from it
        self.clock = walltime.Clock(walltime.job_end())  # the time it has (walltime.py)
        # requeued: first run again what the earlier attempts had claimed
        self.reruns = claimed_before(run_dir, batch, task, attempt, key)

    def on_stop_signal(self, signum: int, frame: object) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_seen = time.monotonic()
            self.out.write(("limit", None, {"time": time.time()}))
        if self.child_pid:
            os.kill(self.child_pid, STOP_SIGNAL)

    def on_terminate(self, signum: int, frame: object) -> None:
        """Slurm ends the task (scancel, time limit, preemption): kill the child, then
        write the `end` record, so the client knows the stream is complete and need not
        wait for late writes of a shared filesystem."""
        if self.child_pid:
            if self.checkpointing[0] == RUNNING:  # its call can save its state (checkpoints.py)
                self._let_child_checkpoint(self.child_pid)
            try:
                os.kill(self.child_pid, signal.SIGKILL)
                os.waitpid(self.child_pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self._read_pipe()  # a join it announced: its records go to the new stream
            self._append_pending()
        self.out.write(("end", None, {"time": time.time(), "stopped": self.stopping,
                                      "signal": signum}))
        os._exit(128 + signum)

    def _let_child_checkpoint(self, pid: int) -> None:
        """Ask the child to save its call's state (SIGUSR1) and wait a little for it."""
        deadline = time.monotonic() + CHECKPOINT_WAIT
        self.checkpointing[0] = TERMINATING  # the task's end decides, no handback
        try:
            os.kill(pid, STOP_SIGNAL)
            while time.monotonic() < deadline and not os.waitpid(pid, os.WNOHANG)[0]:
                time.sleep(0.01)
        except (ProcessLookupError, ChildProcessError):
            pass

    def run(self) -> None:
        resume: tuple[int, int] | None = None  # (chunk, position) to continue from
        while not self.stopping:
            self.stopped = None
            position, done, status = self._run_child(resume)
            if done:  # its exit status does not matter: every call it ran has its record
                return
            if self.stopped is not None:  # ended on purpose: a cancel, not a crash
                resume = self._after_stop(position)
                continue
            # it ended without saying so: whatever the exit status (os._exit(0) too), the
            # call it announced last crashed; the others of its chunk still have to run
            if position is None:  # died before it ran a call: nothing will work
                text = describe_exit(status)["text"]
                print(f"slurmexecutor worker: the child {text} before running a call",
                      file=sys.stderr, flush=True)
                return
            chunk, call = position
            try:
                call_ids = spool.read_blob(spool.chunk_path(self.run_dir, self.batch, chunk),
                                           self.key)["calls"]
            except Exception as error:  # noqa: BLE001  (the client fails them: lost)
                print(f"slurmexecutor worker: chunk {chunk}: {error}", file=sys.stderr)
                call_ids = []
            if call == CLAIMED:  # died loading the chunk: all its calls crashed
                for call_id in call_ids:
                    self.out.write(("crash", call_id, describe_exit(status)))
                resume = None
            else:
                self.out.write(("crash", call_ids[call], describe_exit(status)))
                resume = (chunk, call + 1)

    def _run_child(self, resume: tuple[int, int] | None
                   ) -> tuple[tuple[int, int] | None, bool, int]:
        """Fork a child; return (the chunk and call it announced last, whether it said it
        was done, its exit code as `os.waitstatus_to_exitcode` gives it)."""
        read_end, write_end = os.pipe()
        self.whereabouts.clear()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(read_end)
            signal.signal(STOP_SIGNAL, _ChildStop.request)
            # the supervisor answers SIGTERM for both (it kills this child, then records
            # the end); a handler, not SIG_IGN, so processes the call starts get the default
            signal.signal(signal.SIGTERM, _ignore)
            code = 0
            try:
                ChildRunner(self, write_end).run(resume)
                os.write(write_end, POSITION.pack(*DONE))
            except BaseException:  # noqa: BLE001  (report it, then exit non-zero)
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(write_end)
        self.child_pid = pid
        self.done = False
        self._pipe, self._said = read_end, b""
        status = None
        # wait for the child itself, not for the pipe to close: processes the user's code
        # forks inherit the pipe and may outlive the child
        next_look = time.monotonic() + STOP_POLL
        while status is None:
            if select.select([read_end], [], [], 0.2)[0]:
                self._said = self._take_positions(self._said + os.read(read_end, 4096))
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = raw
            elif self.stopping and not self.handed_back and (
                    time.monotonic() >= self.stop_seen + 0.2):  # the child knows by now
                self._read_pipe()
                self._hand_back_rest()
            elif self.stopped is None and time.monotonic() >= next_look:
                next_look = time.monotonic() + STOP_POLL
                self._read_pipe()
                self._stop_if_cancelled(pid)
        self._read_pipe()  # what it said before it ended
        os.close(read_end)
        self.child_pid, self._pipe = None, None
        self._append_pending()
        return self.position, self.done, os.waitstatus_to_exitcode(status)

    def _read_pipe(self) -> None:
        """Act on what the child said and the supervisor has not read yet."""
        while self._pipe is not None and select.select([self._pipe], [], [], 0)[0]:
            data = os.read(self._pipe, 4096)
            if not data:
                break
            self._said = self._take_positions(self._said + data)

    def _append_pending(self) -> None:
        """The call records the ended child left unwritten (outbox.py), before anything
        is said about the call it ran."""
        data = self.pending.take()
        if data:
            self.out.write((formats.RESULTS, None, data))

    @property
    def position(self) -> tuple[int, int] | None:
        """The chunk and call the child announced last (None: none, or it is idle)."""
        return self.whereabouts.last()

    def _stop_if_cancelled(self, pid: int) -> None:
        """End the child if the call it runs is in its chunk's stop file (`ex.cancel`):
        the supervisor then writes the call's `cancelled` record and carries on."""
        if self.position is None or self.position[1] == CLAIMED:
            return
        chunk, position = self.position
        try:
            call_id = self.chunks.calls(chunk)[position]
            wanted_stop = self.chunks.stop_wanted(chunk, call_id)
        except Exception as error:  # noqa: BLE001  (unreadable: the call runs on)
            print(f"slurmexecutor worker: chunk {chunk}: {error}", file=sys.stderr)
            return
        if wanted_stop:
            self.stopped = (chunk, position, call_id)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _hand_back_rest(self) -> None:
        """Warned of the time limit: the calls of the chunk after the one running will not
        start here; say so at once (`handback`), so they run elsewhere while this call
        may still finish."""
        self.handed_back = True
        if self.position is None:
            return
        chunk, position = self.position
        try:
            calls = self.chunks.calls(chunk)
        except Exception as error:  # noqa: BLE001  (the child hands them back itself)
            print(f"slurmexecutor worker: chunk {chunk}: {error}", file=sys.stderr)
            return
        rest = list(calls if position == CLAIMED else calls[position + 1:])
        if rest:
            self.out.write(("handback", None, {"calls": rest}))

    def _after_stop(self, position: tuple[int, int] | None) -> tuple[int, int] | None:
        """After ending the child for a cancel: the cancelled call's record, and where
        to resume. If the child had moved on to the next call meanwhile, that call was
        cut short by us, not by itself: it runs again."""
        assert self.stopped is not None
        chunk, stopped_at, call_id = self.stopped
        if position == (chunk, stopped_at):
            self.out.write(("cancelled", call_id, {"time": time.time()}))
            return (chunk, stopped_at + 1)
        if position is None:
            return None
        return (position[0], 0 if position[1] == CLAIMED else position[1])

    def _take_positions(self, buffer: bytes) -> bytes:
        whole = len(buffer) - len(buffer) % POSITION.size
        for position in POSITION.iter_unpack(buffer[:whole]):
            if position == DONE:
                self.done = True
                continue
            if position[0] == JOIN:
                self.joining = position[1]
                continue
            if position[0] == JOIN_TASK and self.joining is not None:
                self._switch(self.joining, position[1])
                continue
            if position[0] in self.reruns:  # (chunk, CLAIMED)
                self.reruns.remove(position[0])
        return buffer[whole:]

    def _switch(self, batch: int, task: int) -> None:
        """The child joined `batch` as `task` (it wrote the old stream's end): follow."""
        self.out.close()
        self.batch, self.task, self.joining = batch, task, None
        self.manifest = spool.read_blob(spool.manifest_path(self.run_dir, batch), self.key)
        self.chunks = BatchChunks(self.run_dir, batch, self.key)
        self.out = spool.RecordWriter(spool.stream_path(self.run_dir, batch, task, 0),
                                      self.key, HELD)
        self.reruns = []


def _ignore(signum: int, frame: object) -> None:
    """SIGTERM in the child: the supervisor decides (see Supervisor.on_terminate)."""


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
