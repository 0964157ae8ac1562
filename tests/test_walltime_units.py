"""The worker's clock (worker/walltime.py) with plain values."""

from __future__ import annotations

import time

from slurmexecutor.worker import walltime


def test_a_chunk_fits_only_if_its_measured_calls_end_before_the_task():
    clock = walltime.Clock(time.time() + 30)
    manifest = {"names": "work.f", "chunk_calls": 6}
    assert clock.fits(manifest)  # unmeasured: it fits (the warning hands back the rest)
    clock.ran("work.f", 10.0, 2)  # 5 s per call
    assert not clock.fits(manifest)  # 6 x 5 s + 2 s > 30 s
    assert clock.fits({**manifest, "chunk_calls": 2})
    assert clock.fits({"names": "work.g", "chunk_calls": 100})  # other functions
    assert walltime.Clock(None).fits(manifest)  # no limit


def test_the_end_comes_from_slurm_job_end_time(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_END_TIME", "1800000000")
    assert walltime.job_end() == 1800000000.0
    monkeypatch.delenv("SLURM_JOB_END_TIME")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert walltime.job_end() is None


def test_the_core_reruns_what_a_late_task_left_unclaimed_without_a_retry():
    from slurmexecutor.core.events import ClaimChunks, ClaimsWon, Record, Retry
    from tests.test_state import core, failed, of, started_batch

    machine = core(max_retries=0)
    started_batch(machine, chunks=((0,), (1,), (2,)), planned=1)
    out = machine.step([Record(0, 0, "claim", 0, None), Record(0, 0, "ok", 0, b""),
                        Record(0, 0, "late", None, {"time": 1.0, "end": 2.0}),
                        Record(0, 0, "end", None, {})], 1)
    [claim] = of(out, ClaimChunks)
    out = machine.step([ClaimsWon(0, claim.chunks, claim.chunks)], 2)
    retries = of(out, Retry)  # one per chunk
    assert {r.attempt for r in retries} == {1}  # no retry used up
    assert {k: v for r in retries for k, v in r.calls.items()} == {1: (1,), 2: (2,)}
    assert not failed(out)
