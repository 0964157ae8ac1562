"""What some of the folder's files hold: a chunk's calls, several calls' records in
one, and compact lists of call ids (journals). spool.py signs, writes and reads them.

This module must stay light: the worker imports it.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable

#: the layout of a run's files (chunks, records, journals), in its run.json; `attach`
#: refuses a run of another layout (runs before this field: 1)
RUN_FORMAT = 2

#: the kind of a record that holds the records of several calls, each pickled on its own
#: and concatenated (worker/outbox.py); readers see the records it holds, in order
RESULTS = "results"


def stored_calls(args: list[tuple], kwargs: list[dict] | None = None) -> dict:
    """A chunk part's calls as they are pickled: their argument tuples, and their
    keyword dicts unless no call has any (a map's calls: only the tuples)."""
    if kwargs is not None and any(kwargs):
        if len(kwargs) != len(args):
            raise ValueError(f"{len(args)} argument tuples but {len(kwargs)} keyword dicts")
        return {"args": args, "kwargs": kwargs}
    return {"args": args}


def call_at(calls: dict, offset: int) -> tuple[tuple, dict]:
    """The (args, kwargs) of the call at `offset` of an unpickled `stored_calls`."""
    kwargs = calls.get("kwargs")
    return calls["args"][offset], (kwargs[offset] if kwargs else {})


def unpack_results(blob: bytes) -> list[tuple]:
    """The records a `results` record holds."""
    stream = io.BytesIO(blob)
    load = pickle.Unpickler(stream).load
    records = []
    while stream.tell() < len(blob):
        records.append(load())
    return records


def compress_ids(ids: Iterable[int]) -> list[list[int]]:
    """[1, 2, 3, 7] -> [[1, 4], [7, 8]]: half-open ranges, for compact journals."""
    ranges: list[list[int]] = []
    for call_id in ids:
        if ranges and ranges[-1][1] == call_id:
            ranges[-1][1] += 1
        else:
            ranges.append([call_id, call_id + 1])
    return ranges


def expand_ids(ranges: list[list[int]]) -> list[int]:
    return [call_id for start, stop in ranges for call_id in range(start, stop)]
