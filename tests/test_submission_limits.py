"""Submission limits: a refusal by a limit (SubmissionDeferred) told from a hard one.

The classifier is fed sbatch's real texts (Slurm 22.05 as installed here, and the strings
of later versions from Slurm's slurm_errno.c, sbatch.c and job_state_reason.c);
`submit_array` runs against a fake `sbatch` on PATH that prints them, and against the
real test cluster with the controller's MaxJobCount reached and a partition MaxTime.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import time
from pathlib import Path

import pytest

from slurmexecutor import SlurmExecutor
from slurmexecutor.errors import SubmissionDeferred, SubmissionError
from slurmexecutor.folder import spool
from slurmexecutor.schedulers import sbatch
from slurmexecutor.schedulers.slurm import SlurmBackend, parse_max_job_count

#: What sbatch 22.05 printed here (see the Slurm-backed tests below).
RETRY_2205 = "sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying"
MAX_TIME = ("sbatch: error: Batch job submission failed: Requested time limit is invalid "
            "(missing or exceeds some limit)")
BAD_PARTITION = ("sbatch: error: invalid partition specified: nosuch\n"
                 "sbatch: error: Batch job submission failed: Invalid partition name "
                 "specified")
POLICY = ("sbatch: error: Batch job submission failed: Job violates accounting/QOS policy "
          "(job submit limit, user's size and/or time limits)")


def policy(reason: str) -> str:
    """ESLURM_ACCOUNTING_POLICY as sbatch prints it: the controller's reason first."""
    return f"sbatch: error: {reason}\n{POLICY}"


@pytest.mark.parametrize("stderr, kind", [
    (RETRY_2205, "job_count"),  # MaxJobCount reached, Slurm <= 23.02
    ("sbatch: error: Slurm job queue full, sleeping and retrying", "job_count"),  # >= 23.11
    ("sbatch: error: Batch job submission failed: MaxJobCount limit reached", "job_count"),
    ("sbatch: error: Batch job submission failed: Resource temporarily unavailable",
     "job_count"),  # EAGAIN after sbatch's own 15 retries
    ("sbatch: error: Batch job submission failed: Unable to create job record, try again",
     "job_count"),
    ("sbatch: Job creation temporarily disabled, retrying", "busy"),
    (policy("QOSMaxSubmitJobPerUserLimit"), "submit_limit"),
    (policy("QOSGrpSubmitJobsLimit"), "submit_limit"),
    (policy("AssocMaxSubmitJobLimit"), "submit_limit"),
    (policy("AssocGrpSubmitJobsLimit"), "submit_limit"),
    (policy("MaxSubmitJobsPerAccount"), "submit_limit"),
    (POLICY, "submit_limit"),  # no reason named: "job submit limit" comes first
])
def test_limit_refusals_pass_later(stderr, kind):
    refusal = sbatch.classify_refusal(stderr)
    assert refusal is not None and refusal.kind == kind, stderr
    assert refusal.retry_after > 0


@pytest.mark.parametrize("stderr", [
    MAX_TIME,
    BAD_PARTITION,
    "sbatch: error: Batch job submission failed: More processors requested than permitted",
    "sbatch: error: Batch job submission failed: Node count specification invalid",
    "sbatch: error: Invalid --time specification",
    "sbatch: unrecognized option '--bogus'\nTry \"sbatch --help\" for more information",
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition "
     "combination specified"),
    # The job alone exceeds a size or time limit: waiting never helps.
    policy("QOSMaxWallDurationPerJobLimit"),
    policy("QOSMaxCpuPerJobLimit"),
    policy("AssocGrpCpuLimit"),
    "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation",
])
def test_hard_refusals_do_not(stderr):
    assert sbatch.classify_refusal(stderr) is None


def test_deferred_is_a_submission_error_that_pickles():
    error = SubmissionDeferred("sbatch: error: x", 7.5, "job_count")
    assert isinstance(error, SubmissionError)
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.retry_after, copy.kind) == ("sbatch: error: x", 7.5, "job_count")


def test_max_job_count_from_the_config():
    assert parse_max_job_count("MaxJobCount             = 5\nMaxJobId = 67043328") == 5
    assert parse_max_job_count("nothing") == 10000


def test_arrays_are_cut_below_max_job_count():
    backend = SlurmBackend({})
    backend._config = "MaxArraySize = 1001\nMaxJobCount = 5"  # no scontrol here
    assert backend.max_array_size() == 4
    backend._config = "MaxArraySize = 1001\nMaxJobCount = 10000"
    assert backend.max_array_size() == 1001


# -- submit_array against a fake sbatch ------------------------------------------------


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch):
    """Install `sbatch` (a shell script body) first on PATH; -> the folder it writes in."""
    folder = tmp_path / "fake"
    folder.mkdir()

    def install(body: str) -> Path:
        path = folder / "sbatch"
        path.write_text(f"#!/bin/bash\ncd {folder}\n{body}\n")
        path.chmod(0o755)
        return folder

    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return install


def submit(size: int = 1, config: str = "MaxJobCount = 10000") -> str:
    backend = SlurmBackend({})
    backend._config = config  # no scontrol here
    return backend.submit_array(Path("job.sh"), size, Path("logs"))


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_a_job_id_is_returned(fake_sbatch):
    fake_sbatch('echo "1234;cluster"')
    assert submit() == "1234"


def test_a_hard_refusal_fails_with_sbatchs_message(fake_sbatch):
    fake_sbatch(f"echo '{MAX_TIME}' >&2\nexit 1")
    with pytest.raises(SubmissionError) as caught:
        submit()
    assert not isinstance(caught.value, SubmissionDeferred)
    assert "Requested time limit is invalid" in str(caught.value)


def test_a_submit_limit_is_deferred(fake_sbatch):
    fake_sbatch(f"cat >&2 <<'EOF'\n{policy('AssocMaxSubmitJobLimit')}\nEOF\nexit 1")
    with pytest.raises(SubmissionDeferred) as caught:
        submit()
    assert caught.value.kind == "submit_limit"
    assert "AssocMaxSubmitJobLimit" in str(caught.value)


def test_sbatch_retrying_is_killed_at_once(fake_sbatch):
    """sbatch sleeps up to 2 minutes between its retries: it is killed on its first
    "retrying" line, with everything it started (here the shell's `sleep`)."""
    folder = fake_sbatch(f"sleep 120 &\necho $$ $! > pids\necho '{RETRY_2205}' >&2\n"
                         "wait\necho 99")
    start = time.monotonic()
    with pytest.raises(SubmissionDeferred) as caught:
        submit()
    took = time.monotonic() - start
    assert caught.value.kind == "job_count"
    assert "temporarily unable to accept job" in str(caught.value)
    assert took < 60, took  # not the fake's 120 s
    pids = [int(line) for line in (folder / "pids").read_text().split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [pid for pid in pids if alive(pid)]


def test_an_array_larger_than_max_job_count_is_a_hard_refusal(fake_sbatch):
    """The controller counts every task of an array against MaxJobCount: an array of
    MaxJobCount tasks or more can never be accepted, so it must not wait forever."""
    fake_sbatch(f"echo '{RETRY_2205}' >&2\nsleep 120")
    with pytest.raises(SubmissionDeferred):
        submit(4, config="MaxJobCount = 5")
    with pytest.raises(SubmissionError, match="can never fit under the cluster's "
                                              "MaxJobCount=5") as caught:
        submit(5, config="MaxJobCount = 5")
    assert not isinstance(caught.value, SubmissionDeferred)


def test_an_sbatch_that_never_answers_times_out(fake_sbatch):
    fake_sbatch("sleep 120")
    start = time.monotonic()
    with pytest.raises(SubmissionError, match="did not answer in 0.5 s"):
        sbatch.submit(["sbatch", "job.sh"], timeout=0.5)
    assert time.monotonic() - start < 60


def test_no_sbatch_at_all(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SubmissionError, match="not found"):
        submit()


# -- the real test cluster -------------------------------------------------------------


def array_script(folder: Path, size: int, *options: str) -> Path:
    lines = ["#!/bin/sh", f"#SBATCH --array=0-{size - 1}", "#SBATCH -o /dev/null",
             *(f"#SBATCH {option}" for option in options), "true"]
    script = folder / f"array-{size}.sh"
    script.write_text("\n".join(lines) + "\n")
    return script


def sbatch_left(script: Path) -> list[int]:
    """Processes whose command line names `script` (an sbatch left running)."""
    left = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(script).encode() in (proc / "cmdline").read_bytes():
                left.append(int(proc.name))
        except OSError:
            continue
    return left


def jobs_named(name: str) -> list[str]:
    done = subprocess.run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%F"],
                          capture_output=True, text=True, check=True)
    return sorted(set(done.stdout.split()))


@pytest.mark.slurm
def test_over_the_partitions_max_time_fails_at_once(slurm_cluster, tmp_path):
    from slurmexecutor.testing import CAPPED_MAX_TIME

    assert CAPPED_MAX_TIME < "00:10:00"
    script = array_script(tmp_path, 2, "--partition=capped", "--time=00:10:00")
    with pytest.raises(SubmissionError) as caught:
        SlurmBackend({}).submit_array(script, 2, tmp_path)
    assert not isinstance(caught.value, SubmissionDeferred)
    assert ("sbatch: error: Batch job submission failed: Requested time limit is invalid "
            "(missing or exceeds some limit)") in str(caught.value)


@pytest.fixture
def max_job_count_5(slurm_cluster):
    """The session cluster's controller with MaxJobCount=5 (and MinJobAge=2, so that
    ended jobs leave its count soon); -> a list to put blocker job ids in, cancelled
    before the controller gets its own configuration back."""
    blockers: list[str] = []
    with slurm_cluster.controller_settings("MaxJobCount=5", "MinJobAge=2"):
        try:
            yield blockers
        finally:
            if blockers:
                subprocess.run(["scancel", *blockers], capture_output=True, check=False)


@pytest.mark.slurm
def test_max_job_count_defers_until_the_queue_shrinks(max_job_count_5, tmp_path, caplog):
    backend = SlurmBackend({})
    assert backend.max_job_count() == 5
    # The controller counts every task: 5 can never fit, and that is said at once.
    big = array_script(tmp_path, 5)
    with pytest.raises(SubmissionError, match="MaxJobCount=5") as caught:
        backend.submit_array(big, 5, tmp_path)
    assert not isinstance(caught.value, SubmissionDeferred)
    assert "Slurm temporarily unable to accept job" in str(caught.value)

    # Fill the controller with held jobs (jobs of earlier tests not purged yet count too).
    blockers = max_job_count_5
    for _ in range(5):
        try:
            blockers.append(sbatch.submit(["sbatch", "--parsable", "--hold", "-o",
                                           "/dev/null", "--wrap", "sleep 60"], timeout=30))
        except SubmissionDeferred:
            break
    else:
        pytest.fail(f"MaxJobCount=5 refused none of {blockers}")

    one = array_script(tmp_path, 1)
    start = time.monotonic()
    with pytest.raises(SubmissionDeferred) as deferred:
        backend.submit_array(one, 1, tmp_path)
    assert time.monotonic() - start < 30  # sbatch itself retries for 2 minutes
    assert deferred.value.kind == "job_count"
    assert str(deferred.value) == ("sbatch refused the job for now: sbatch: error: Slurm "
                                   "temporarily unable to accept job, sleeping and retrying")
    assert sbatch_left(one) == []
    assert jobs_named(one.name) == []  # sbatch was killed before any job was created

    # The executor: the call waits with one WARNING, and runs once the queue shrinks.
    with caplog.at_level(logging.INFO, logger="slurmexecutor"):
        executor = SlurmExecutor(tmp_path / "spool", backend="slurm", keep_alive=0,
                                 poll_interval=0.3)
        try:
            future = executor.submit(pow, 2, 5)
            deadline = time.monotonic() + 30
            while not refused(caplog) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert refused(caplog) and not future.done()
            if blockers:  # else jobs of earlier tests fill it: they are purged soon
                subprocess.run(["scancel", *blockers], capture_output=True, check=True)
            # Cancelled jobs leave the count when the controller purges them: MinJobAge
            # after their end, on its purge pass every 10 s.
            assert future.result(timeout=90) == 32
            # 8 tasks planned: more than MaxJobCount allows at once, cut and halved
            # until parts fit (before, the whole map failed: "can never fit")
            values = executor.map(pow, [2] * 8, range(8), chunksize=1, timeout=90)
            assert list(values) == [2 ** i for i in range(8)]
            sizes = [a["size"] for j in spool.read_journals(executor.run_dir)
                     for a in j["arrays"]]
            assert sizes and max(sizes) <= 4, sizes
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
    assert len(refused(caplog)) == 1, refused(caplog)
    deadline = time.monotonic() + 60  # the backend's own submit too, once the map's
    while True:  # tasks are purged
        try:
            job_id = backend.submit_array(one, 1, tmp_path)
            break
        except SubmissionDeferred:
            assert time.monotonic() < deadline, "the queue never shrank"
            time.sleep(1)
    blockers.append(job_id)
    assert jobs_named(one.name) == [job_id]


def refused(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.levelno == logging.WARNING and "refused" in record.getMessage()]
