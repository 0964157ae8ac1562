"""Paths and option values reach Slurm and the workers intact (quoting)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from slurmexecutor import SlurmExecutor, SubmissionError
from slurmexecutor.schedulers.script import (
    ScriptSpec,
    parse_directives,
    python_path_dir,
    render_script,
)


def where_am_i(x):
    return x, os.getcwd() is not None


class Multiline:
    def __str__(self) -> str:
        return "4G\n#SBATCH --partition=evil"


@pytest.mark.parametrize("name", ["my runs %x 100% é", "bob's#1", "back\\slash"])
def test_a_folder_with_spaces_percent_and_non_ascii_works(backend, tmp_path, name):
    folder = tmp_path / name
    if backend == "slurm" and "\\" in name:  # sbatch drops it from --output, and %A too
        with SlurmExecutor(folder, backend=backend, poll_interval=0.2) as ex:
            error = ex.submit(abs, -3).exception(timeout=120)
        assert isinstance(error, SubmissionError) and "backslash" in str(error), error
        return
    with SlurmExecutor(folder, backend=backend, poll_interval=0.2) as ex:
        assert ex.submit(where_am_i, 3).result(timeout=120) == (3, True)
        assert list(ex.map(abs, [-1, -2])) == [1, 2]
        future = ex.submit(print, "hello from a strange folder")
        future.result(timeout=120)
        assert "hello from a strange folder" in future.log()
    assert list((folder / ex.run_id / "logs").glob("*.log"))


@pytest.mark.slurm
def test_values_with_blanks_stay_one_option(slurm_cluster, tmp_path):
    name = "my job --comment=injected"
    with SlurmExecutor(tmp_path, backend="slurm", job_name=name, comment="two words",
                       poll_interval=0.2) as ex:
        future = ex.submit(abs, -5)
        assert future.result(timeout=120) == 5
        job = future.log_path.stem.partition("_")[0]
        shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True,
                               text=True, check=False).stdout
    if shown:  # still within MinJobAge
        assert f"JobName={name}" in shown and "Comment=two words" in shown


@pytest.mark.slurm
def test_quotes_hashes_and_backslashes_reach_slurm_intact(slurm_cluster, tmp_path):
    """sbatch 22.05 reads `#SBATCH` values with its own quoting; each of these broke a
    submission or lost characters when not double-quoted and escaped."""
    name, comment = "bob's \\job\\ #2", 'say "hi" # it\'s \\ fine'
    with SlurmExecutor(tmp_path, backend="slurm", job_name=name, comment=comment,
                       poll_interval=0.2) as ex:
        future = ex.submit(abs, -5)
        assert future.result(timeout=120) == 5
        job = future.log_path.stem.partition("_")[0]
        shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True,
                               text=True, check=False).stdout
    if shown:  # still within MinJobAge
        assert f"JobName={name}" in shown and f"Comment={comment}" in shown, shown


@pytest.mark.parametrize("value", ["bob's", "a # b", "back\\slash", 'say "hi"', "x\\"])
def test_directives_read_back_what_was_written(value):
    script = render_script({"comment": value}, ScriptSpec(run_dir=Path("/r"), batch=0,
                                                          size=1))
    assert parse_directives(script)["comment"] == value


@pytest.mark.parametrize("resources", [
    {"mem": Multiline()}, {"comment": "a\nb"}, {"nice": "\r"},
])
def test_values_that_could_inject_options_are_refused(resources, tmp_path):
    with pytest.raises(ValueError, match="single line"):
        SlurmExecutor(tmp_path, backend="local", **resources)
    assert not list(tmp_path.glob("2*"))  # refused before anything was created


@pytest.mark.parametrize("extra", [["--export=ALL\n#SBATCH --x"], ["export=ALL"],
                                   ["--array=0-3"], ["-o", "/tmp/x"], ["--wait"],
                                   ["--output=/elsewhere/%j.log"], ["-W"]])
def test_bad_sbatch_extra_is_refused(extra, tmp_path):
    with pytest.raises(ValueError, match="sbatch_extra"):
        SlurmExecutor(tmp_path, backend="local", sbatch_extra=extra)


def test_worker_pythonpath_holds_only_this_package(tmp_path):
    with SlurmExecutor(tmp_path, backend="local") as ex:
        script = render_script({}, ScriptSpec(run_dir=ex.run_dir, batch=0, size=1))
    directory = python_path_dir(ex.run_dir)
    assert f"export PYTHONPATH={directory}" in script
    assert directory.parent == ex.run_dir and directory.stat().st_mode & 0o777 == 0o700
    assert sorted(path.name for path in directory.iterdir()) == ["slurmexecutor"]
    assert (directory / "slurmexecutor").resolve() == Path(
        __import__("slurmexecutor").__file__).resolve().parent
