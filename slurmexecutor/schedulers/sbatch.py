"""Running sbatch: a refusal by a limit (retry later) told from a hard refusal.

sbatch retries on its own when the controller answers "not now" (Slurm's
src/sbatch/sbatch.c): it prints one line ("Slurm temporarily unable to accept job,
sleeping and retrying") and then sleeps 1, 2, ... 15 s between attempts, up to 2 minutes.
That happens when the controller's MaxJobCount is reached: slurmctld's job_allocate()
checks `job_count + array size >= MaxJobCount` (`>` from 25.11 on) *before* it creates any
job record and answers EAGAIN (every release up to 25.11; Slurm's master answers
ESLURM_MAX_JOB_COUNT, for which sbatch prints "Slurm job queue full").
So no job exists when that line appears, and `run_sbatch` kills sbatch at once (its whole
process group) and raises SubmissionDeferred instead of blocking its caller for minutes.

A QOS or association submit limit makes sbatch fail at once with ESLURM_ACCOUNTING_POLICY,
printing the limit's name (the controller's err_msg) on the line before:

    sbatch: error: QOSMaxSubmitJobPerUserLimit
    sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job
    submit limit, user's size and/or time limits)

Only the submit-count limits pass once the queue shrinks; a job that alone exceeds a size
or time limit (QOSMaxWallDurationPerJobLimit, AssocGrpCpuLimit, ...) never will, and
stays a SubmissionError like every other refusal (invalid partition, time over the
partition's MaxTime with EnforcePartLimits, bad option, ...).
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import time
from typing import NamedTuple

from slurmexecutor._log import log
from slurmexecutor.errors import SubmissionDeferred, SubmissionError


class Refusal(NamedTuple):
    """How a refusal passes: `kind` names the limit, `retry_after` is a hint in s."""

    kind: str
    retry_after: float


#: sbatch's own "retrying" lines (sbatch.c, 22.05 and later), printed once before its
#: first sleep; sbatch then retries for up to 2 minutes, so we kill it on sight.
SBATCH_RETRY_LINES: list[tuple[re.Pattern[str], Refusal]] = [
    # EAGAIN: MaxJobCount reached (Slurm <= 25.11), or no job id left.
    (re.compile(r"Slurm temporarily unable to accept job"), Refusal("job_count", 10.0)),
    # ESLURM_MAX_JOB_COUNT (Slurm's master) / ESLURM_ERROR_ON_DESC_TO_RECORD_COPY (old).
    (re.compile(r"Slurm job queue full"), Refusal("job_count", 10.0)),
    # ESLURM_NODES_BUSY / ESLURM_PORTS_BUSY: nodes powering up (printed as info).
    (re.compile(r"Job creation temporarily disabled"), Refusal("busy", 5.0)),
]

#: Refusals that pass later, as sbatch prints them when it gives up (slurm_errno.c and
#: job_state_reason strings). Matched in order; the first match wins.
DEFERRED_PATTERNS: list[tuple[re.Pattern[str], Refusal]] = [
    *SBATCH_RETRY_LINES,
    # The errno texts sbatch prints after its 15 retries (or wrappers without retries).
    (re.compile(r"MaxJobCount limit reached"), Refusal("job_count", 10.0)),  # master
    (re.compile(r"Unable to create job record, try again"), Refusal("job_count", 10.0)),
    (re.compile(r"Batch job submission failed: Resource temporarily unavailable"),
     Refusal("job_count", 10.0)),  # strerror(EAGAIN)
    # ESLURM_ACCOUNTING_POLICY with a submit-count limit named on the line before:
    # QOS GrpSubmitJobs, QOS MaxSubmitJobsPerUser, association GrpSubmitJobs and
    # MaxSubmitJobs, QOS MaxSubmitJobsPerAccount.
    (re.compile(r"\b(QOSGrpSubmitJobsLimit|QOSMaxSubmitJobPerUserLimit|"
                r"AssocGrpSubmitJobsLimit|AssocMaxSubmitJobLimit|"
                r"MaxSubmitJobsPerAccount)\b"), Refusal("submit_limit", 10.0)),
]

#: A limit named by the controller that is not a submit count: the job alone exceeds a
#: size or time limit (QOSMaxWallDurationPerJobLimit, AssocGrpCpuLimit, ...): hard.
OTHER_LIMIT_REASON = re.compile(r"^sbatch: error: (QOS|Assoc)\w*Limit\s*$", re.MULTILINE)
#: ESLURM_ACCOUNTING_POLICY. Without a reason line (older controllers, some plugins) the
#: text says "job submit limit" first: treated as one that passes later.
ACCOUNTING_POLICY = re.compile(r"Job violates accounting/QOS policy")


def classify_refusal(stderr: str) -> Refusal | None:
    """-> how a refusal whose sbatch stderr is `stderr` passes; None if it never will."""
    for pattern, refusal in DEFERRED_PATTERNS:
        if pattern.search(stderr):
            return refusal
    if ACCOUNTING_POLICY.search(stderr) and not OTHER_LIMIT_REASON.search(stderr):
        return Refusal("submit_limit", 10.0)
    return None


def retry_line(stderr: str) -> Refusal | None:
    """-> the refusal if sbatch printed one of its "retrying" lines."""
    for pattern, refusal in SBATCH_RETRY_LINES:
        if pattern.search(stderr):
            return refusal
    return None


class SbatchResult(NamedTuple):
    returncode: int | None  # None: killed by us on a "retrying" line
    stdout: str
    stderr: str
    deferred: Refusal | None


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL sbatch's own process group (started with start_new_session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(selector: selectors.BaseSelector, wait: float) -> list[bytearray]:
    """Read what the ready pipes hold into their buffers; -> the buffers that grew."""
    grown = []
    for key, _ in selector.select(max(0.0, wait)):
        chunk = os.read(key.fd, 65536)
        if chunk:
            key.data.extend(chunk)
            grown.append(key.data)
        else:
            selector.unregister(key.fileobj)
    return grown


def run_sbatch(args: list[str], timeout: float) -> SbatchResult:
    """Run sbatch with its stderr watched; kill it on its first "retrying" line."""
    log.debug("running %s", " ".join(args))
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except FileNotFoundError as exc:
        raise SubmissionError(f"{args[0]} not found: is Slurm installed here?") from exc
    assert proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout
    deferred: Refusal | None = None
    with proc, selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, out)
        selector.register(proc.stderr, selectors.EVENT_READ, err)
        while selector.get_map() and deferred is None:
            if time.monotonic() >= deadline:
                _kill_group(proc)
                raise SubmissionError(
                    f"{args[0]} did not answer in {timeout:g} s (no configuration, or the "
                    f"controller unreachable?) {err.decode(errors='replace').strip()}")
            if any(grown is err for grown in _read(selector, deadline - time.monotonic())):
                deferred = retry_line(err.decode(errors="replace"))
        if deferred is not None:
            _kill_group(proc)  # no job exists yet: sbatch is asleep before its retry
            drained = time.monotonic() + 2.0  # the rest of its output: EOF comes at once
            while selector.get_map() and time.monotonic() < drained:
                _read(selector, drained - time.monotonic())
        returncode = proc.wait()
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if deferred is not None and returncode == 0:  # it retried and won the race
        deferred = None
    return SbatchResult(None if deferred else returncode, stdout, stderr, deferred)


def submit(args: list[str], timeout: float) -> str:
    """Run sbatch --parsable ...; -> the job id. Raise SubmissionDeferred for a refusal
    by a limit that passes later, SubmissionError for any other."""
    done = run_sbatch(args, timeout)
    stderr = done.stderr.strip()
    if done.deferred is None and done.returncode == 0:
        job_id = done.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise SubmissionError(f"sbatch printed no job id: {done.stdout!r} {stderr}")
        return job_id
    refusal = done.deferred or classify_refusal(stderr)
    if refusal is not None:
        raise SubmissionDeferred(f"sbatch refused the job for now: {stderr}",
                                 refusal.retry_after, refusal.kind)
    raise SubmissionError(f"sbatch refused the job (exit {done.returncode}): "
                          f"{stderr or done.stdout.strip()}")
