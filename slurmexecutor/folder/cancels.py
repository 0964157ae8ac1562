"""The cancel files of a chunk, written by the client and read by the workers.

    bNNNN/cCCCC.cancel  calls a worker skips if it has not started them (cancelled)
    bNNNN/cCCCC.stop    calls whose running child the worker's supervisor ends
                        (`ex.cancel`; read every 0.5 s while a call of the chunk runs)

Both are append-only lists of call ids, one per line, each append whole or not at all.
"""

from __future__ import annotations

import os
from pathlib import Path

from slurmexecutor.folder.diskio import append_whole
from slurmexecutor.folder.spool import batch_dir


def cancel_path(run_dir: Path, batch: int, chunk: int) -> Path:
    """Calls of a chunk that workers skip (the client cancelled them)."""
    return batch_dir(run_dir, batch) / f"c{chunk:04d}.cancel"


def stop_path(run_dir: Path, batch: int, chunk: int) -> Path:
    """Calls of a chunk that a worker running one ends (`ex.cancel`)."""
    return batch_dir(run_dir, batch) / f"c{chunk:04d}.stop"


def read_cancelled(path: Path) -> set[int]:
    """Call ids listed in a task's cancel file (empty when there is none)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return set()
    return {int(line) for line in text.split() if line.isdigit()}


def append_cancelled(path: Path, call_ids: list[int]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        append_whole(fd, "".join(f"{call_id}\n" for call_id in call_ids).encode(), path)
    finally:
        os.close(fd)


def cancel_calls(run_dir: Path, batch: int, chunk: int, call_ids: list[int],
                 stop: bool = False) -> None:
    """Workers skip these calls; with `stop`, end them where they run (the stop file is
    written first: a skip may end the chunk before the stop is seen)."""
    if stop:
        append_cancelled(stop_path(run_dir, batch, chunk), call_ids)
    append_cancelled(cancel_path(run_dir, batch, chunk), call_ids)
