"""The joblib backend "slurmexecutor" (joblib_backend.py), on the real Slurm cluster AND the
local backend: joblib's own Parallel, and a scikit-learn estimator's n_jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_until

from slurmexecutor import RemoteTraceback, SerializationError
from slurmexecutor.folder import spool

joblib = pytest.importorskip("joblib", reason="the joblib extra: pip install slurmexecutor[joblib]")

REPO = Path(__file__).resolve().parent.parent


# -- functions the workers run (this module is importable there via the shipped sys.path)


def square_and_pid(x):
    return x * x, os.getpid()


class JoblibTestError(Exception):
    pass


def fail_or_wait(i, folder):
    """Call 0 fails at once; the others start, then wait for `release` before finishing."""
    if i == 0:
        raise JoblibTestError("call 0 fails")
    Path(folder, f"started-{i}").touch()
    wait_until(lambda: Path(folder, "release").exists(), timeout=40)
    Path(folder, f"finished-{i}").touch()


def nested(n):
    """A Parallel inside a task: runs sequentially, in the task."""
    from joblib.parallel import get_active_backend

    pids = joblib.Parallel(n_jobs=2)(joblib.delayed(os.getpid)() for _ in range(n))
    return os.getpid(), pids, type(get_active_backend()[0]).__name__


# -- helpers and fixtures


def batches(folder: Path) -> list[dict]:
    """The batches the executor wrote in every run under `folder`."""
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*/b*.json"))]


def calls(folder: Path) -> int:
    return sum(end - start for batch in batches(folder) for chunk in batch["chunks"]
               for start, end in chunk)


@pytest.fixture
def config(backend, tmp_path):
    """`parallel_config` keywords: the slurmexecutor backend on the parametrised backend."""
    folder = tmp_path / "spool"
    yield {"backend": "slurmexecutor", "executor_backend": backend, "folder": folder,
           "poll_interval": 0.3 if backend == "slurm" else 0.05}
    if backend == "slurm" and folder.exists():  # leave nothing queued for the next test
        jobs = {array["job_id"] for run in folder.iterdir() if (run / "run.json").exists()
                for journal in spool.read_journals(run) for array in journal["arrays"]}
        if jobs:
            subprocess.run(["scancel", *sorted(jobs)], capture_output=True, check=False)


# -- joblib.Parallel


def test_parallel_runs_batches_on_the_executor_in_order(config):
    with joblib.parallel_config(**config):
        out = joblib.Parallel(n_jobs=4)(joblib.delayed(square_and_pid)(i) for i in range(200))
    assert [value for value, _ in out] == [i * i for i in range(200)]
    assert os.getpid() not in {pid for _, pid in out}  # ran in array tasks
    written = batches(config["folder"])
    assert written and all(b["functions"] == ["slurmexecutor.apps.joblib_backend.run_batch"]
                           for b in written)
    assert len(list(config["folder"].glob("*/run.json"))) == 1  # one executor per call
    assert 1 < calls(config["folder"]) < 200  # a submit per joblib batch: auto-batching


def test_an_exception_raises_its_type_and_cancels_the_rest(config, tmp_path):
    start = time.monotonic()
    with joblib.parallel_config(**config), pytest.raises(JoblibTestError) as raised:
        joblib.Parallel(n_jobs=2)(joblib.delayed(fail_or_wait)(i, tmp_path) for i in range(8))
    assert time.monotonic() - start < 30  # did not wait for the other calls
    assert isinstance(raised.value.__cause__, RemoteTraceback)
    (tmp_path / "release").touch()  # calls still running now would finish at once
    time.sleep(3)
    assert not list(tmp_path.glob("finished-*")), "the other calls were not stopped"


def test_return_as_generator(config):
    with joblib.parallel_config(**config):
        results = joblib.Parallel(n_jobs=2, return_as="generator")(
            joblib.delayed(square_and_pid)(i) for i in range(20))
        assert not isinstance(results, list)
        assert [value for value, _ in results] == [i * i for i in range(20)]


def test_nested_parallel_runs_sequentially_in_the_task(config):
    with joblib.parallel_config(**config):
        out = joblib.Parallel(n_jobs=2)(joblib.delayed(nested)(3) for _ in range(2))
    for pid, pids, backend in out:
        assert pid != os.getpid() and pids == [pid] * 3 and backend == "SequentialBackend"


def test_scikit_learn_n_jobs(config):
    pytest.importorskip("sklearn", reason="scikit-learn is not installed")
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    X, y = make_classification(n_samples=300, n_features=8, random_state=0)
    expected = cross_val_score(LogisticRegression(), X, y, cv=3)
    with joblib.parallel_config(**config):
        scores = cross_val_score(LogisticRegression(), X, y, cv=3, n_jobs=2)
    assert list(scores) == list(expected)
    assert calls(config["folder"]) >= 1  # the folds ran through the executor


# -- configuration (local only)


def test_n_jobs_and_options(tmp_path):
    config = {"backend": "slurmexecutor", "executor_backend": "local",
              "folder": tmp_path / "spool", "array_parallelism": 3}
    slots = min(os.cpu_count() or 1, 3)
    with joblib.parallel_config(**config):
        assert joblib.effective_n_jobs(-1) == joblib.effective_n_jobs(None) == slots
        assert joblib.effective_n_jobs(-2) == max(slots - 1, 1)
        assert joblib.effective_n_jobs(7) == 7
        # n_jobs=1 runs here, as with every joblib backend: no executor, no run
        assert joblib.Parallel(n_jobs=1)(joblib.delayed(os.getpid)() for _ in range(2)) == [
            os.getpid()] * 2
        assert not (tmp_path / "spool").exists()
        # an argument that does not pickle fails the Parallel call (it does not hang)
        with pytest.raises(SerializationError):
            joblib.Parallel(n_jobs=2)(joblib.delayed(id)(threading.Lock()) for _ in range(2))
    with pytest.raises(ValueError, match="partition"):  # unknown options fail at once
        joblib.parallel_config(backend="slurmexecutor", partiton="short")


@pytest.mark.parametrize("imports", [
    "import slurmexecutor\nassert 'joblib' not in sys.modules\nimport joblib\n",
    "import joblib\nimport slurmexecutor\n"], ids=["slurmexecutor-first", "joblib-first"])
def test_registered_on_import_in_a_fresh_interpreter(imports, tmp_path):
    """Importing slurmexecutor registers the backend, before or after joblib is imported
    (and without importing it); the executor's folder follows SLURMEXECUTOR_FOLDER."""
    code = ("import os, sys\n" + imports +
            "with joblib.parallel_config(backend='slurmexecutor', executor_backend='local'):\n"
            "    pids = joblib.Parallel(n_jobs=2)(joblib.delayed(os.getpid)() for _ in range(4))\n"
            "print(len(pids), os.getpid() in pids)\n")
    env = {**os.environ, "SLURMEXECUTOR_FOLDER": str(tmp_path / "env-folder")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "4 False"
    assert len(list((tmp_path / "env-folder").glob("*/run.json"))) == 1
