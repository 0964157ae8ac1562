"""Bad disks lose nothing: unreadable streams, a full disk or quota (ENOSPC, EDQUOT)."""

from __future__ import annotations

import errno
import logging
import os
import time

from slurmexecutor import IntegrityError, spool, streams
from tests.conftest import wait_until


def double(x: int) -> int:
    return 2 * x


def wait_for(gate: str) -> str:
    while not os.path.exists(gate):
        time.sleep(0.01)
    return "done"


def failing_reads(monkeypatch, batch: str, times: int | None,
                  after_claim: bool = False) -> tuple[list[int], list[bool]]:
    """Make reads of `batch`'s streams fail with ESTALE (`times` times, or always; with
    `after_claim`, from once a `claim` record was read); returns [failures so far] and
    [whether they have begun]."""
    real, failures, armed = spool.read_records, [0], [not after_claim]

    def read_records(cursor, key):
        if f"/{batch}/" in str(cursor.path) and armed[0] and (
                times is None or failures[0] < times):
            failures[0] += 1
            raise OSError(errno.ESTALE, "Stale file handle", str(cursor.path))
        records = real(cursor, key)
        armed[0] = armed[0] or any(record[0] == "claim" for record in records)
        return records

    monkeypatch.setattr(streams.spool, "read_records", read_records)
    return failures, armed


def test_an_unreadable_stream_fails_only_its_task(make_executor, monkeypatch, caplog,
                                                  tmp_path):
    monkeypatch.setattr(streams.StreamReader, "give_up_after", 0.5)
    failures, armed = failing_reads(monkeypatch, "b0000", None, after_claim=True)
    gate = tmp_path / "gate"
    ex = make_executor()
    with caplog.at_level(logging.WARNING, logger="slurmexecutor"):
        lost = ex.submit(wait_for, str(gate))
        assert wait_until(lambda: armed[0], timeout=120)  # claimed; unreadable from now
        other = ex.submit(double, 2)  # another batch, read fine meanwhile
        assert other.result(timeout=120) == 4
        gate.touch()
        error = lost.exception(timeout=120)
    assert isinstance(error, IntegrityError) and "could not be read" in str(error), error
    assert "Stale file handle" in str(error) and failures[0] >= 5
    assert ex.submit(double, 3).result(timeout=120) == 6  # the executor still works
    warnings = [r for r in caplog.records if "cannot read" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


def test_a_transient_read_error_is_retried(make_executor, monkeypatch, caplog):
    failures, _ = failing_reads(monkeypatch, "b0000", 3)
    ex = make_executor()
    with caplog.at_level(logging.WARNING, logger="slurmexecutor"):
        assert ex.submit(double, 21).result(timeout=120) == 42
    assert failures[0] == 3
    assert len([r for r in caplog.records if "cannot read" in r.getMessage()]) == 1
