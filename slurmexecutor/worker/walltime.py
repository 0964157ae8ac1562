"""A task's own clock: when Slurm will end it, and how long its calls take, so that it
claims only chunks that fit in the time it has left and, warm, joins only batches whose
next chunk it can finish.

- The end is read once, at the task's start: `SLURM_JOB_END_TIME` (Slurm 21.08 and
  later; the local backend sets it from the script's `--time`), else
  `squeue -h -o %e -j $SLURM_JOB_ID`; no end (no limit, or not known): every chunk fits.
  A warm task keeps its own job's end in every batch it joins.
- Durations are learned per batch function names (the manifest's `names`): seconds per
  call, from the calls this task ran. A chunk of functions it has not
  measured yet always fits (as before: the warning hands back what it cannot finish).
- A chunk fits if its calls (the manifest's largest chunk) at the measured seconds per
  call end before Slurm's warning (the manifest's `warning`: that many s before the
  end, when the task stops claiming anyway), and at least `MARGIN` s before the end.
"""

from __future__ import annotations

import os
import subprocess
import time

#: seconds kept free before the end (Slurm's warning comes before it: what runs then is
#: handed back, so this margin only saves a chunk that would be cut short)
MARGIN = 2.0


def job_end() -> float | None:
    """When Slurm ends this task (epoch seconds), or None if it has no known limit."""
    text = os.environ.get("SLURM_JOB_END_TIME", "")
    if text.isdigit():
        return float(text)
    job = os.environ.get("SLURM_JOB_ID")
    if not job or os.environ.get("SLURMEXECUTOR_JOB"):  # a local task inside a job
        return None
    try:
        done = subprocess.run(["squeue", "-h", "-o", "%e", "-j", job], capture_output=True,
                              text=True, timeout=10, check=False)
        return time.mktime(time.strptime(done.stdout.strip(), "%Y-%m-%dT%H:%M:%S"))
    except (OSError, ValueError, subprocess.SubprocessError):  # N/A, no squeue, ...
        return None


class Clock:
    """The task's end and its measured seconds per call, per batch function names."""

    def __init__(self, end: float | None) -> None:
        self.end = end
        self._ran: dict[str, tuple[float, int]] = {}  # names -> (seconds, calls)

    def ran(self, functions: str, seconds: float, calls: int) -> None:
        total, count = self._ran.get(functions, (0.0, 0))
        self._ran[functions] = (total + seconds, count + calls)

    def per_call(self, functions: str) -> float | None:
        total, count = self._ran.get(functions, (0.0, 0))
        return total / count if count else None

    def fits(self, manifest: dict) -> bool:
        """Whether a chunk of this batch (its largest) can end before the task does."""
        per_call = self.per_call(manifest.get("names", ""))
        if self.end is None or per_call is None:
            return True
        calls = int(manifest.get("chunk_calls") or 1)
        margin = max(MARGIN, float(manifest.get("warning") or 0))
        return time.time() + calls * per_call + margin <= self.end
