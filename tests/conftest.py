"""Test fixtures: a real throwaway Slurm cluster (once per session) and executors.

The session cluster is the `slurm_cluster` fixture of the package's own pytest plugin
(`slurmexecutor.testing.plugin`, registered by the package's `pytest11` entry point); this
file only sizes it. If Slurm is not installed the Slurm tests FAIL (they are never skipped
silently); set SLURMEXECUTOR_SKIP_SLURM=1 to deselect them on a machine without Slurm on
purpose. SLURMEXECUTOR_TEST_CLUSTER=DIR runs the session cluster in DIR (reusing one
already running there).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import run_beside as background  # tests/ is on sys.path (conftest; scripts importing it)

from slurmexecutor import SlurmExecutor
from slurmexecutor.folder import spool

REPO = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.py"  # = python -m slurmexecutor.testing
BACKENDS = ["local", "slurm"]
#: The session cluster: 3 nodes so node loss can be tested, 16 CPUs in all.
CLUSTER_NODES, CLUSTER_CPUS = 3, 6


def cluster(command: str, directory: Path, *args: str) -> str:
    """Run `python -m slurmexecutor.testing COMMAND DIRECTORY ARGS...`; return its stdout."""
    done = subprocess.run([sys.executable, "-m", "slurmexecutor.testing", command,
                           str(directory), *args], capture_output=True, text=True, timeout=180,
                          check=False, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"slurmexecutor.testing {command} failed:\n{done.stderr}")
    return done.stdout


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


#: the child pytest that runs the `background` tests beside the session (run_beside.py)
BACKGROUND = pytest.StashKey["background.Background | None"]()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SLURMEXECUTOR_SKIP_SLURM") == "1":
        skip = pytest.mark.skip(reason="SLURMEXECUTOR_SKIP_SLURM=1: Slurm tests deselected")
        for item in items:
            callspec = getattr(item, "callspec", None)
            if "slurm" in item.keywords or (callspec and callspec.params.get("backend") == "slurm"):
                item.add_marker(skip)
    config.stash[BACKGROUND] = background.start(config, items)


def pytest_sessionfinish(session, exitstatus):
    child = session.config.stash.get(BACKGROUND, None)
    if child is not None:
        background.finish(child, session)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    child = config.stash.get(BACKGROUND, None)
    if child is not None:
        background.summarize(child, terminalreporter)


@pytest.fixture(scope="session")
def slurm_cluster_options() -> dict:
    """The size of the plugin's session cluster (`slurm_cluster`) for our tests."""
    return {"nodes": CLUSTER_NODES, "cpus": CLUSTER_CPUS}


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    if request.param == "slurm":
        request.getfixturevalue("slurm_cluster")
    return request.param


@pytest.fixture
def make_executor(backend, tmp_path):
    """Build executors on the parametrised backend; they are shut down after the test."""
    made: list[SlurmExecutor] = []

    def make(**options) -> SlurmExecutor:
        options.setdefault("poll_interval", 0.3 if backend == "slurm" else 0.05)
        options.setdefault("keep_alive", 0)  # warm tasks: tests/test_warm.py
        executor = SlurmExecutor(tmp_path / "spool", backend=backend, **options)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.shutdown(wait=False, cancel_futures=True)
        if backend == "slurm":  # leave nothing queued for the next test
            jobs = {array["job_id"] for journal in spool.read_journals(executor.run_dir)
                    for array in journal["arrays"]}
            if jobs:
                subprocess.run(["scancel", *sorted(jobs)], capture_output=True, check=False)


def mount_tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs at `where` (root only) for as long as the generator runs."""
    if os.getuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(mode=0o700, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 2 MiB tmpfs, private like a folder of ours."""
    yield from mount_tmpfs(tmp_path / "small", "size=2m,mode=0700")


@pytest.fixture
def read_only_disk(tmp_path) -> Iterator[Path]:
    """A read-only tmpfs."""
    yield from mount_tmpfs(tmp_path / "read-only", "ro,size=1m,mode=0700")
