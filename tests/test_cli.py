"""The `slurmexecutor` command, driven as a user would (subprocesses, real cluster)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import wait_until

from slurmexecutor import JobCancelledError, SlurmExecutor
from slurmexecutor.apps.countreads import count_reads_serial, make_demo_data, read_bed
from slurmexecutor.folder import spool

pytestmark = pytest.mark.usefixtures("slurm_cluster")


def cli(*args: str, folder: Path | None = None, check: bool = True,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "slurmexecutor"]
    if folder is not None:
        command += ["--folder", str(folder)]
    done = subprocess.run(command + list(args), capture_output=True, text=True, timeout=300,
                          cwd=cwd, check=False)
    if check:
        assert done.returncode == 0, f"{args}: {done.stderr}"
    return done


def run_client(tmp_path: Path, body: str) -> str:
    """Run a client script that prints its run id on the first line."""
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        from slurmexecutor import JobCancelledError, SlurmExecutor
        from slurmexecutor.folder import spool

        def wait_submitted(ex):
            # until the owner thread has submitted the batch (sbatch answered)
            while not any(j["arrays"] for j in spool.read_journals(ex.run_dir)):
                time.sleep(0.05)

        ex = SlurmExecutor({str(tmp_path / 'spool')!r}, backend="slurm", poll_interval=0.3)
        print(ex.run_id, flush=True)
    """) + textwrap.dedent(body))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[0]


def read_tsv(path: Path) -> dict[str, int]:
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    return {name: int(count) for name, count in rows}


@pytest.mark.parametrize("backend", ["slurm", "local"])
def test_count_reads_equals_the_single_process_loop(tmp_path, backend):
    data = make_demo_data(tmp_path / "data", n_reads=5000, n_genes=60)
    output = tmp_path / "counts.tsv"
    cli("count-reads", str(data.bam), str(data.genes_bed), "--fractions", "7", "--backend",
        backend, "-o", str(output), folder=tmp_path / "spool")
    regions = read_bed(data.genes_bed)
    expected = count_reads_serial(data.bam, regions)
    counts = read_tsv(output)
    assert list(counts)[:-1] == [region.name for region in regions]
    assert {name: counts[name] for name in expected} == dict(expected)
    assert counts["total"] == sum(expected.values()) > 0


def test_demo_runs_on_slurm(tmp_path):
    done = cli("demo", str(tmp_path / "demo"), "--backend", "slurm", folder=tmp_path / "spool")
    assert "on the slurm backend" in done.stderr
    assert done.stdout.count("equals a single-process pysam count: yes") == 2
    assert (tmp_path / "demo" / "genes.counts.tsv").exists()


def test_count_reads_rejects_a_missing_index(tmp_path):
    bam = tmp_path / "plain.bam"
    data = make_demo_data(tmp_path / "data", n_reads=100, n_genes=3)
    bam.write_bytes(data.bam.read_bytes())
    done = cli("count-reads", str(bam), str(data.genes_bed), folder=tmp_path / "spool",
               check=False)
    assert done.returncode == 1 and "has no index" in done.stderr


def test_status_lists_runs_and_failed_calls(tmp_path):
    run = run_client(tmp_path, """
        def work(x):
            if x == 3:
                raise ValueError("three is bad")
            print("working on", x)
            return x
        futures = [ex.submit(work, i) for i in range(6)]
        for f in futures:
            f.exception()
        ex.shutdown()
    """)
    table = cli("status", folder=tmp_path / "spool").stdout
    assert run in table
    row = next(line for line in table.splitlines() if line.startswith(run)).split()
    assert row[5:8] == ["6", "5", "1"]  # CALLS DONE FAILED (CREATED is two words)
    detail = cli("status", run[:12], folder=tmp_path / "spool").stdout
    assert "ValueError: three is bad" in detail
    assert "call 3" in detail
    log = cli("logs", run, "2", folder=tmp_path / "spool").stdout
    assert "working on 2" in log and "working on 1" not in log
    assert "working on 4" in cli("logs", run, folder=tmp_path / "spool").stdout


def test_cancel_a_run_of_a_client_that_went_away(tmp_path):
    run = run_client(tmp_path, """
        futures = [ex.submit(time.sleep, 120) for _ in range(3)]
        wait_submitted(ex)
        os._exit(0)  # the client leaves; its jobs stay on the cluster
    """)
    jobs = cli("status", run, folder=tmp_path / "spool").stdout
    assert "pending" in jobs.lower() or "RUNNING" in jobs
    done = cli("cancel", run, folder=tmp_path / "spool")
    assert "cancelled 3 unfinished call(s), scancel" in done.stdout
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        table = cli("status", folder=tmp_path / "spool").stdout
        if "(cancelled)" in table:
            break
        time.sleep(0.5)
    assert "(cancelled)" in table
    job_ids = next(line for line in table.splitlines() if line.startswith(run)).split()[-1]
    queue = subprocess.run(["squeue", "-h", "-j", job_ids, "-o", "%T"], capture_output=True,
                           text=True, check=False).stdout
    assert "RUNNING" not in queue and "PENDING" not in queue


def test_clean_removes_finished_runs_only(tmp_path):
    finished = run_client(tmp_path, "ex.submit(abs, -1).result(); ex.shutdown()\n")
    live = run_client(tmp_path, """
        ex.submit(time.sleep, 120)
        wait_submitted(ex)
        os._exit(0)
    """)
    output = cli("clean", folder=tmp_path / "spool").stdout
    assert f"removed {finished}" in output and f"kept {live}: still live" in output
    assert not (tmp_path / "spool" / finished).exists()
    assert (tmp_path / "spool" / live).exists()
    cli("cancel", live, folder=tmp_path / "spool")


def test_render_shows_the_exact_script(tmp_path):
    script = cli("render", "--partition", "short", "--time", "1:00:00", "--mem", "4G",
                 "--array-parallelism", "5", "--setup", "module load python",
                 folder=tmp_path).stdout
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for expected in ('#SBATCH --partition="short"', '#SBATCH --time="1:00:00"',
                     '#SBATCH --mem="4G"', "#SBATCH --array=0-15%5",
                     "#SBATCH --signal=B:USR1@60", "module load python"):
        assert expected in lines
    assert lines[-1].startswith("exec ") and "from slurmexecutor.worker.supervisor import main" in lines[-1]
    bad = cli("render", "--no-such-option", "1", folder=tmp_path, check=False)
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr
    for command in ("render", "count-reads", "demo"):  # help texts hold a literal %N
        assert "at most this many tasks" in cli(command, "--help", folder=tmp_path).stdout


def test_logging_is_silent_unless_asked(tmp_path):
    run_dir = tmp_path / "quiet"
    code = textwrap.dedent(f"""
        from slurmexecutor import SlurmExecutor
        with SlurmExecutor({str(run_dir)!r}, backend="slurm") as ex:
            ex.submit(abs, -1).result()
    """)
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, cwd=tmp_path)
    assert quiet.stdout == "" and quiet.stderr == ""
    loud = subprocess.run([sys.executable, "-c", "import logging; logging.basicConfig("
                           "level=logging.INFO)\n" + code], capture_output=True, text=True,
                          check=True, cwd=tmp_path, env=dict(os.environ))
    assert "submitted array job" in loud.stderr


@pytest.mark.slurm
def test_status_cancel_and_clean_when_slurm_cannot_be_reached(slurm_cluster, tmp_path):
    """Slurm installed but its controller unreachable (here: a copy of the cluster's
    configuration with another controller port): the commands show what the folder
    knows, with one line about Slurm, and exit 0."""
    folder = tmp_path / "spool"
    ex = SlurmExecutor(folder, backend="slurm", poll_interval=0.3, keep_alive=0)
    assert ex.submit(abs, -1).result(timeout=120) == 1
    slurm_run = ex.run_id
    stuck = ex.submit(time.sleep, 600)  # unfinished when Slurm goes away
    assert wait_until(lambda: stuck.log_path is not None, timeout=60)
    ex.shutdown(wait=False, cancel_futures=True)  # the client goes; the call runs on
    with SlurmExecutor(folder, backend="local", keep_alive=0) as local:
        assert local.submit(abs, -2).result(timeout=120) == 2
        local_run = local.run_id
    try:
        conf = Path(os.environ["SLURM_CONF"]).read_text()
        dead = tmp_path / "slurm.conf"  # nothing listens on port 1; the clients give up
        replaced = {"SlurmctldPort=": "SlurmctldPort=1", "MessageTimeout=": "MessageTimeout=2"}
        dead.write_text("\n".join(next((new for old, new in replaced.items()  # sooner
                                         if line.startswith(old)), line)
                                   for line in conf.splitlines()) + "\n")
        env = dict(os.environ, SLURM_CONF=str(dead))

        def offline(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
            """Run the commands at once (each waits for the dead controller)."""
            running = [subprocess.Popen([sys.executable, "-m", "slurmexecutor", "--folder",
                                         str(folder), *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env)
                       for args in commands]
            done = []
            for process, args in zip(running, commands):
                out, err = process.communicate(timeout=120)
                done.append(subprocess.CompletedProcess(args, process.returncode, out, err))
            return done

        status, one = offline(("status",), ("status", local_run))
        assert status.returncode == 0, status.stderr
        assert status.stderr.count("Slurm not reachable: states of Slurm runs unknown") == 1
        rows = {line.split()[0]: line for line in status.stdout.splitlines()[1:]}
        assert "unknown" in rows[slurm_run] and "local" in rows[local_run]
        assert one.returncode == 0 and "Slurm not reachable" not in one.stderr
        [clean] = offline(("clean",))  # before cancel marks the Slurm run's calls
        assert clean.returncode == 0 and f"kept {slurm_run}" in clean.stdout
        [cancel] = offline(("cancel", slurm_run))
        assert cancel.returncode == 1 and "marked cancelled" in cancel.stderr
    finally:  # the stuck call's job: end it while the cluster is still there
        job_ids = [a["job_id"] for j in spool.read_journals(ex.run_dir) for a in j["arrays"]]
        subprocess.run(["scancel", *job_ids], check=False)  # with the real SLURM_CONF
        assert isinstance(stuck.exception(timeout=120), JobCancelledError)
        ex._engine.join(60)
        assert not ex._engine.alive


@pytest.mark.parametrize("damage", ["empty run.json", "truncated journal"])
def test_a_damaged_run_is_shown_unreadable_and_the_others_go_on(tmp_path, damage):
    folder = tmp_path / "spool"
    runs_made = []
    for _ in range(3):
        with SlurmExecutor(folder, backend="local", keep_alive=0) as ex:
            assert ex.submit(abs, -1).result(timeout=60) == 1
        runs_made.append(ex.run_dir)
    bad = runs_made[1]
    if damage == "empty run.json":
        (bad / "run.json").write_text("{}")
    else:
        journal = spool.journal_path(bad, 0)
        journal.write_bytes(journal.read_bytes()[:20])
    shown = cli("status", folder=folder).stdout
    assert bad.name in shown and "unreadable" in shown, shown
    assert all(run.name in shown for run in runs_made)
    single = cli("status", bad.name, folder=folder, check=False)
    assert single.returncode == 1 and "unreadable" in single.stdout
    assert "Traceback" not in single.stderr
    cleaned = cli("clean", folder=folder).stdout
    assert f"kept {bad.name}: unreadable" in cleaned, cleaned
    assert bad.exists() and not runs_made[0].exists() and not runs_made[2].exists()


def test_clean_cache_dir_refuses_a_folder_that_is_not_a_cache(tmp_path):
    other = tmp_path / "not-a-cache"
    (other / "v1").mkdir(parents=True)
    (other / "v1" / "precious").write_text("data")
    done = cli("clean", "--cache-dir", str(other), folder=tmp_path / "spool", check=False)
    assert done.returncode == 1 and "not a result cache" in done.stderr
    assert (other / "v1" / "precious").read_text() == "data"


def test_a_failed_attach_gives_its_lease_back(tmp_path):
    from slurmexecutor.folder import lease as leases

    folder = tmp_path / "spool"
    with SlurmExecutor(folder, backend="local", keep_alive=0) as ex:
        assert ex.submit(abs, -1).result(timeout=60) == 1
    journal = spool.journal_path(ex.run_dir, 0)
    whole = journal.read_bytes()
    journal.write_bytes(whole[:20])
    with pytest.raises(Exception):  # noqa: B017  (whatever a damaged journal raises)
        SlurmExecutor.attach(ex.run_id, folder, backend="local")
    assert not leases.is_live(leases.read_lease(ex.run_dir))
    journal.write_bytes(whole)
    with SlurmExecutor.attach(ex.run_id, folder, backend="local") as again:
        assert again.futures[0].result(timeout=60) == 1
