"""Backends: where array tasks run. Each is three verbs plus two facts.

    submit_array(script_path, size, log_dir, throttle) -> job id
    set_throttle(job id, n)       how many of its tasks may run at once (0: no limit)
    states(job ids) -> {(job id, array index): TaskState}   (ONE scheduler query)
    cancel(["123", "123_4", ...])
    max_array_size(), slots()

`slurm` drives sbatch/squeue/sacct/scancel; `local` runs the same batch script as local
subprocesses (the embedded default where there is no Slurm); `allocation` runs it as job
steps (srun) of the allocation the client runs in; `choose` picks one (`make_backend`).
"""

from __future__ import annotations

from slurmexecutor.schedulers.base import (  # noqa: F401  (the package's names)
    FINAL_STATES,
    REMAINDER,
    Backend,
    TaskKey,
    TaskState,
    state_of,
)
