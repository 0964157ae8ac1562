"""The cancel files of a chunk, written by the client and read by the workers.

    bNNNN/cCCCC.cancel  calls a worker skips if it has not started them (cancelled)
    bNNNN/cCCCC.stop    calls whose running child the worker's supervisor ends
                        (`ex.cancel`; read every 0.5 s while a call of the chunk runs)

Both are append-only lists of call ids, one per line (`ID TAG`: the tag is an HMAC of the
id bound to the file's place, so a line another hand wrote, or one copied from another
chunk, is ignored), each append whole or not at all.
"""

from __future__ import annotations

import hashlib
import hmac
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


def _tag(key: bytes, path: Path, call_id: int) -> str:
    place = "/".join(path.parts[-3:])
    return hmac.new(key, f"{place}\0{call_id}".encode(), hashlib.sha256).hexdigest()[:16]


def read_cancelled(path: Path, key: bytes) -> set[int]:
    """Call ids listed in a chunk's cancel or stop file whose tags verify (empty when
    there is none)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return set()
    ids = set()
    for line in text.splitlines():
        call, _, tag = line.partition(" ")
        if call.isdigit() and hmac.compare_digest(tag.encode(), _tag(
                key, path, int(call)).encode()):
            ids.add(int(call))
    return ids


def append_cancelled(path: Path, key: bytes, call_ids: list[int]) -> None:
    lines = "".join(f"{call_id} {_tag(key, path, call_id)}\n" for call_id in call_ids)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        append_whole(fd, lines.encode(), path)
    finally:
        os.close(fd)


def cancel_calls(run_dir: Path, key: bytes, batch: int, chunk: int, call_ids: list[int],
                 stop: bool = False) -> None:
    """Workers skip these calls; with `stop`, end them where they run (the stop file is
    written first: a skip may end the chunk before the stop is seen)."""
    if stop:
        append_cancelled(stop_path(run_dir, batch, chunk), key, call_ids)
    append_cancelled(cancel_path(run_dir, batch, chunk), key, call_ids)
