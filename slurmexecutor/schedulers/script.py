"""Resource options and the batch script every backend runs.

Resources are given as Python keywords and passed to sbatch under their long option
names (`cpus_per_task=4` -> `#SBATCH --cpus-per-task=4`). The local backend runs the same
script with bash (the `#SBATCH` lines are comments there) and honours `time`.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from slurmexecutor._log import log
from slurmexecutor.folder.diskio import EXIT_NO_PYTHON, EXIT_SETUP
from slurmexecutor.folder.folders import (
    UnsafeFolderError,
    ensure_private_dir,
    writable_by_others,
)

#: keyword -> what it takes. Booleans become flags; `array_parallelism` becomes `%N`.
SBATCH_OPTIONS: dict[str, str] = {
    "partition": "partition name",
    "time": "time limit: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS",
    "mem": "memory per node, e.g. 4G",
    "mem_per_cpu": "memory per CPU, e.g. 2G",
    "mem_per_gpu": "memory per GPU",
    "cpus_per_task": "CPUs per array task",
    "gpus": "GPUs per task, e.g. 1 or a100:1",
    "gpus_per_task": "GPUs per task",
    "gres": "generic resources, e.g. gpu:1",
    "account": "account to charge",
    "qos": "quality of service",
    "constraint": "node features required",
    "nodelist": "nodes to run on",
    "exclude": "nodes to avoid",
    "reservation": "reservation name",
    "job_name": "job name (default: slurmexecutor-<function>)",
    "comment": "job comment",
    "licenses": "licenses",
    "tmp": "minimum temporary disk",
    "begin": "start not before this time",
    "deadline": "remove the job if it cannot end before this time",
    "mail_type": "mail events",
    "mail_user": "mail address",
    "nice": "scheduling priority adjustment",
    "wckey": "workload characterisation key",
    "hint": "task binding hint",
    "requeue": "True: --requeue, False: --no-requeue",
    "exclusive": "True: --exclusive",
    "array_parallelism": "at most this many tasks of one array at once (%N)",
}
#: Options the executor sets itself and users may not override.
RESERVED = {"array", "output", "error", "signal", "parsable", "wrap"}


def validate_resources(resources: dict) -> dict:
    """Return a copy of `resources`, or raise ValueError naming the unknown or bad keys."""
    unknown = sorted(set(resources) - set(SBATCH_OPTIONS))
    if unknown:
        hint = ""
        if any(name.replace("-", "_") in RESERVED for name in unknown):
            hint = " (the executor sets --array, --output, --error and --signal itself)"
        raise ValueError(
            f"unknown resource option(s) {', '.join(map(repr, unknown))}{hint}; valid "
            f"options: {', '.join(sorted(SBATCH_OPTIONS))}; pass anything else with "
            "sbatch_extra=['--option=value']"
        )
    checked = dict(resources)
    if "time" in checked:
        time_limit_seconds(checked["time"])  # raises on a malformed limit
    parallel = checked.get("array_parallelism")
    if parallel is not None and (not isinstance(parallel, int) or parallel < 1):
        raise ValueError(f"array_parallelism must be a positive int, not {parallel!r}")
    for name, value in checked.items():
        text = str(value)
        if "\n" in text or "\r" in text or not text.strip():
            raise ValueError(f"resource {name}={value!r} must be a non-empty single line")
    return checked


#: sbatch_extra options that would break the executor's contract with sbatch: those it
#: sets itself, and those after which sbatch waits, tests only, or prints another answer
NOT_EXTRA = {*RESERVED, "wait", "test-only"}
NOT_EXTRA_SHORT = {"a": "array", "o": "output", "e": "error", "W": "wait"}


def validate_extra(options: list[str]) -> list[str]:
    """Raw sbatch options: each one line, starting with '-', none the executor sets or
    one that would change what sbatch answers (a ValueError names it)."""
    for option in options:
        text = str(option)
        if "\n" in text or "\r" in text or not text.startswith("-"):
            raise ValueError(f"sbatch_extra item {option!r} must be one '--option[=value]' "
                             "on a single line")
        name = text[2:].split("=", 1)[0] if text.startswith("--") else NOT_EXTRA_SHORT.get(
            text[1:2], "")
        if name in NOT_EXTRA:
            raise ValueError(f"sbatch_extra item {option!r}: the executor sets --{name} "
                             "itself or needs sbatch without it; leave it out")
    return [str(option) for option in options]


def directive(flag: str, value: object) -> str:
    """`--flag="value"`, always double-quoted with `\\` and `"` escaped: sbatch reads
    `#SBATCH` lines with its own quoting (`'` opens a quote, `#` starts a comment, `\\`
    escapes), and a double-quoted value keeps every character but those two."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ValueError(f"{flag}={text!r}: a newline cannot be passed")
    return f'{flag}="{quote(text)}"'


def quote(text: str) -> str:
    """`text` for inside a double-quoted `#SBATCH` value."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def python_path_dir(run_dir: Path) -> Path:
    """The workers' PYTHONPATH: a folder of the run (private, like it) holding only a
    link to this package, so the client's whole site-packages does not shadow the worker
    interpreter's own."""
    return run_dir / "pythonpath"


def link_package(run_dir: Path) -> Path:
    """Create `python_path_dir(run_dir)` with its `slurmexecutor` link to this package
    (replacing a link that points elsewhere), verify it, and return the folder."""
    target = ensure_private_dir(python_path_dir(run_dir))
    link = target / "slurmexecutor"
    package = str(Path(__file__).resolve().parents[1])  # this package
    try:
        current: str | None = os.readlink(link)
    except (FileNotFoundError, OSError):
        current = None
    if current != package:
        fresh = target / f".slurmexecutor.{os.getpid()}.{os.urandom(4).hex()}"
        os.symlink(package, fresh, target_is_directory=True)
        try:
            os.replace(fresh, link)
        except OSError:
            fresh.unlink()
            raise
    info, names = os.lstat(link), sorted(os.listdir(target))
    if (os.readlink(link) != package or info.st_uid != os.getuid()
            or names != ["slurmexecutor"]):
        raise UnsafeFolderError(f"{target} must hold only a link `slurmexecutor` -> "
                                f"{package} (it holds {names}); remove it and try again")
    return target


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


_DIRECTIVE = re.compile(r'^#SBATCH --([\w-]+)(?:=(?:"((?:[^"\\]|\\.)*)"|(\S+)))?\s*$',
                        re.MULTILINE)


def parse_directives(script: str) -> dict[str, str]:
    """A batch script's `#SBATCH --option[=value]` lines -> {option: value or ""}."""
    return {match.group(1): re.sub(r"\\(.)", r"\1", match.group(2)) if (
        match.group(2) is not None) else (match.group(3) or "")
        for match in _DIRECTIVE.finditer(script)}


def time_limit_seconds(limit: str | int) -> int:
    """Parse a Slurm time limit (an int means minutes, as in sbatch)."""
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return limit * 60
    match = _TIME.match(str(limit).strip())
    if not match or isinstance(limit, bool):
        raise ValueError(
            f"time={limit!r} is not a Slurm time limit (minutes, MM:SS, HH:MM:SS, "
            "D-HH, D-HH:MM or D-HH:MM:SS)"
        )
    days, first, second, third = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(first) * 3600
        return seconds + int(second or 0) * 60 + int(third or 0)
    if third is not None:  # HH:MM:SS
        return int(first) * 3600 + int(second) * 60 + int(third)
    if second is not None:  # MM:SS
        return int(first) * 60 + int(second)
    return int(first) * 60  # minutes


def warning_seconds(limit_seconds: int) -> int:
    """How long before the limit the worker is warned (SIGUSR1) to wrap up."""
    return max(2, min(60, limit_seconds // 10))


def inherited_pythonpath() -> list[str]:
    """The client's PYTHONPATH as the workers start with it (set before the setup lines,
    in place of the one sbatch passes on): its absolute entries that exist and that
    nobody but their owner can change. A module's tree of another account stays (the
    cluster's software); an empty or relative entry (the job's working directory) and
    a folder open to group or others do not. Entries left out are logged once."""
    value = os.environ.get("PYTHONPATH", "")
    kept, left_out = [], []
    for entry in value.split(os.pathsep) if value else []:
        why = writable_by_others(entry, any_owner=True) if os.path.isabs(entry) else (
            "the job's working directory")
        if why is None:
            kept.append(entry)
        else:
            left_out.append(f"{entry or 'an empty entry'} ({why})")
    if left_out and tuple(left_out) not in _LEFT_OUT:
        _LEFT_OUT.add(tuple(left_out))
        log.warning("PYTHONPATH entries not passed on to the workers (another user "
                    "could put modules there, or they mean the job's working directory): "
                    "%s", "; ".join(left_out))
    return list(dict.fromkeys(kept))


_LEFT_OUT: set[tuple[str, ...]] = set()


@dataclass
class ScriptSpec:
    """Everything a batch script needs besides the resources."""

    run_dir: Path
    batch: int
    size: int
    offset: int = 0
    job_name: str = "slurmexecutor"
    python: str = sys.executable
    throttle: int | None = None  # tasks of the array at once (%N); None: array_parallelism
    setup: list[str] = field(default_factory=list)
    sbatch_extra: list[str] = field(default_factory=list)
    #: what the workers' PYTHONPATH starts as, in place of the one they inherit
    pythonpath: list[str] = field(default_factory=inherited_pythonpath)


def sbatch_directives(resources: dict, spec: ScriptSpec) -> list[str]:
    """The `--option=value` list for sbatch, in a stable order."""
    options = [directive("--job-name", resources.get("job_name", spec.job_name))]
    array = f"--array=0-{spec.size - 1}"
    throttle = resources.get("array_parallelism") if spec.throttle is None else spec.throttle
    if throttle:
        array += f"%{throttle}"
    options.append(array)
    logs = str(spec.run_dir / "logs").replace("%", "%%")  # % starts a Slurm pattern
    options.append(directive("--output", f"{logs}/%A_%a.log"))
    if "time" in resources:
        warn = warning_seconds(time_limit_seconds(resources["time"]))
        options.append(f"--signal=B:USR1@{warn}")
    for name in SBATCH_OPTIONS:
        if name in ("job_name", "array_parallelism") or name not in resources:
            continue
        value, flag = resources[name], name.replace("_", "-")
        if isinstance(value, bool):
            if name == "requeue":
                options.append("--requeue" if value else "--no-requeue")
            elif value:
                options.append(f"--{flag}")
        elif value is not None:
            options.append(directive(f"--{flag}", value))
    options.extend(spec.sbatch_extra)
    return options


#: how the batch script starts the worker: `python -c` with the working directory
#: taken off sys.path (it stays the calls' working directory)
WORKER_ENTRY = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
                "from slurmexecutor.worker.supervisor import main; sys.exit(main(sys.argv[1:]))")


def render_script(resources: dict, spec: ScriptSpec) -> str:
    """The batch script: directives, setup lines, then exec into the worker."""
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {option}" for option in sbatch_directives(resources, spec)]
    lines.append('export SLURMEXECUTOR_LAUNCHED="$EPOCHREALTIME"')  # start-up, measured
    # not the environment's PYTHONPATH: an entry another user can change, or an empty
    # one (the job's working directory), would come before site-packages on the workers
    lines.append(f"export PYTHONPATH={shlex.quote(os.pathsep.join(spec.pythonpath))}"
                 if spec.pythonpath else "unset PYTHONPATH")
    if spec.setup:  # a failing setup line ends the task at once, naming the line
        lines.append("trap 'echo \"slurmexecutor: a setup line failed (exit $?): "
                     f"$BASH_COMMAND\" >&2; exit {EXIT_SETUP}' ERR")
        lines += list(spec.setup)
        lines.append("trap - ERR")
    python = shlex.quote(spec.python)
    lines.append(f"command -v {python} >/dev/null 2>&1 || {{ echo slurmexecutor: cannot run the "
                 f'interpreter {python} on "$(hostname)": not found or not executable >&2; '
                 f"exit {EXIT_NO_PYTHON}; }}")
    lines.append(f"export PYTHONPATH={shlex.quote(str(python_path_dir(spec.run_dir)))}"
                 '${PYTHONPATH:+:$PYTHONPATH}')
    task = f'$(( {spec.offset} + ${{SLURMEXECUTOR_TASK:-$SLURM_ARRAY_TASK_ID}} ))'
    # not `-m`: that puts the job's working directory first on sys.path, so a folder
    # named slurmexecutor there (a checkout) would shadow the package shipped above
    lines.append(
        f"exec {shlex.quote(spec.python)} -c {shlex.quote(WORKER_ENTRY)} "
        f'{shlex.quote(str(spec.run_dir))} {spec.batch} "{task}"'
    )
    return "\n".join(lines) + "\n"
