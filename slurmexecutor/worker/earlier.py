"""What a requeued task's earlier attempts did: the chunks they claimed, which it runs
again first (their `claim` records)."""

from __future__ import annotations

from pathlib import Path

from slurmexecutor.folder import spool


def claimed_before(run_dir: Path, batch: int, task: int, attempt: int,
                   key: bytes) -> list[int]:
    """The chunks this task's earlier attempts claimed, from their streams (not those of
    an attempt that finished them and joined another batch: its `end` says so)."""
    chunks: list[int] = []
    for earlier in range(attempt):
        cursor = spool.StreamCursor(spool.stream_path(run_dir, batch, task, earlier))
        records = spool.read_records(cursor, key)
        if not any(kind == "end" and (body or {}).get("joined") is not None
                   for kind, _, body in records):
            chunks += [call_id for kind, call_id, _ in records
                       if kind == "claim" and call_id not in chunks]
    return chunks
