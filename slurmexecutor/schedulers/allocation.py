"""The allocation backend: array tasks as job steps (`srun`) of the current allocation.

From inside `salloc` or a batch job (SLURM_JOB_ID set), each array task is started as

    srun --ntasks=1 --nodes=1 --cpus-per-task=C --exact [--mem-per-cpu=M] ... bash -c WRAP

a step of that allocation on one of its nodes with its own C CPUs; no job is submitted.
The launcher is the local backend's (a queue, per-array throttles, at most `slots()`
steps at once, so that steps never wait for each other's CPUs); a task's state comes
from its `srun` process and srun's own lines in the task's log: a step lost with its node
is NODE_FAIL (srun then exits 0), one Slurm cancelled for its time limit TIMEOUT, a
signal shows as exit 128+N. Cancel asks Slurm to TERM the step (the worker writes its end
record), then SIGTERMs srun (which kills the step), then SIGKILLs it.

There is no warning signal before `time`: srun would send it to every process of the
step, the calls' own subprocesses too. The step is ended at its limit (TIMEOUT).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from slurmexecutor._log import log
from slurmexecutor.schedulers.base import Backend, TaskKey, TaskState
from slurmexecutor.schedulers.local import KILL_WAIT, LocalBackend, _Task
from slurmexecutor.schedulers.script import parse_directives

#: resources that describe the allocation, not a step: not used inside one
JOB_ONLY = ("partition", "account", "qos", "reservation", "begin", "deadline", "mail_type",
            "mail_user", "nice", "wckey", "licenses", "requeue", "exclusive", "comment",
            "constraint", "tmp")
#: the batch script's #SBATCH options that srun is given for the step
STEP_OPTIONS = ("time", "mem", "mem-per-cpu", "mem-per-gpu", "gpus", "gpus-per-task", "gres",
                "nodelist", "exclude", "hint")
#: srun reads these from its environment as options; the step gets explicit ones instead
STEP_SHAPING_ENV = ("SLURM_MEM_PER_CPU", "SLURM_MEM_PER_NODE", "SLURM_MEM_PER_GPU",
                    "SLURM_NTASKS_PER_NODE", "SLURM_NTASKS_PER_SOCKET", "SLURM_NTASKS_PER_CORE",
                    "SLURM_NTASKS_PER_GPU", "SLURM_TRES_PER_TASK", "SLURM_OVERLAP",
                    "SLURM_CPUS_PER_TASK", "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_NNODES")
#: what the step runs: a line naming the step (its log's first), then the batch script as
#: array task $2 of pseudo array $1, with the array variables the worker reads; the
#: script's text is $4, as verified at submission (the file $3 is only its name: a file
#: changed since is not what runs)
STEP_WRAPPER = ('echo "slurmexecutor: step $SLURM_JOB_ID.$SLURM_STEP_ID on $SLURMD_NODENAME";'
                ' unset SLURM_RESTART_COUNT;'
                ' export SLURM_ARRAY_JOB_ID="$1" SLURM_ARRAY_TASK_ID="$2"'
                ' SLURMEXECUTOR_JOB="$1" SLURMEXECUTOR_TASK="$2"; exec bash -c "$4" "$3"')
_STEP_LINE = re.compile(r"^slurmexecutor: step (\d+\.\d+) on (\S*)$", re.MULTILINE)
_numbers = itertools.count(1)
NO_ALLOCATION = ("backend='allocation' needs to run inside a Slurm allocation (salloc, "
                 "sbatch): SLURM_JOB_ID is not set")


def parse_cpus_per_node(text: str) -> list[int]:
    """SLURM_JOB_CPUS_PER_NODE ("4(x2),2") -> CPUs of each node ([4, 4, 2])."""
    cpus: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ValueError(f"cannot read the allocation's CPUs per node from {text!r}")
        cpus += [int(match.group(1))] * int(match.group(2) or 1)
    return cpus


def parse_memory_mb(text: str) -> int | None:
    """A Slurm memory size ("4000", "4000M", "8G", "1T") in MB; None for 0 or nothing."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text or "", re.IGNORECASE)
    if not match:
        return None
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[match.group(2).upper()]
    megabytes = int(float(match.group(1)) * scale)
    return megabytes or None


@dataclass(frozen=True)
class Allocation:
    """What the steps may use: the allocation's nodes' CPUs and its memory."""

    job_id: str
    cpus: tuple[int, ...]  # CPUs of each node
    mem_per_cpu: int | None = None  # MB each step may take per CPU; None: not limited
    node: str | None = None  # the node this client runs on (a batch job), else None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Allocation:
        job_id = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
        if not job_id:
            raise ValueError(NO_ALLOCATION)
        text = environ.get("SLURM_JOB_CPUS_PER_NODE")
        if text:
            cpus = parse_cpus_per_node(text)
        else:  # older salloc: the node count and this node's CPUs
            nodes = int(environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES") or 1)
            cpus = [int(environ.get("SLURM_CPUS_ON_NODE") or 1)] * nodes
        per_cpu = parse_memory_mb(environ.get("SLURM_MEM_PER_CPU", ""))
        per_node = parse_memory_mb(environ.get("SLURM_MEM_PER_NODE", ""))
        if per_cpu is None and per_node is not None:  # the share of the fullest node
            per_cpu = max(1, per_node // max(cpus))
        return cls(job_id, tuple(cpus), per_cpu, environ.get("SLURMD_NODENAME") or None)

    def slots(self, cpus_per_task: int) -> int:
        """How many steps of `cpus_per_task` CPUs fit at once; ValueError if none does."""
        fit = sum(cpus // cpus_per_task for cpus in self.cpus)
        if fit == 0:
            raise ValueError(
                f"cpus_per_task={cpus_per_task} does not fit allocation {self.job_id}: its "
                f"node(s) have {', '.join(map(str, self.cpus))} CPU(s)")
        return fit


def srun_options(directives: Mapping[str, str], allocation: Allocation,
                 name: str) -> list[str]:
    """srun's options for one step of a batch whose script has these `directives`
    (its own resources: the executor's, or `SlurmExecutor.options`)."""
    cpus = directives.get("cpus-per-task") or "1"
    options = ["--ntasks=1", "--nodes=1", f"--cpus-per-task={cpus}", "--exact",
               "--input=none", f"--job-name={name}"]
    if not {"mem", "mem-per-cpu", "mem-per-gpu"} & set(directives) and allocation.mem_per_cpu:
        options.append(f"--mem-per-cpu={allocation.mem_per_cpu}M")  # not all of the job's
    for option in STEP_OPTIONS:  # (time: Slurm's own limit, a later backstop to ours)
        if directives.get(option):
            options.append(f"--{option}={directives[option]}")
    return options


def step_name(job_name: str, job_id: str, index: int) -> str:
    """The step's name: the job name and the task (`squeue -s` shows it; the CLI finds a
    run's steps by it)."""
    return f"{job_name}@{job_id}_{index}"


def _srun_lines(text: str) -> str:
    return "\n".join(line for line in text.splitlines()
                     if line.startswith(("srun:", "slurmstepd")))


def step_state(code: int, log_text: str, ending: str | None) -> TaskState:
    """How a step ended, from srun's exit status (negative: srun itself was killed by
    that signal) and srun's and slurmstepd's lines in its log."""
    lines = _srun_lines(log_text)
    exit_code, sig = (None, -code) if code < 0 else (code, None)
    if code > 128 and not re.search(r"task \d+: Exited with exit code", lines):
        exit_code, sig = None, code - 128  # srun: a task killed by signal N exits 128+N
    if ending:
        return TaskState(ending, exit_code, sig)
    for pattern, state in (("Node failure on|DUE TO NODE FAIL", "NODE_FAIL"),
                           ("DUE TO TIME LIMIT", "TIMEOUT"),
                           ("DUE TO PREEMPTION", "PREEMPTED"),
                           ("oom-kill event|OUT_OF_MEMORY|Out Of Memory", "OUT_OF_MEMORY"),
                           (r"\*\*\* STEP \S+ .*CANCELLED", "CANCELLED")):
        if re.search(pattern, lines):
            return TaskState(state, exit_code, sig)
    if code == 0:
        return TaskState("COMPLETED", 0)
    return TaskState("FAILED", exit_code, sig)


class AllocationBackend(LocalBackend):
    """Array tasks as `srun` steps of the allocation this client runs in."""

    name = "allocation"

    def __init__(self, resources: dict, environ: Mapping[str, str] | None = None) -> None:
        self.allocation = Allocation.from_environment(os.environ if environ is None
                                                      else environ)
        if not shutil.which("srun"):
            raise ValueError("backend='allocation' needs srun, which is not on PATH")
        ignored = sorted(name for name in JOB_ONLY if name in resources)
        if ignored:
            log.warning("backend='allocation' ignores %s: the allocation's own apply",
                        ", ".join(ignored))
        self.resources = resources
        # the tasks' files are local only when every step runs on this very node
        self.same_host = len(self.allocation.cpus) == 1 and self.allocation.node is not None
        self._steps: dict[TaskKey, tuple[str, str]] = {}  # key -> (step id, node)
        self._helpers: list[subprocess.Popen] = []  # scancel commands under way
        super().__init__(resources)
        log.info("backend 'allocation': steps of job %s (%d node(s), CPUs %s), at most %d "
                 "at once", self.allocation.job_id, len(self.allocation.cpus),
                 ",".join(map(str, self.allocation.cpus)), self._slots)

    # -- the local backend's hooks ------------------------------------------------------

    def _count_slots(self, resources: dict) -> int:
        return self.allocation.slots(int(resources.get("cpus_per_task") or 1))

    def slots_for(self, resources: dict) -> int:
        slots = self._count_slots(resources)
        if resources.get("array_parallelism"):
            slots = min(slots, int(resources["array_parallelism"]))
        return slots

    def _new_job_id(self) -> str:
        return f"{self.allocation.job_id}-{os.getpid()}-{next(_numbers)}"

    def _command(self, task: _Task) -> tuple[list[str], dict[str, str]]:
        job_id, index = task.key
        directives = parse_directives(task.text)
        name = step_name(directives.get("job-name") or "slurmexecutor", job_id, index)
        env = {key: value for key, value in os.environ.items()
               if key not in STEP_SHAPING_ENV}
        return (["srun", *srun_options(directives, self.allocation, name), "bash", "-c",
                 STEP_WRAPPER, "slurmexecutor-step", job_id, str(index), str(task.script),
                 task.text],
                env)

    def _final(self, task: _Task, code: int) -> TaskState:
        self._steps.pop(task.key, None)
        return step_state(code, _tail(task.log_file), task.ending)

    def _warn(self, task: _Task) -> None:
        """No warning: srun would signal every process of the step (see above)."""

    def _stop(self, task: _Task) -> None:
        step = self._step(task)
        if step is None:  # not started yet (or no step line): srun ends its attempt
            self._signal_srun(task, signal.SIGTERM)
            return
        try:  # the worker gets SIGTERM and writes its end record
            self._helpers.append(subprocess.Popen(
                ["scancel", "--signal=TERM", step[0]], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        except OSError:
            self._signal_srun(task, signal.SIGTERM)

    def _kill(self, task: _Task) -> None:
        if task.kills == 1:  # srun kills the step (SIGKILL) and exits
            task.kill_at += KILL_WAIT
            self._signal_srun(task, signal.SIGTERM)
        else:
            self._signal_srun(task, signal.SIGKILL)

    def _reap(self) -> None:
        self._helpers = [helper for helper in self._helpers if helper.poll() is None]
        super()._reap()

    # -- steps -------------------------------------------------------------------------

    def states(self, job_ids: Collection[str]) -> dict[TaskKey, TaskState]:
        """Running tasks whose step has not been created yet (srun waits for CPUs)
        are PENDING."""
        states = super().states(job_ids)
        with self._lock:
            for key, state in states.items():
                task = self._running.get(key)
                if state.state == "RUNNING" and task and self._step(task) is None:
                    states[key] = TaskState("PENDING", reason="srun: step not created yet")
        return states

    def steps(self) -> dict[TaskKey, tuple[str, str]]:
        """The running tasks' steps: key -> (step id, node)."""
        with self._lock:
            for task in self._running.values():
                self._step(task)
            return dict(self._steps)

    def _step(self, task: _Task) -> tuple[str, str] | None:
        """The task's step (id, node), read once from the first line the step prints."""
        if task.key not in self._steps:
            try:
                with open(task.log_file, "rb") as file:
                    head = file.read(16384).decode(errors="replace")
            except OSError:
                return None
            match = _STEP_LINE.search(head)
            if match is None:
                return None
            self._steps[task.key] = (match.group(1), match.group(2))
        return self._steps[task.key]

    @staticmethod
    def _signal_srun(task: _Task, signum: int) -> None:
        if task.process is not None:
            try:
                task.process.send_signal(signum)
            except ProcessLookupError:
                pass


def _tail(path: Path, size: int = 8192) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - size))
            return file.read().decode(errors="replace")
    except OSError:
        return ""


# -- for the command line: a run's steps, seen from outside its client ------------------


def run_steps(job_ids: Collection[str], timeout: float = 15.0) -> dict[TaskKey, str]:
    """The steps (`squeue -s`) of these pseudo array jobs ("ALLOC-PID-N"): task -> step
    id. Raises SubmissionError when Slurm cannot be asked."""
    from slurmexecutor.schedulers.slurm import run_command

    allocations = sorted({job.split("-", 1)[0] for job in job_ids})
    if not allocations:
        return {}
    done = run_command(["squeue", "-h", "-s", "-j", ",".join(allocations), "-o", "%i|%j"],
                       timeout=timeout)
    found: dict[TaskKey, str] = {}
    for line in done.stdout.splitlines():
        step, _, name = line.strip().partition("|")
        task = name.rpartition("@")[2]
        job, _, index = task.rpartition("_")
        if job in job_ids and index.isdigit():
            found[(job, int(index))] = step
    return found


def run_states(tasks: Collection, client_alive: bool,
               timeout: float = 15.0) -> dict[TaskKey, TaskState]:
    """What the CLI tells of an allocation run's tasks (objects with job_id, array_index,
    started): RUNNING while its step runs, PENDING while not started and the client
    lives (its launcher starts it), else nothing (ended, or lost)."""
    states = RunSteps(timeout).states({task.job_id for task in tasks if task.job_id})
    for task in tasks:
        key = (task.job_id, task.array_index)
        if key not in states and client_alive and not task.started and task.job_id:
            states[key] = TaskState("PENDING")
    return states


class RunSteps(Backend):
    """An allocation run's steps seen from outside its client (the `slurmexecutor`
    command): their states, and cancelling them. It submits nothing."""

    name = "allocation"

    def __init__(self, timeout: float = 15.0) -> None:
        self.timeout = timeout

    def submit_array(self, script: Path, size: int, log_dir: Path,
                     throttle: int | None = None) -> str:
        raise NotImplementedError("only the run's client starts its steps")

    def set_throttle(self, job_id: str, throttle: int) -> None:
        raise NotImplementedError("only the run's client starts its steps")

    def states(self, job_ids: Collection[str]) -> dict[TaskKey, TaskState]:
        return {key: TaskState("RUNNING", reason=f"step {step}")
                for key, step in run_steps(job_ids, self.timeout).items()}

    def cancel(self, refs: Collection[str], pending_only: bool = False) -> None:
        """scancel the running steps of these pseudo arrays (not single tasks)."""
        if pending_only:  # steps are running by definition
            return
        from slurmexecutor.schedulers.slurm import run_command

        steps = sorted(set(run_steps(refs, self.timeout).values()))
        if steps:
            log.info("scancel %s", " ".join(steps))
            run_command(["scancel", *steps], check=False, timeout=self.timeout)

    def max_array_size(self) -> int:
        return 1_000_000

    def slots(self) -> int:
        return 1
