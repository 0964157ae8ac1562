"""Static checks: the linter (ruff.toml) and the type checker (setup.cfg [mypy]) pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def check(*args: str) -> None:
    """Run `python -m <args>` at the repo root; fail showing its output unless it exits 0."""
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, (
        f"`python -m {' '.join(args)}` exited {done.returncode}:\n{done.stdout}{done.stderr}")


def test_ruff_is_clean():
    check("ruff", "check", ".")


def test_mypy_is_clean():
    check("mypy", "slurmexecutor")
