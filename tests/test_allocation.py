"""backend="allocation": the work runs as job steps (srun) of the allocation the client
runs in. Parsers on their own; behaviour with clients run by salloc/sbatch on the real
test cluster (2 of its nodes), with a fake `sbatch` first on PATH that fails the test
if anything tries to submit a job."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurmexecutor.schedulers.allocation import (
    NO_ALLOCATION,
    Allocation,
    parse_cpus_per_node,
    parse_directives,
    parse_memory_mb,
    srun_options,
    step_state,
)
from slurmexecutor.schedulers.choose import make_backend
from slurmexecutor.schedulers.script import ScriptSpec, render_script

REPO = Path(__file__).resolve().parent.parent

# -- parsers -----------------------------------------------------------------------------


def test_cpus_per_node_expands_slurms_repeat_counts():
    assert parse_cpus_per_node("4(x2),2") == [4, 4, 2]
    assert parse_cpus_per_node("6") == [6]
    assert parse_cpus_per_node("2,8(x3)") == [2, 8, 8, 8]
    with pytest.raises(ValueError, match="CPUs per node"):
        parse_cpus_per_node("4(x2")


def test_slots_count_whole_steps_per_node_and_refuse_what_cannot_fit():
    allocation = Allocation.from_environment(
        {"SLURM_JOB_ID": "42", "SLURM_JOB_CPUS_PER_NODE": "4(x2),2"})
    assert allocation.cpus == (4, 4, 2)
    assert [allocation.slots(c) for c in (1, 2, 3, 4)] == [10, 5, 2, 2]
    with pytest.raises(ValueError, match=r"cpus_per_task=5 does not fit allocation 42: "
                                         r"its node\(s\) have 4, 4, 2 CPU"):
        allocation.slots(5)


def test_allocation_without_cpus_per_node_uses_node_count_and_this_nodes_cpus():
    allocation = Allocation.from_environment({"SLURM_JOB_ID": "7", "SLURM_NNODES": "3",
                                              "SLURM_CPUS_ON_NODE": "8"})
    assert allocation.cpus == (8, 8, 8) and allocation.slots(3) == 6


def test_memory_share_per_cpu_from_the_allocation():
    assert [parse_memory_mb(text) for text in ("4000", "8G", "1.5G", "0", "", "x")] == [
        4000, 8192, 1536, None, None, None]
    per_node = Allocation.from_environment({"SLURM_JOB_ID": "1",
                                            "SLURM_JOB_CPUS_PER_NODE": "4,2",
                                            "SLURM_MEM_PER_NODE": "8000"})
    assert per_node.mem_per_cpu == 2000  # the fullest node's share: fits on every node
    per_cpu = Allocation.from_environment({"SLURM_JOB_ID": "1", "SLURM_JOB_CPUS_PER_NODE": "4",
                                           "SLURM_MEM_PER_CPU": "1500",
                                           "SLURM_MEM_PER_NODE": "9999"})
    assert per_cpu.mem_per_cpu == 1500


def test_srun_options_come_from_the_batch_script():
    allocation = Allocation("42", (4, 4), mem_per_cpu=2000)
    spec = ScriptSpec(Path("/runs/r1"), batch=0, size=3, job_name="slurmexecutor-f")
    script = render_script({"cpus_per_task": 2, "time": "00:10:00", "partition": "short",
                            "job_name": "my job"}, spec)
    directives = parse_directives(script)
    assert directives["job-name"] == "my job" and directives["cpus-per-task"] == "2"
    options = srun_options(directives, allocation, "my job@42-1-1_0")
    assert options[:6] == ["--ntasks=1", "--nodes=1", "--cpus-per-task=2", "--exact",
                           "--input=none", "--job-name=my job@42-1-1_0"]
    assert "--mem-per-cpu=2000M" in options and "--time=00:10:00" in options
    assert not any(o.startswith(("--partition", "--array", "--output", "--signal"))
                   for o in options)
    own_memory = parse_directives(render_script({"mem": "3G"}, spec))
    options = srun_options(own_memory, allocation, "x")
    assert "--mem=3G" in options and not any("mem-per-cpu" in o for o in options)


@pytest.mark.parametrize(("code", "log", "expected"), [
    (0, "", ("COMPLETED", 0, None)),
    (3, "srun: error: n1: task 0: Exited with exit code 3\n", ("FAILED", 3, None)),
    (137, "srun: error: n1: task 0: Killed\nsrun: Force Terminated StepId=2.1\n",
     ("FAILED", None, 9)),
    (139, "srun: error: n1: task 0: Segmentation fault\n", ("FAILED", None, 11)),
    (0, "step 4.0 on n3\nsrun: error: Node failure on n3\n", ("NODE_FAIL", 0, None)),
    (137, ("slurmstepd-n1: error: *** STEP 2.5 ON n1 CANCELLED AT 2026-11-25T18:47:52 DUE TO "
          "TIME LIMIT ***\nsrun: error: n1: task 0: Killed\n"), ("TIMEOUT", None, 9)),
    (137, ("slurmstepd-n1: error: *** STEP 2.3 ON n1 CANCELLED AT 2026-11-25T18:46:46 ***\n"
          "srun: error: n1: task 0: Killed\n"), ("CANCELLED", None, 9)),
    (1, "a call printed: srun: error: Node failure on n3, but srun did not\n",
     ("FAILED", 1, None)),
])
def test_step_state_from_srun_exit_and_its_lines(code, log, expected):
    state = step_state(code, log, None)
    assert (state.state, state.exit_code, state.signal) == expected


def test_step_state_we_ended_names_why():
    assert step_state(143, "", "CANCELLED").state == "CANCELLED"
    assert step_state(-9, "", "TIMEOUT").signal == 9


def test_allocation_backend_outside_an_allocation_is_a_clear_error(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_JOBID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError) as raised:
        make_backend("allocation", {})
    assert str(raised.value) == NO_ALLOCATION
    assert "SLURM_JOB_ID is not set" in NO_ALLOCATION


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_auto_says_allocation_is_available_but_keeps_submitting(monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with caplog.at_level(logging.INFO, logger="slurmexecutor"):
        backend = make_backend("auto", {})
    assert backend.name == "slurm"
    assert any("backend='allocation'" in r.getMessage() and "4242" in r.getMessage()
               for r in caplog.records if r.levelno == logging.INFO)


# -- on the cluster: clients inside salloc / sbatch ---------------------------------------

CLIENT = '''
import json, os, signal, subprocess, sys, time
from slurmexecutor import SlurmExecutor
from slurmexecutor.folder import spool

OUT = sys.argv[2]
MARK = os.path.join(os.path.dirname(OUT), "attempted")

def square(x):
    time.sleep(0.2)
    return x * x, os.environ.get("SLURMD_NODENAME"), os.environ.get("SLURM_STEP_ID")

def kill_my_worker(x):
    os.killpg(0, signal.SIGKILL)  # the worker and this call: the step dies

def exit_hard(x):
    os._exit(3)

def flaky(x):
    if not os.path.exists(MARK):
        open(MARK, "w").close()
        os.killpg(0, signal.SIGKILL)
    return x + 1

def sleepy(x):
    time.sleep(60)

def error_of(future):
    try:
        future.result(timeout=120)
        return None
    except Exception as error:
        return [type(error).__name__, str(error)[:400], getattr(error, "state", None),
                getattr(error, "signal", None)]

def steps_and_jobs(alloc):
    steps = subprocess.run(["squeue", "-h", "-s", "-o", "%i|%j|%N"], capture_output=True,
                           text=True).stdout.split()
    jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True,
                          text=True).stdout.split()
    return steps, jobs

def main(scenario):
    result = {"job": os.environ["SLURM_JOB_ID"]}
    options = dict(backend="allocation", keep_alive=0, poll_interval=0.1, result_grace=1)
    if scenario == "retry":
        options.update(max_retries=1, retry_on=("FAILED",))
    with SlurmExecutor(os.path.join(os.path.dirname(OUT), "spool"), **options) as ex:
        result["run"], result["same_host"] = ex.run_id, ex.backend.same_host
        result["slots"] = ex.backend.slots()
        if scenario in ("map", "batch"):
            future = ex.submit(square, 3)
            it = ex.map(square, range(24), chunksize=1)
            first = next(it)
            result["steps"], result["jobs"] = steps_and_jobs(result["job"])
            values = [first] + list(it)
            result["values"] = [v[0] for v in values] + [future.result()[0]]
            result["nodes"] = sorted({v[1] for v in values})
            result["step_ids"] = sorted({v[2] for v in values})
        elif scenario == "fail":
            result["killed"] = error_of(ex.submit(kill_my_worker, 1))
            result["exit"] = error_of(ex.submit(exit_hard, 1))
            result["after"] = ex.submit(square, 4).result()[0]
        elif scenario == "retry":
            result["value"] = ex.submit(flaky, 1).result(timeout=120)
        elif scenario == "cancel":
            futures = [ex.submit(sleepy, i) for i in range(3)]
            while len(ex.backend.steps()) < 3:
                time.sleep(0.05)
            result["steps_before"] = sorted(s for s, _ in ex.backend.steps().values())
            started = time.monotonic()
            ex.cancel(futures)
            result["errors"] = [error_of(f) for f in futures]
            result["cancel_seconds"] = time.monotonic() - started
        elif scenario == "verified":  # the step runs the text signed, not the file now
            assert ex.submit(square, 1).result()[0] == 1
            script = spool.script_path(ex.run_dir, 0, 0)
            marker = os.path.join(os.path.dirname(OUT), "ran")
            script.write_text(spool.sign_script(
                script, ex.key, f"#!/bin/bash\\necho $0 > {marker}\\n"))
            job = ex.backend.submit_array(script, 1, ex.run_dir / "logs")
            script.write_text("#!/bin/bash\\nexit 3\\n")
            state = None
            while state is None or not state.final:
                time.sleep(0.05)
                state = ex.backend.states([job]).get((job, 0))
            result["state"] = state.state
            result["ran"] = open(marker).read().strip()
            result["script"] = str(script)
        elif scenario == "outside":  # the test cancels the run with the CLI
            futures = [ex.submit(sleepy, i) for i in range(2)]
            while len(ex.backend.steps()) < 2:
                time.sleep(0.05)
            open(OUT + ".ready", "w").write(ex.run_id)
            result["errors"] = [error_of(f) for f in futures]
    result["arrays"] = [a["job_id"] for j in spool.read_journals(ex.run_dir)
                        for a in j["arrays"]]
    deadline = time.monotonic() + 15  # the steps end by themselves (keep_alive=0)
    while [s for s in steps_and_jobs(result["job"])[0] if "@" in s]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    result["steps_after"], _ = steps_and_jobs(result["job"])
    with open(OUT, "w") as out:
        json.dump(result, out)

main(sys.argv[1])
'''


@pytest.fixture
def client(tmp_path):
    """Write the client and a failing fake `sbatch`; return how to run it."""
    (tmp_path / "client.py").write_text(CLIENT)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path}/sbatch-was-called\nexit 1\n")
    (fake / "sbatch").chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=f"{fake}:{os.environ['PATH']}")
    for name in ("SLURM_JOB_ID", "SLURM_JOBID"):
        env.pop(name, None)
    return tmp_path, env


def in_salloc(client, scenario: str, *salloc: str, wait: bool = True):
    """Run the client as `salloc ARGS python3 client.py SCENARIO` (no TTY)."""
    folder, env = client
    command = ["salloc", "--quiet", *salloc, sys.executable, str(folder / "client.py"),
               scenario, str(folder / "out.json")]
    if not wait:
        return subprocess.Popen(command, env=env, cwd=folder, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(command, env=env, cwd=folder, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    return read_result(folder, done.stderr)


def read_result(folder: Path, stderr: str = "") -> dict:
    assert (folder / "out.json").exists(), stderr
    assert not (folder / "sbatch-was-called").exists(), "a job was submitted"
    return json.loads((folder / "out.json").read_text())


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_map_and_submit_run_as_steps_of_the_allocation_over_its_nodes(client):
    result = in_salloc(client, "map", "-N2", "-n4")
    assert result["values"] == [i * i for i in range(24)] + [9]
    assert result["slots"] == 4 and result["same_host"] is False
    job = result["job"]
    assert result["jobs"] == [job]  # nothing but the allocation in the queue
    ours = [s for s in result["steps"] if "@" in s]
    assert ours and all(s.startswith(f"{job}.") for s in ours)
    assert result["nodes"] == ["n1", "n2"] or len(result["nodes"]) == 2
    assert all(a.startswith(f"{job}-") for a in result["arrays"])
    assert not [s for s in result["steps_after"] if "@" in s]  # all steps ended


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_a_step_runs_the_script_text_verified_at_submission(client):
    """The step is given the text the backend verified; the file, changed after, is only
    its name ($0)."""
    result = in_salloc(client, "verified", "-N1", "-n1")
    assert result["state"] == "COMPLETED" and result["ran"] == result["script"]


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_a_batch_job_on_one_node_is_same_host(client):
    folder, env = client
    sbatch = shutil.which("sbatch")  # the real one; the job's PATH has the fake first
    assert sbatch is not None
    done = subprocess.run([sbatch, "--parsable", "-N1", "-n2", "-o", str(folder / "job.log"),
                           "--wrap", (f"{sys.executable} {folder / 'client.py'} batch "
                           f"{folder / 'out.json'}")], env=env, cwd=folder,
                          capture_output=True, text=True, check=True)
    job = done.stdout.strip()
    deadline = time.monotonic() + 120
    while not (folder / "out.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = (folder / "job.log").read_text() if (folder / "job.log").exists() else ""
    result = read_result(folder, log)
    assert result["job"] == job and result["same_host"] is True and result["slots"] == 2
    assert result["values"] == [i * i for i in range(24)] + [9]
    assert len(result["nodes"]) == 1


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_a_failed_step_and_a_crashed_call_give_the_usual_errors(client):
    result = in_salloc(client, "fail", "-N2", "-n2")
    name, message, state, sig = result["killed"]
    assert name == "WorkerCrashedError" and state == "FAILED" and sig == 9, message
    assert "job " in message and "FAILED" in message
    name, message, _, _ = result["exit"]
    assert name == "WorkerCrashedError" and "code 3" in message
    assert result["after"] == 16


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_a_failed_step_is_retried_when_configured(client):
    result = in_salloc(client, "retry", "-N2", "-n2")
    assert result["value"] == 2
    assert len(result["arrays"]) == 2  # the first attempt, and the retry


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_cancel_ends_the_steps(client):
    result = in_salloc(client, "cancel", "-N2", "-n4")
    assert len(result["steps_before"]) == 3
    assert [e[0] for e in result["errors"]] == ["JobCancelledError"] * 3
    assert result["cancel_seconds"] < 30  # not the 60 s the calls sleep
    assert not [s for s in result["steps_after"] if "@" in s]


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_status_and_cancel_from_the_command_line(client):
    folder, env = client
    process = in_salloc(client, "outside", "-N2", "-n2", wait=False)
    try:
        ready = folder / "out.json.ready"
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
        run = ready.read_text()
        cli = [sys.executable, "-m", "slurmexecutor", "--folder", str(folder / "spool")]
        status = subprocess.run(cli + ["status", run], capture_output=True, text=True,
                                env=env, timeout=60, check=True).stdout
        assert "allocation" in status and "RUNNING" in status, status
        cancel = subprocess.run(cli + ["cancel", run], capture_output=True, text=True,
                                env=env, timeout=60, check=True).stdout
        assert "cancelled 2 unfinished call(s)" in cancel, cancel
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    result = read_result(folder, stderr)
    assert [e[0] for e in result["errors"]] == ["JobCancelledError"] * 2, result["errors"]
    assert not [s for s in result["steps_after"] if "@" in s]
