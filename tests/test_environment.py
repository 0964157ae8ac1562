"""A worker whose interpreter cannot run the client's calls says why, before unpickling."""

from __future__ import annotations

import glob
import subprocess
import sys

import pytest

from slurmexecutor import EnvironmentMismatchError
from slurmexecutor.owner import batches


def other_python() -> str | None:
    """An interpreter of another major.minor (the pyenv versions on these machines)."""
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for path in sorted(glob.glob("/root/.pyenv/versions/3.1[0-9]*/bin/python3")) + sorted(
            glob.glob("/usr/bin/python3.1[0-9]")):
        try:
            code = "import sys; print('%d.%d' % sys.version_info[:2])"
            version = subprocess.run([path, "-c", code], capture_output=True, text=True,
                                     timeout=30, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if version != here and tuple(map(int, version.split("."))) >= (3, 10):
            return path
    return None


def square(x: int) -> int:
    return x * x


def test_another_python_fails_the_calls_naming_both_versions(make_executor):
    python = other_python()
    if python is None:
        pytest.skip("no second Python 3.10+ interpreter on this machine")
    ex = make_executor(python=python)
    futures = [ex.submit(square, 3), ex.submit(lambda: 1)]
    for future in futures:
        error = future.exception(timeout=120)
        assert isinstance(error, EnvironmentMismatchError), error
        here = f"{sys.version_info[0]}.{sys.version_info[1]}"
        assert f"{here} on the client" in str(error) and python in str(error)
        assert sys.executable in str(error)
    with pytest.raises(EnvironmentMismatchError):  # a map too, and no hang
        list(ex.map(square, range(3)))


def test_another_cloudpickle_fails_the_calls(make_executor, monkeypatch):
    real = batches.client_environment()
    monkeypatch.setattr(batches, "client_environment",
                        lambda: {**real, "cloudpickle": "0.0.1"})
    ex = make_executor()
    error = ex.submit(square, 2).exception(timeout=120)
    assert isinstance(error, EnvironmentMismatchError)
    assert f"cloudpickle {real['cloudpickle']} here, 0.0.1 on the client" in str(error)
