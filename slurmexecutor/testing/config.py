"""The configuration of a test cluster: slurm.conf, written once by ``up``.

The settings follow shared/SLURM-NOTES.md: no cgroups, no accounting, a scheduler tuned
for fast turnaround of short test jobs, and each node's slurmd on a free port of its own.
Two partitions over the same nodes: ``debug`` (the default, no time limit) and ``capped``
(``MaxTime`` = :data:`CAPPED_MAX_TIME`; a longer ``--time`` is refused by sbatch).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from pathlib import Path

from slurmexecutor.testing.layout import UNIX_PATH_MAX, ClusterError, Layout

#: The time limit of the ``capped`` partition.
CAPPED_MAX_TIME = "00:01:00"


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free now (all held open while choosing)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def render_conf(
    layout: Layout,
    nodes: Sequence[str],
    cpus: int,
    max_array_size: int,
    ctld_port: int,
    node_ports: Sequence[int],
) -> str:
    host = socket.gethostname()
    memory = memory_mb()
    settings = {
        "ClusterName": "throwaway",
        "SlurmctldHost": f"{host}(127.0.0.1)",
        "SlurmctldPort": ctld_port,
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        "AuthInfo": f"socket={layout.munge_socket},cred_expire=10",
        "StateSaveLocation": layout.state,
        "SlurmdSpoolDir": layout.spool / "%n",
        "SlurmctldPidFile": layout.slurmctld_pid,
        "SlurmdPidFile": layout.run / "slurmd-%n.pid",
        "SlurmctldLogFile": layout.slurmctld_log,
        "SlurmdLogFile": layout.logs / "slurmd-%n.log",
        "SlurmctldDebug": "info",
        "SlurmdDebug": "info",
        # No cgroups in this sandbox.
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "JobContainerType": "job_container/none",
        "MpiDefault": "none",
        "MailProg": "/bin/true",
        # No slurmdbd: finished jobs are only recorded in the jobcomp text file.
        "AccountingStorageType": "accounting_storage/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "JobCompType": "jobcomp/filetxt",
        "JobCompLoc": layout.jobcomp,
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_CPU",
        "SlurmdParameters": "config_overrides",
        # Fast turnaround for short test jobs.
        "SchedulerType": "sched/backfill",
        "SchedulerParameters": (
            "sched_min_interval=0,batch_sched_delay=0,default_queue_depth=10000,"
            "bf_interval=1,max_rpc_cnt=0"
        ),
        "Epilog": "/bin/true",  # makes every job end trigger a scheduling pass
        "MinJobAge": 10,
        "KillWait": 2,
        "InactiveLimit": 0,
        "MaxArraySize": max_array_size,
        # Node loss: DOWN after ~SlurmdTimeout, back in service when slurmd returns.
        "SlurmdTimeout": 10,
        "ReturnToService": 2,
        "MessageTimeout": 10,
        # A --time over a partition's MaxTime is refused at submission, not left pending.
        "EnforcePartLimits": "ALL",
    }
    lines = [
        "# Throwaway test cluster written by slurmexecutor.testing; do not edit.",
        *(f"{key}={value}" for key, value in settings.items()),
    ]
    for node, port in zip(nodes, node_ports):
        lines.append(
            f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port}"
            f" CPUs={cpus} RealMemory={memory} State=UNKNOWN"
        )
    lines.append(
        f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP"
    )
    lines.append(
        f"PartitionName=capped Nodes={','.join(nodes)} MaxTime={CAPPED_MAX_TIME} State=UP"
    )
    return "\n".join(lines) + "\n"


def check_paths(layout: Layout, nodes: Sequence[str]) -> None:
    """Refuse folders whose paths slurm.conf or Unix sockets cannot hold."""
    if any(ch.isspace() or ch in "#=," for ch in str(layout.root)):
        raise ClusterError(f"DIR must not contain whitespace, '#', '=' or ',': {layout.root}")
    longest_node = max(nodes, key=len)
    # slurmstepd's socket: SlurmdSpoolDir/<node>_<jobid>.<stepid>, ids up to 10 digits.
    step_socket = layout.spool / longest_node / f"{longest_node}_{'9' * 10}.{'9' * 10}"
    for path in (layout.munge_socket, step_socket):
        if len(str(path).encode()) > UNIX_PATH_MAX:
            raise ClusterError(
                f"DIR path is too long for a Unix socket ({path}); use a shorter DIR"
            )


def setting_key(line: str) -> str | None:
    """The key of a top-level ``Key=Value`` line, lower-cased (Slurm ignores case)."""
    key, sep, _ = line.strip().partition("=")
    if not sep or not key or key.startswith("#") or " " in key:
        return None
    return key.lower()


def with_settings(text: str, settings: Iterable[str]) -> str:
    """slurm.conf ``text`` with each ``Key=Value`` of ``settings`` in place of the line
    setting that key, or appended when there is none (Node and Partition lines, whose
    keys repeat, are only ever appended)."""
    extra = [line.strip() for line in settings if line.strip()]
    for line in extra:
        if setting_key(line) is None:
            raise ClusterError(f"not a Key=Value setting: {line!r}")
    replace = {setting_key(line): line for line in extra
               if setting_key(line) not in ("nodename", "partitionname")}
    lines = []
    for line in text.splitlines():
        key = setting_key(line)
        if key in replace:
            line = replace.pop(key)
        lines.append(line)
    appended = [line for line in extra if line in replace.values()
                or setting_key(line) in ("nodename", "partitionname")]
    if appended:
        lines.append("# Extra settings (restart_controller); restore_controller drops them.")
        lines.extend(appended)
    return "\n".join(lines) + "\n"
