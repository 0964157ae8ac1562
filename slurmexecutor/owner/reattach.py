"""Rebuilding an engine's batches and futures from a run's journals (`attach`).

Every call gets a RUNNING future (its call was handed over long ago); the latest batch
that carries a call owns it (retries). Batches whose arrays were never submitted (the
client died in between) are submitted now; results already on disk are read back by the
owner's first rounds, and tasks that left the queue without them fail their calls.
Calls an earlier client cancelled (its signed cancel files) stay cancelled.
"""

from __future__ import annotations

from collections.abc import Sequence

from slurmexecutor.core.events import BatchAdded, CancelRequested
from slurmexecutor.folder import cancels, formats, spool
from slurmexecutor.owner.engine import Engine
from slurmexecutor.owner.futures import FutureSink, SlurmFuture


def reattach(engine: Engine, time_limit: str | None) -> dict[int, SlurmFuture]:
    """Feed the run's journals to the engine (before it starts); return the futures."""
    journals = spool.read_journals(engine.run_dir)
    owner: dict[int, int] = {}  # call -> the latest batch that carries it
    for journal in journals:
        for ranges in journal["chunks"]:
            for call_id in formats.expand_ids(ranges):
                owner[call_id] = journal["batch"]
    futures = {call_id: SlurmFuture(engine, [call_id]) for call_id in sorted(owner)}
    cancelled: set[int] = set()  # by an earlier client (its cancel files)
    for journal in journals:
        number = journal["batch"]
        engine.add_journal(journal)
        chunks: list[Sequence[int]] = [formats.expand_ids(r) for r in journal["chunks"]]
        open_calls = frozenset(c for chunk in chunks for c in chunk if owner[c] == number)
        if not open_calls:
            continue
        for index, chunk in enumerate(chunks):
            if open_calls.intersection(chunk):
                cancelled |= open_calls & cancels.read_cancelled(
                    cancels.cancel_path(engine.run_dir, number, index), engine.key)
            for call_id in chunk:
                if owner[call_id] == number:
                    future = futures[call_id]
                    future.chunk = (number, index)
                    sink = FutureSink(future)
                    engine.sinks.add(sink)
                    sink.launch()
                    future._attempt = journal["attempt"]
        engine.queue_event(BatchAdded(
            number, chunks, journal["planned"], journal["steal"], journal["attempt"],
            time_limit, journal.get("throttled", False),
            tuple((a["job_id"], a["offset"], a["size"]) for a in journal["arrays"]),
            open_calls, reruns=journal.get("reruns", 0), attached=True))
    if cancelled:  # never retried, and failed as cancelled where no task runs them
        engine.queue_event(CancelRequested(frozenset(cancelled), kill=False))
    return futures
