"""Waiting for a test cluster: until its nodes are idle, or its controller answers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

from slurmexecutor.testing.daemons import running_daemons
from slurmexecutor.testing.layout import MUNGED, SLURMCTLD, SLURMD, ClusterError, Layout, tail


def slurm_env(layout: Layout) -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": str(layout.conf)}


def node_states(layout: Layout) -> dict[str, str]:
    result = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N %T"],
        env=slurm_env(layout),
        check=False,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    states = {}
    if result.returncode == 0:
        for line in result.stdout.splitlines():
            name, _, state = line.partition(" ")
            states[name] = state.strip()
    return states


def wait_idle(layout: Layout, nodes: Sequence[str], deadline: float) -> None:
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = node_states(layout)
        if all(states.get(node) == "idle" for node in nodes):
            return
        dead = [name for name in ("slurmctld", "munged") if name not in running_daemons(layout)]
        if dead:
            raise ClusterError(f"{', '.join(dead)} exited while waiting for nodes")
        time.sleep(0.2)
    shown = ", ".join(f"{node}={states.get(node, '?')}" for node in nodes)
    raise ClusterError(f"timed out waiting for all nodes to be idle ({shown})")


def wait_answering(layout: Layout, deadline: float) -> None:
    """Wait until ``scontrol ping`` reaches this cluster's slurmctld."""
    while time.monotonic() < deadline:
        done = subprocess.run(["scontrol", "ping"], env=slurm_env(layout), check=False,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        if done.returncode == 0:
            return
        if "slurmctld" not in running_daemons(layout):
            raise ClusterError("slurmctld exited while waiting for it to answer")
        time.sleep(0.05)
    raise ClusterError("timed out waiting for slurmctld to answer")


def wait_responding(layout: Layout, nodes: Sequence[str], deadline: float) -> None:
    """Wait until slurmctld answers and reports every node as responding (after a
    restart nodes may be busy with jobs: idle is not required, only no ``*`` suffix
    (not responding) and no ``unknown`` state)."""
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = node_states(layout)
        if all(node in states and not states[node].endswith("*")
               and not states[node].startswith("unk") for node in nodes):
            return
        if "slurmctld" not in running_daemons(layout):
            raise ClusterError("slurmctld exited while waiting for it to answer")
        time.sleep(0.1)
    shown = ", ".join(f"{node}={states.get(node, '?')}" for node in nodes)
    raise ClusterError(f"timed out waiting for slurmctld and its nodes ({shown})")


def print_log_tails(layout: Layout) -> None:
    paths = [layout.munge_log, layout.slurmctld_log]
    paths += sorted(layout.logs.glob("slurmd-*.log")) + sorted(layout.logs.glob("*.out"))
    for path in paths:
        if path.exists():
            print(f"----- tail of {path} -----\n{tail(path)}", file=sys.stderr)


def slurm_installed() -> bool:
    """True if the Slurm and munge programs a test cluster needs are installed."""
    return all(os.access(path, os.X_OK) for path in (SLURMCTLD, SLURMD, MUNGED)) and all(
        shutil.which(name) for name in ("sbatch", "sinfo", "munge", "unmunge"))
