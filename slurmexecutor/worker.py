"""What runs inside one array task: `python -m slurmexecutor.worker RUN_DIR BATCH TASK`.

    supervisor (the batch script exec's into it)         child (forked per run of calls)
    ---------------------------------------------        ----------------------------------
    read the task's call ids, write a `start` record
    fork a child ----------------------------------->    load functions and arguments lazily
                                                         for each call in order:
                                                           skip it if the client cancelled it
    "I am starting call i"  <------- pipe -----------      say which call starts, run it,
                                                           append its `ok`/`raised` record
    child died mid-call (os._exit, segfault, kill)?
      append a `crash` record for that one call and
      fork a new child for the calls after it
    SIGUSR1 (Slurm's warning before the time limit):
      append a `limit` record; the child stops after
      the call it is running
    append an `end` record

Records go to the task's result stream (see `spool`). The worker imports nothing of the
client side, and the supervisor never unpickles user objects, so a task starts fast and
a bad payload can only fail the calls it belongs to.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import time
import traceback
from pathlib import Path

from . import spool

INDEX = struct.Struct(">I")
STOP_SIGNAL = signal.SIGUSR1


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m slurmexecutor.worker RUN_DIR BATCH TASK", file=sys.stderr)
        return 2
    run_dir, batch, task = Path(argv[0]), int(argv[1]), int(argv[2])
    key = spool.load_key(run_dir.parent)
    chunk = spool.read_blob(spool.chunk_path(run_dir, batch, task), key)
    attempt = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    out = spool.RecordWriter(spool.stream_path(run_dir, batch, task, attempt), key)
    out.write(("start", None, _where_am_i(attempt)))
    supervisor = Supervisor(run_dir, batch, task, chunk, out, key)
    signal.signal(STOP_SIGNAL, supervisor.on_stop_signal)
    supervisor.run()
    out.write(("end", None, {"time": time.time(), "stopped": supervisor.stopping}))
    out.close()
    return 0


def _where_am_i(attempt: int) -> dict:
    return {
        "time": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID"),
        "array_index": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "attempt": attempt,
    }


class Supervisor:
    """Runs the chunk's calls in forked children and records how each child ended."""

    def __init__(
        self, run_dir: Path, batch: int, task: int, chunk: dict, out: spool.RecordWriter,
        key: bytes,
    ) -> None:
        self.run_dir, self.batch, self.task = run_dir, batch, task
        self.chunk, self.out, self.key = chunk, out, key
        self.call_ids: list[int] = chunk["calls"]
        self.child_pid: int | None = None
        self.stopping = False

    def on_stop_signal(self, signum: int, frame: object) -> None:
        if not self.stopping:
            self.stopping = True
            self.out.write(("limit", None, {"time": time.time()}))
        if self.child_pid:
            os.kill(self.child_pid, STOP_SIGNAL)

    def run(self) -> None:
        first = 0
        while first < len(self.call_ids) and not self.stopping:
            started, status = self._run_child(first)
            if status == 0:
                return
            if started is None:  # died before it could start a call: nothing will work
                for call_id in self.call_ids[first:]:
                    self.out.write(("crash", call_id, _describe(status)))
                return
            self.out.write(("crash", self.call_ids[started], _describe(status)))
            first = started + 1

    def _run_child(self, first: int) -> tuple[int | None, int]:
        """Fork a child for calls[first:]; return (index it was in when it ended, status)."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(read_end)
            signal.signal(STOP_SIGNAL, _ChildStop.request)
            code = 0
            try:
                ChildRunner(self, write_end).run(first)
            except BaseException:  # noqa: BLE001  (report it, then exit non-zero)
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(write_end)
        self.child_pid = pid
        started, buffer = None, b""
        while data := os.read(read_end, 4096):
            buffer += data
            whole = len(buffer) - len(buffer) % INDEX.size
            for (index,) in INDEX.iter_unpack(buffer[:whole]):
                started = index
            buffer = buffer[whole:]
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
        self.child_pid = None
        return started, os.waitstatus_to_exitcode(status)


def _describe(code: int) -> dict:
    """A child's exit code as reported by waitstatus_to_exitcode (negative: a signal)."""
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else ""
        return {"signal": -code, "exit_code": None, "text": f"killed by signal {-code} {name}"}
    return {"signal": None, "exit_code": code, "text": f"exited with code {code}"}


class _ChildStop:
    requested = False

    @classmethod
    def request(cls, signum: int, frame: object) -> None:
        cls.requested = True


class ChildRunner:
    """Inside the forked child: loads what the calls need and runs them in order."""

    def __init__(self, supervisor: Supervisor, pipe: int) -> None:
        self.sup = supervisor
        self.pipe = pipe
        self.functions: dict[int, object] = {}
        self.cancel_file = spool.cancel_path(supervisor.run_dir, supervisor.batch,
                                             supervisor.task)
        self.cancel_size = -1
        self.cancelled: set[int] = set()

    def run(self, first: int) -> None:
        import cloudpickle  # noqa: F401  (needed to unpickle by-value functions)

        chunk = self.sup.chunk
        self.table = spool.read_blob(self.sup.run_dir / chunk["functions"], self.sup.key)
        for entry in self.table["sys_path"]:
            if entry not in sys.path:
                sys.path.append(entry)
        index = 0
        for fn_index, blob, count in chunk["parts"]:
            if index + count <= first:
                index += count
                continue
            try:
                arguments, error = _loads(blob), None
            except Exception as exc:  # noqa: BLE001  (fails this part's calls only)
                arguments, error = None, exc
            for offset in range(count):
                if index >= first:
                    if _ChildStop.requested:
                        return
                    call = None if error else arguments[offset]
                    self._run_one(index, fn_index, call, error)
                index += 1

    def _run_one(self, index: int, fn_index: int, call: tuple | None,
                 error: BaseException | None) -> None:
        call_id = self.sup.call_ids[index]
        if call_id in self._cancelled():
            self.sup.out.write(("skip", call_id, None))
            return
        os.write(self.pipe, INDEX.pack(index))
        sys.stderr.flush()
        print(f"--- slurmexecutor call {call_id} ---", flush=True)
        self.sup.out.write(self._call(call_id, fn_index, call, error))

    def _cancelled(self) -> set[int]:
        try:
            size = os.stat(self.cancel_file).st_size
        except FileNotFoundError:
            return self.cancelled
        if size != self.cancel_size:
            self.cancel_size = size
            self.cancelled = spool.read_cancelled(self.cancel_file)
        return self.cancelled

    def _function(self, index: int):
        if index not in self.functions:
            self.functions[index] = _loads(self.table["functions"][index])
        return self.functions[index]

    def _call(self, call_id: int, fn_index: int, call: tuple | None,
              error: BaseException | None) -> tuple:
        import cloudpickle

        try:
            if error is not None:
                raise error
            fn = self._function(fn_index)
            args, kwargs = call
            value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001  (SystemExit in a call is its failure)
            return _raised_record(call_id, exc)
        try:
            return ("ok", call_id, cloudpickle.dumps(value))
        except Exception as exc:  # noqa: BLE001
            message = f"the result ({type(value).__name__}) cannot be pickled: {exc!r}"
            return ("unpicklable", call_id, message)


def _loads(blob: bytes):
    import pickle

    return pickle.loads(blob)


def _raised_record(call_id: int, exc: BaseException) -> tuple:
    import cloudpickle

    text = "".join(traceback.format_exception(exc))
    try:
        blob = cloudpickle.dumps(exc)
        _loads(blob)  # an exception that pickles but cannot be rebuilt is no use
    except Exception:  # noqa: BLE001
        blob = None
    kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return ("raised", call_id, {"blob": blob, "type": kind, "message": str(exc), "tb": text})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
