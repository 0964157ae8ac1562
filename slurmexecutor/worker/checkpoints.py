"""Checkpointing: a call whose callable has a `checkpoint` method resumes from its
saved state on its next attempt instead of starting over (submitit's `Checkpointable`,
done the executor's way).

The protocol, all of it on the worker:

- A call is *checkpointable* when its callable `fn` has a callable attribute
  `checkpoint` (an object with `__call__` and `checkpoint`, usually).
- When its task must stop while the call runs (Slurm's warning before the time limit,
  SIGUSR1; SIGTERM for a preemption, a requeue or a cancel of the job), the worker calls
  `fn.checkpoint(*args, **kwargs)` with the call's own arguments, in the call's process,
  between two bytecodes of the running call (a signal handler, as in submitit).
- It returns the callable the next attempt runs with the same arguments (usually
  `self`, whose attributes hold the progress), or None (no checkpoint: the call goes on
  and ends as any call does at a limit). The returned object is pickled with
  cloudpickle into `<run>/checkpoints/c<CALL>` (signed with the folder's key).
- At the warning, the call is then handed back with the rest of its chunk: it runs
  again elsewhere (a batch of its own) without using up `max_retries`. At a SIGTERM,
  how the task ended decides as for any call: a requeue runs its chunk again, a
  preemption is a free re-run, a `scancel` fails it. The attempt that runs the call
  again runs the saved callable instead of the original one; the file is removed once
  an attempt finished.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import traceback
from pathlib import Path
from typing import Any

from slurmexecutor.folder import spool

#: the supervisor's flag while it ends the task at a SIGTERM (1: a checkpointable call runs)
RUNNING, TERMINATING = 1, 2


def checkpointable(fn: object) -> bool:
    """Whether a call of `fn` can save its state (it has a `checkpoint` method)."""
    return callable(getattr(fn, "checkpoint", None))


def path(run_dir: Path, call_id: int) -> Path:
    return run_dir / "checkpoints" / f"c{call_id}"


def resumed(run_dir: Path, key: bytes, call_id: int, fn: Any) -> Any:
    """The callable an earlier attempt of the call saved, or `fn` itself."""
    try:
        return pickle.loads(spool.read_blob(path(run_dir, call_id), key))
    except FileNotFoundError:
        return fn


def save(run_dir: Path, key: bytes, call_id: int, fn: Any, args: tuple,
         kwargs: dict) -> bool:
    """Ask `fn` for its state and store it; False if it declined or failed (printed)."""
    import cloudpickle

    try:
        state = fn.checkpoint(*args, **kwargs)
        if state is None:
            return False
        blob = cloudpickle.dumps(state)
        target = path(run_dir, call_id)
        target.parent.mkdir(mode=0o700, exist_ok=True)
        spool.write_blob(target, key, blob)
        return True
    except Exception:  # noqa: BLE001  (the call goes on as if it had no checkpoint)
        print(f"slurmexecutor worker: checkpoint of call {call_id} failed:", file=sys.stderr)
        traceback.print_exc()
        return False


def forget(run_dir: Path, call_id: int) -> None:
    """An attempt of the call finished: its checkpoint is of no more use."""
    with contextlib.suppress(OSError):
        os.unlink(path(run_dir, call_id))
