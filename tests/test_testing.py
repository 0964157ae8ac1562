"""The package's throwaway test cluster (slurmexecutor.testing): its pytest plugin as a
user's test suite sees it, the `capped` partition, and restarting the controller with
extra settings while jobs are queued."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from slurmexecutor.testing import CAPPED_MAX_TIME, Cluster, restart_controller, up
from slurmexecutor.testing.config import with_settings

USER_TEST = """
from slurmexecutor import SlurmExecutor

def test_my_pipeline(slurm_cluster, tmp_path):
    with SlurmExecutor(tmp_path / "runs", backend="slurm") as ex:
        assert list(ex.map(abs, [-1, -2, 3])) == [1, 2, 3]
"""


def sbatch(*args: str, env: dict[str, str] | None = None,
           timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", *args, "--wrap", "true"],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          check=False, stdin=subprocess.DEVNULL)


def config_value(key: str, env: dict[str, str]) -> str:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                         env=env, check=True).stdout
    return next(line.split("=", 1)[1].strip() for line in out.splitlines()
                if line.split("=")[0].strip() == key)


def queued(env: dict[str, str]) -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                         env=env, check=True).stdout
    return set(out.split())


def run_user_suite(tmp_path: Path, cluster_dir: Path) -> subprocess.CompletedProcess:
    (tmp_path / "test_user.py").write_text(textwrap.dedent(USER_TEST))
    env = {**os.environ, "SLURMEXECUTOR_TEST_CLUSTER": str(cluster_dir)}
    env.pop("SLURM_CONF", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "test_user.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_with_settings_replaces_a_key_in_place_and_appends_new_ones():
    text = "ClusterName=x\nenforcepartlimits=ALL\nNodeName=n1 CPUs=2\n"
    changed = with_settings(text, ["EnforcePartLimits=NO", "MaxJobCount=5"])
    lines = changed.splitlines()
    assert lines[:3] == ["ClusterName=x", "EnforcePartLimits=NO", "NodeName=n1 CPUs=2"]
    assert lines[-1] == "MaxJobCount=5" and changed.count("EnforcePartLimits") == 1
    assert with_settings(text, []) == text


@pytest.mark.slurm
def test_a_users_suite_reuses_a_running_cluster_and_leaves_it_running(slurm_cluster,
                                                                      tmp_path):
    done = run_user_suite(tmp_path, slurm_cluster.directory)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    assert slurm_cluster.running()


@pytest.mark.slurm
def test_a_users_suite_starts_its_own_cluster_and_stops_it(slurm_cluster, tmp_path):
    own = Cluster(tmp_path / "c")
    try:
        done = run_user_suite(tmp_path, own.directory)
        assert done.returncode == 0, done.stdout + done.stderr
        assert own.conf.is_file() and not own.running()
    finally:
        own.down()


@pytest.mark.slurm
def test_capped_partition_refuses_a_time_over_its_max_time(slurm_cluster):
    refused = sbatch("-p", "capped", "--time=00:01:01")
    assert refused.returncode == 1
    assert "Requested time limit is invalid" in refused.stderr
    accepted = sbatch("-p", "capped", f"--time={CAPPED_MAX_TIME}", "-H")
    assert accepted.returncode == 0, accepted.stderr
    subprocess.run(["scancel", accepted.stdout.strip()], check=True)


@pytest.mark.slurm
def test_restart_controller_applies_settings_and_keeps_queued_jobs(slurm_cluster, tmp_path):
    cluster = up(tmp_path / "c", nodes=1, cpus=1)
    env = cluster.env()
    try:
        held = {sbatch("-H", env=env).stdout.strip() for _ in range(2)}
        with cluster.controller_settings("MaxJobCount=4"):
            assert config_value("MaxJobCount", env) == "4"
            assert queued(env) == held
            held.add(sbatch("-H", env=env).stdout.strip())  # 3 records: the most below 4
            with pytest.raises(subprocess.TimeoutExpired) as full:  # sbatch retries ~2 min
                sbatch("-H", env=env, timeout=1)
            stderr = full.value.stderr
            assert b"temporarily unable to accept job" in (stderr or b"")
        assert config_value("MaxJobCount", env) == "10000"
        assert queued(env) == held
        restart_controller(cluster.directory, ["MaxJobCount=4"])
        restart_controller(cluster.directory, [])  # the settings of the latest call only
        assert config_value("MaxJobCount", env) == "10000"
    finally:
        cluster.down()
