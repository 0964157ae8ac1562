"""Large results: a partial record is not re-read each round, status reads one record at
a time, and records of 4 GiB or more are framed with a 64-bit length."""

from __future__ import annotations

import builtins
import hashlib
import tracemalloc

import pytest
from test_big_runs import build_run

from slurmexecutor.folder import framing, spool
from slurmexecutor.reports import runs

MiB = 1 << 20


@pytest.fixture
def bytes_read(monkeypatch):
    """Count the bytes spool reads from streams."""
    counted = [0]

    class Counting:
        def __init__(self, handle):
            self._handle = handle

        def __getattr__(self, name):
            return getattr(self._handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._handle.__exit__(*exc)

        def read(self, size=-1):
            data = self._handle.read(size)
            counted[0] += len(data)
            return data

    monkeypatch.setattr(spool, "open", lambda *a, **k: Counting(builtins.open(*a, **k)),  # noqa: SIM115
                        raising=False)
    return counted


def test_a_partial_record_is_not_read_again_each_round(tmp_path, bytes_read):
    key = spool.load_key(tmp_path, create=True)
    stream = tmp_path / "t0000.r0.out"
    writer = spool.RecordWriter(stream, key)
    writer.write(("start", None, {}))
    big = spool.encode_record(key, stream, ("ok", 1, b"r" * (60 * MiB)))
    with open(stream, "ab") as handle:
        handle.write(big[: 59 * MiB])  # the worker is still writing it
    cursor = spool.StreamCursor(stream)
    assert spool.read_records(cursor, key) == [("start", None, {})]
    for _ in range(10):
        assert spool.read_records(cursor, key) == []
        assert cursor.pending_bytes == 59 * MiB - cursor.offset + len(
            spool.encode_record(key, stream, ("start", None, {})))
    assert bytes_read[0] < 4096  # headers only: not 10 x 59 MiB
    with open(stream, "ab") as handle:
        handle.write(big[59 * MiB:])
    [(kind, call_id, body)] = spool.read_records(cursor, key)
    assert (kind, call_id, len(body)) == ("ok", 1, 60 * MiB) and cursor.pending_bytes == 0


def test_status_reads_a_run_one_record_at_a_time(tmp_path):
    folder = tmp_path / "spool"
    run_dir = build_run(folder, 3, chunk=1, per_task=3, payload=20 * MiB)
    key = spool.load_key(folder)
    tracemalloc.start()
    try:
        info = runs.read_run(run_dir, key)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.count("done") == 3
    assert peak < 50 * MiB, f"{peak / MiB:.0f} MiB to read 60 MiB of results"


def test_long_records_use_a_64_bit_length(tmp_path, monkeypatch):
    """The same code path as a result of 4 GiB or more, with a small limit."""
    monkeypatch.setattr(framing, "LONG", 1000)  # records of 1000 bytes or more are long
    key = spool.load_key(tmp_path, create=True)
    stream = tmp_path / "t0000.r0.out"
    writer = spool.RecordWriter(stream, key)
    records = [("ok", 1, b"a" * 10), ("ok", 2, b"b" * 5000), ("end", None, None)]
    for record in records:
        writer.write(record)
    data = stream.read_bytes()
    assert data.count((1000).to_bytes(4, "big")) == 1  # one long header
    cursor = spool.StreamCursor(stream)
    assert spool.read_records(cursor, key) == records and cursor.pending_bytes == 0
    blob = tmp_path / "fn"
    spool.write_blob(blob, key, {"x": b"c" * 5000})
    assert spool.read_blob(blob, key) == {"x": b"c" * 5000}


def test_a_record_past_4_gib_waits_for_its_end_reading_its_header_only(tmp_path,
                                                                        bytes_read):
    """A sparse stream whose second record says 5 GiB, 1 GiB of it there so far."""
    key = spool.load_key(tmp_path, create=True)
    stream = tmp_path / "t0000.r0.out"
    first = spool.encode_record(key, stream, ("start", None, {}))
    header = framing.pack_header(5 << 30, hashlib.sha256(b"x").digest())
    assert len(header) == framing.HEADER.size + 8
    with open(stream, "wb") as handle:
        handle.write(first + header)
        handle.truncate(len(first) + len(header) + (1 << 30))
    cursor = spool.StreamCursor(stream)
    assert spool.read_records(cursor, key) == [("start", None, {})]
    assert cursor.offset == len(first) and cursor.pending_bytes == len(header) + (1 << 30)
    assert bytes_read[0] < 4096
