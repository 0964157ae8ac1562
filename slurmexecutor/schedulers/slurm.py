"""The Slurm backend: the only code that runs sbatch, squeue, sacct, scancel, scontrol."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Collection
from pathlib import Path

from slurmexecutor._log import log
from slurmexecutor.errors import SubmissionDeferred, SubmissionError
from slurmexecutor.schedulers import sbatch
from slurmexecutor.schedulers.base import REMAINDER, Backend, TaskKey, TaskState

#: squeue columns: array job id, array index, state, raw exit status, reason.
SQUEUE_FORMAT = "ArrayJobID:|,ArrayTaskID:|,State:|,exit_code:|,Reason:"
COMMAND_TIMEOUT = 60


def run_command(args: list[str], *, check: bool = True,
                timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a Slurm command; raise SubmissionError with its stderr when it fails."""
    log.debug("running %s", " ".join(args))
    try:
        done = subprocess.run(args, check=False, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise SubmissionError(f"{args[0]} not found: is Slurm installed here?") from exc
    except subprocess.TimeoutExpired as exc:
        raise SubmissionError(f"{args[0]} did not answer in {timeout:g} s (no "
                              "configuration, or the controller unreachable?)") from exc
    if check and done.returncode != 0:
        raise SubmissionError(
            f"{' '.join(args[:2])} failed (exit {done.returncode}): "
            f"{done.stderr.strip() or done.stdout.strip()}"
        )
    return done


def parse_exit_code(text: str) -> tuple[int | None, int | None]:
    """-> (exit code, signal or None) from sacct's "code:signal" or squeue's raw status.

    squeue's exit_code is the raw wait status: 768 is exit code 3, 11 is signal 11.
    """
    text = text.strip()
    try:
        if ":" in text:
            code, _, sig = text.partition(":")
            return int(code), int(sig) or None
        raw = int(text)
    except ValueError:
        return None, None
    return raw >> 8, (raw & 0x7F) or None


def parse_squeue(output: str) -> dict[TaskKey, TaskState]:
    """Parse `squeue -h -r -O SQUEUE_FORMAT` output (one line per array task)."""
    states: dict[TaskKey, TaskState] = {}
    for line in output.splitlines():
        fields = [field.strip() for field in line.split("|")]
        if len(fields) < 4 or not fields[0].isdigit():
            continue
        if fields[1].isdigit():
            index = int(fields[1])
        elif fields[1] == "N/A":  # the array's tasks not listed one by one
            index = REMAINDER
        else:
            continue  # an unexpanded pending range ("0-3%2")
        exit_code, sig = parse_exit_code(fields[3])
        state = fields[2].split()[0] if fields[2] else "UNKNOWN"
        reason = fields[4] if len(fields) > 4 else ""
        states[(fields[0], index)] = TaskState(state, exit_code, sig, reason)
    return states


_SACCT_ID = re.compile(r"^(\d+)_(\d+)$")


def parse_sacct(output: str) -> dict[TaskKey, TaskState]:
    """Parse `sacct -n -P -X --format=JobID,State,ExitCode` output."""
    states: dict[TaskKey, TaskState] = {}
    for line in output.splitlines():
        fields = line.split("|")
        match = _SACCT_ID.match(fields[0]) if len(fields) >= 3 else None
        if match:
            exit_code, sig = parse_exit_code(fields[2])
            state = fields[1].split()[0]  # "CANCELLED by 0" -> "CANCELLED"
            states[(match.group(1), int(match.group(2)))] = TaskState(state, exit_code, sig)
    return states


def parse_max_array_size(config: str) -> int:
    """MaxArraySize from `scontrol show config`; Slurm's default when absent."""
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", config, re.MULTILINE)
    return int(match.group(1)) if match else 1001


def parse_max_job_count(config: str) -> int:
    """MaxJobCount from `scontrol show config`; Slurm's default when absent."""
    match = re.search(r"^MaxJobCount\s*=\s*(\d+)", config, re.MULTILINE)
    return int(match.group(1)) if match else 10000


def parse_node_cpus(sinfo: str) -> int:
    """Sum the CPUs of `sinfo -h -N -o %N|%c` lines, each node once (a node in several
    partitions is listed once per partition)."""
    cpus: dict[str, int] = {}
    for line in sinfo.splitlines():
        node, _, count = line.strip().partition("|")
        if node and count.strip().isdigit():
            cpus[node] = int(count)
    return sum(cpus.values())


def parse_idle_slots(sinfo: str, cpus_per_task: int) -> int:
    """Tasks of `cpus_per_task` CPUs that fit the idle CPUs of `sinfo -h -N -o %N|%C`
    lines ("allocated/idle/other/total"), each node once."""
    idle: dict[str, int] = {}
    for line in sinfo.splitlines():
        node, _, counts = line.strip().partition("|")
        parts = counts.strip().split("/")
        if node and len(parts) == 4 and parts[1].isdigit():
            idle[node] = int(parts[1])
    return sum(cpus // max(1, cpus_per_task) for cpus in idle.values())


def parse_total_cpus(sinfo: str) -> int:
    """Sum the T of `sinfo -h -o %C` lines ("allocated/idle/other/total")."""
    total = 0
    for line in sinfo.split():
        parts = line.split("/")
        if len(parts) == 4 and parts[3].isdigit():
            total += int(parts[3])
    return total


class SlurmBackend(Backend):
    name = "slurm"

    def __init__(self, resources: dict) -> None:
        self.resources = resources
        self._config: str | None = None
        self._slots: int | None = None
        self._slots_by_resources: dict[tuple, int] = {}
        self._sacct_usable = True

    def submit_array(self, script: Path, size: int, log_dir: Path,
                     throttle: int | None = None) -> str:
        """Raise SubmissionDeferred when a limit refuses it for now (see sbatch.py)."""
        if "\\" in str(log_dir):  # sbatch then drops every backslash and %A/%a of --output
            raise SubmissionError(f"Slurm cannot write logs under {log_dir}: a backslash "
                                  "in the folder's path; choose a folder without one")
        try:
            job_id = sbatch.submit(["sbatch", "--parsable", str(script)], COMMAND_TIMEOUT)
        except SubmissionDeferred as error:
            limit = self.max_job_count() if error.kind == "job_count" else 0
            if limit and size >= limit:
                # job_allocate() counts every task: this array can never be accepted
                # (before 25.11; from 25.11 on, one of exactly MaxJobCount tasks could
                # be, on an otherwise empty controller).
                raise SubmissionError(
                    f"an array of {size} tasks can never fit under the cluster's "
                    f"MaxJobCount={limit} ({error})") from error
            log.info("sbatch: %s", error)
            raise
        log.info("submitted array job %s (%d tasks) from %s", job_id, size, script)
        return job_id

    def set_throttle(self, job_id: str, throttle: int) -> None:
        log.info("array job %s: at most %s tasks at once", job_id, throttle or "all")
        run_command(["scontrol", "update", f"JobId={job_id}",
                     f"ArrayTaskThrottle={throttle}"])

    def states(self, job_ids: Collection[str],
               timeout: float = COMMAND_TIMEOUT) -> dict[TaskKey, TaskState]:
        if not job_ids:
            return {}
        args = ["squeue", "-h", "-r", "-t", "all", "-O", SQUEUE_FORMAT]
        done = run_command(args + ["-j", ",".join(sorted(job_ids))], check=False,
                           timeout=timeout)
        if done.returncode != 0:
            if "Invalid job id" in done.stderr:  # a lone id that has left the queue
                return {}
            raise SubmissionError(f"squeue failed: {done.stderr.strip()}")
        states = parse_squeue(done.stdout)
        log.debug("squeue: %s", states)
        return states

    def final_states(self, keys: Collection[TaskKey]) -> dict[TaskKey, TaskState]:
        """Ask accounting (sacct) once; remember when the cluster has none."""
        if not keys or not self._sacct_usable:
            return {}
        ids = ",".join(sorted({f"{job}_{index}" for job, index in keys}))
        done = run_command(["sacct", "-n", "-P", "-X", "--format=JobID,State,ExitCode",
                            "-j", ids], check=False)
        if done.returncode != 0:
            log.info("sacct is not usable here (%s); relying on squeue and the worker's "
                     "records", done.stderr.strip() or done.returncode)
            self._sacct_usable = False
            return {}
        return parse_sacct(done.stdout)

    def cancel(self, refs: Collection[str], pending_only: bool = False) -> None:
        if refs:  # --state=PENDING: the controller skips tasks that started meanwhile
            state = ["--state=PENDING"] if pending_only else []
            log.info("scancel %s", " ".join([*state, *refs]))
            run_command(["scancel", *state, *refs], check=False)

    def _scontrol_config(self) -> str:
        if self._config is None:
            self._config = run_command(["scontrol", "show", "config"]).stdout
        return self._config

    def max_array_size(self) -> int:
        """MaxArraySize, and below MaxJobCount: the controller counts every task of an
        array against it, so a larger array could never be accepted."""
        config = self._scontrol_config()
        return max(1, min(parse_max_array_size(config), parse_max_job_count(config) - 1))

    def max_job_count(self) -> int:
        """The controller's MaxJobCount: jobs it holds at most, each array task one."""
        return parse_max_job_count(self._scontrol_config())

    def node_hosts(self) -> set[str]:
        """The hosts of the cluster's nodes (NodeHostname), as sinfo lists them."""
        done = run_command(["sinfo", "-h", "-N", "-o", "%n"], check=False)
        return set(done.stdout.split()) if done.returncode == 0 else set()

    def slots(self) -> int:
        if self._slots is None:
            self._slots = self.slots_for(self.resources)
        return self._slots

    def idle_slots(self, resources: dict) -> int | None:
        """Tasks of these resources that fit the idle CPUs now (one sinfo)."""
        args = ["sinfo", "-h", "-N", "-o", "%N|%C"]
        if resources.get("partition"):
            args += ["-p", str(resources["partition"])]
        done = run_command(args, check=False)
        if done.returncode != 0:
            return None
        slots = parse_idle_slots(done.stdout, int(resources.get("cpus_per_task") or 1))
        return min(slots, self.slots_for(resources))

    def slots_for(self, resources: dict) -> int:
        key = (resources.get("partition"), resources.get("cpus_per_task"),
               resources.get("array_parallelism"))
        if key not in self._slots_by_resources:
            args = ["sinfo", "-h", "-N", "-o", "%N|%c"]
            if resources.get("partition"):
                args += ["-p", str(resources["partition"])]
            cpus = parse_node_cpus(run_command(args, check=False).stdout) or 1
            slots = max(1, cpus // int(resources.get("cpus_per_task") or 1))
            if resources.get("array_parallelism"):
                slots = min(slots, int(resources["array_parallelism"]))
            self._slots_by_resources[key] = slots
        return self._slots_by_resources[key]

