"""Reading runs back for the commands (`status`, `cancel`, `clean`, `report`): the runs
folder, and each run classified with the scheduler's states, asked once for all."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from slurmexecutor.errors import SlurmExecutorError
from slurmexecutor.folder import spool
from slurmexecutor.folder.folders import default_folder
from slurmexecutor.reports import runs

unreachable: list[str] = []  # Slurm could not be asked: said once per command


def folder_of(args: argparse.Namespace) -> Path:
    """The runs folder a command works on (--folder, else the default)."""
    return Path(args.folder or default_folder()).expanduser()


def read_runs(folder: Path, run_dirs: list[Path],
              observe: runs.Observer | None = None) -> Iterator[runs.RunInfo]:
    """Read and classify runs one at a time (one in memory), having asked Slurm about
    all their jobs in ONE query (again only for jobs submitted since). `observe`: see
    `runs.read_run`."""
    key = spool.load_key(folder)
    slurm_runs = {run_dir for run_dir in run_dirs if runs.backend_of(run_dir, key) == "slurm"}
    asked = {job for run_dir in slurm_runs for job in runs.journal_job_ids(run_dir)}
    states = slurm_states(asked) if asked else {}
    for run_dir in run_dirs:
        info = runs.read_run(run_dir, key, observe)
        if info.unreadable:
            yield info
            continue
        if info.meta["backend"] == "allocation":  # its steps, by name (squeue -s)
            steps = slurm_states(set(info.job_ids), info)
            yield runs.classify(info, steps) if steps is not None else info
            continue
        if info.meta["backend"] != "slurm":
            yield runs.classify(info, None)
            continue
        if states is not None and (missing := set(info.job_ids) - asked):
            more = slurm_states(missing)
            states = None if more is None else {**states, **more}
            asked |= missing
        # Slurm unreachable: what the folder knows (calls without a result: unknown)
        yield runs.classify(info, states) if states is not None else info


#: seconds squeue is given before Slurm counts as unreachable (a controller that is down
#: is reported after ~9 s; without a configuration, commands retry for 60 s)
UNREACHABLE_AFTER = 15.0


def slurm_states(job_ids: set[str], allocation_run: runs.RunInfo | None = None) -> dict | None:
    """The scheduler's states of these jobs (of an allocation run: its tasks' steps), or
    None (said once) when Slurm cannot be asked: not installed, not configured, or its
    controller down."""
    if unreachable:
        return None
    try:  # a command without a configuration retries for 60 s: do not wait that long
        if allocation_run is not None:
            from slurmexecutor.schedulers.allocation import run_states

            return run_states(allocation_run.tasks, allocation_run.client_alive,
                              UNREACHABLE_AFTER)
        return slurm_backend().states(job_ids, timeout=UNREACHABLE_AFTER)
    except (SlurmExecutorError, OSError) as error:
        unreachable.append(str(error))
        first = next((line for line in str(error).splitlines() if line.strip()), "")
        print(f"Slurm not reachable: states of Slurm runs unknown ({first[:160]})",
              file=sys.stderr)
        return None


def slurm_backend():
    from slurmexecutor.schedulers.slurm import SlurmBackend

    return SlurmBackend({})
