"""Starting, stopping and changing a throwaway Slurm cluster kept under one folder.

:func:`up` writes ``DIR/slurm.conf``, starts a private munged (own key and socket),
slurmctld and one slurmd per node (``n1`` .. ``nN``, all on this host, each on its own
free TCP port) and waits until every node is idle. :func:`down` stops exactly the
daemons whose pid files are in DIR, plus any job processes left over from this cluster.
Nothing is written outside DIR (but for the shared folder of ``shared=``) and the system
munged is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from slurmexecutor.testing.config import check_paths, free_ports, render_conf, with_settings
from slurmexecutor.testing.daemons import (
    daemon_pid,
    job_process_roots,
    running_daemons,
    start_munged,
    start_slurmctld,
    start_slurmd,
    stop_slurmctld,
)
from slurmexecutor.testing.layout import SLURMD, ClusterError, Layout, Shared, log
from slurmexecutor.testing.processes import kill_trees, terminate
from slurmexecutor.testing.sharedfs import check_shared, start_lagfs, stop_lagfs
from slurmexecutor.testing.waiting import (
    print_log_tails,
    slurm_env,
    wait_answering,
    wait_idle,
    wait_responding,
)


class Cluster:
    """The test cluster in ``directory``; ``str()`` and ``os.fspath()`` give the folder."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.layout = Layout(Path(directory))

    @property
    def directory(self) -> Path:
        return self.layout.root

    @property
    def conf(self) -> Path:
        """Its slurm.conf: what ``SLURM_CONF`` must name for Slurm's commands."""
        return self.layout.conf

    @property
    def nodes(self) -> list[str]:
        return self.layout.nodes()

    def env(self) -> dict[str, str]:
        """``os.environ`` with ``SLURM_CONF`` naming this cluster (for subprocesses)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def running(self) -> bool:
        """True if its slurmctld is running."""
        return "slurmctld" in running_daemons(self.layout)

    def kill_node(self, node: str) -> None:
        kill_node(self.directory, node)

    def start_node(self, node: str) -> None:
        start_node(self.directory, node)

    def restart_controller(self, settings: Iterable[str] = (), timeout: float = 60.0) -> None:
        restart_controller(self.directory, settings, timeout)

    def restore_controller(self, timeout: float = 60.0) -> None:
        restore_controller(self.directory, timeout)

    @contextmanager
    def controller_settings(self, *settings: str, timeout: float = 60.0) -> Iterator[None]:
        """Run the controller with ``settings`` (e.g. ``"MaxJobCount=5"``) while inside."""
        self.restart_controller(settings, timeout)
        try:
            yield
        finally:
            self.restore_controller(timeout)

    def down(self) -> None:
        down(self.directory)

    def __fspath__(self) -> str:
        return str(self.directory)

    def __str__(self) -> str:
        return str(self.directory)

    def __repr__(self) -> str:
        return f"Cluster({str(self.directory)!r})"


def up(
    directory: str | os.PathLike[str],
    nodes: int = 1,
    cpus: int = 16,
    max_array_size: int = 1001,
    timeout: float = 60.0,
    shared: Shared | None = None,
) -> Cluster:
    """Start a cluster of ``nodes`` nodes declaring ``cpus`` CPUs each in ``directory``
    and wait until its nodes are idle; on failure stop what was started and raise
    :class:`ClusterError` (the daemons' log tails go to stderr)."""
    layout = Layout(Path(directory))
    started = time.monotonic()
    running = running_daemons(layout)
    if running:
        shown = ", ".join(f"{name} (pid {pid})" for name, pid in running.items())
        raise ClusterError(
            f"a cluster is already running in {layout.root}: {shown}; "
            f"run `python -m slurmexecutor.testing down {layout.root}` first"
        )
    if nodes < 1 or cpus < 1 or max_array_size < 1:
        raise ClusterError("--nodes, --cpus and --max-array-size must be at least 1")
    names = [f"n{k}" for k in range(1, nodes + 1)]
    check_paths(layout, names)

    # Leftovers of an earlier cluster that was not shut down cleanly.
    kill_trees(job_process_roots(layout))
    stop_lagfs(layout)
    if shared is not None:
        check_shared(layout, shared)
    for stale in (layout.state, layout.spool, layout.run, layout.logs, layout.munge_dir):
        shutil.rmtree(stale, ignore_errors=True)
    for folder in (layout.root, layout.state, layout.spool, layout.run, layout.logs):
        folder.mkdir(parents=True, exist_ok=True)

    ports = free_ports(1 + len(names))
    layout.conf.write_text(render_conf(layout, names, cpus, max_array_size, ports[0], ports[1:]))
    try:
        if shared is not None:
            shared.real.mkdir(parents=True, exist_ok=True)
            shared.mount.mkdir(parents=True, exist_ok=True)
            layout.shared_settings.write_text(shared.to_json())
        start_munged(layout)
        start_slurmctld(layout)
        for node in names:
            start_slurmd(layout, node)  # before lagfs, so no node holds a copy of its mount
        if shared is not None:
            start_lagfs(layout, shared)
        wait_idle(layout, names, started + timeout)
    except (ClusterError, OSError, subprocess.SubprocessError) as exc:
        log(f"up failed: {exc}")
        print_log_tails(layout)
        log("stopping what was started")
        down(layout.root)
        raise ClusterError(f"up failed: {exc}") from exc
    log(
        f"cluster up in {time.monotonic() - started:.1f} s: {nodes} node(s) x {cpus} CPUs,"
        f" slurmctld port {ports[0]}"
    )
    if shared is not None:
        log(
            f"jobs see {shared.real} at {shared.mount}; here {shared.mount} shows it"
            f" {shared.lag:g} s late (lagfs)"
        )
    return Cluster(layout.root)


def down(directory: str | os.PathLike[str]) -> None:
    """Stop the cluster in ``directory`` and its jobs (safe to repeat)."""
    layout = Layout(Path(directory))
    daemons = running_daemons(layout)
    munged = daemons.pop("munged", None)
    slurmctld = daemons.pop("slurmctld", None)
    daemons.pop("lagfs", None)
    # The slurmd daemons before slurmctld: one with a job ending (an epilog to report)
    # waits for the gone controller until killed (5 s); jobs they leave are killed below.
    terminate(daemons.values())
    if slurmctld is not None:
        terminate([slurmctld])
    killed = kill_trees(job_process_roots(layout))
    lagfs = stop_lagfs(layout)  # after the nodes: nothing of theirs holds its mount now
    if munged is not None:  # last: the others talk to it while shutting down
        terminate([munged])
    stopped = len(daemons) + (slurmctld is not None) + (munged is not None) + lagfs
    log(f"stopped {stopped} daemon(s) and {len(killed)} job process(es) in {layout.root}")


def kill_node(directory: str | os.PathLike[str], node: str) -> None:
    """Simulate a node crash: SIGKILL its slurmd, slurmstepd and job processes at once."""
    layout = Layout(Path(directory))
    if node not in layout.nodes():
        raise ClusterError(f"no node {node!r} in {layout.conf}")
    slurmd = daemon_pid(layout.slurmd_pid(node), SLURMD, str(layout.conf))
    # Freeze and kill slurmd together with the node's step daemons and job processes,
    # so that nothing of the node gets the chance to report back to slurmctld.
    roots = job_process_roots(layout, node)
    if slurmd is not None:
        roots.add(slurmd)
    others = len(kill_trees(roots) - {slurmd})
    log(f"node {node}: killed slurmd (pid {slurmd}) and {others} other process(es)")


def start_node(directory: str | os.PathLike[str], node: str) -> None:
    """Start the slurmd of ``node`` again (after :func:`kill_node`)."""
    layout = Layout(Path(directory))
    if node not in layout.nodes():
        raise ClusterError(f"no node {node!r} in {layout.conf}")
    if daemon_pid(layout.slurmd_pid(node), SLURMD, str(layout.conf)) is not None:
        raise ClusterError(f"slurmd of node {node} is already running")
    if "slurmctld" not in running_daemons(layout):
        raise ClusterError(f"no slurmctld is running in {layout.root}; run `up` first")
    start_slurmd(layout, node)
    log(f"node {node}: slurmd started")


def restart_controller(
    directory: str | os.PathLike[str], settings: Iterable[str] = (), timeout: float = 60.0
) -> None:
    """Restart the cluster's slurmctld with ``settings`` (``Key=Value`` slurm.conf lines,
    e.g. ``MaxJobCount=5``) over the configuration ``up`` wrote, replacing those of an
    earlier call; wait until it answers again with every node responding.

    slurmctld saves its state on SIGTERM and recovers it on start, so queued and running
    jobs are kept. The slurmd daemons re-read the file too (``scontrol reconfigure``).
    While it restarts (well under a second here) Slurm's commands fail or retry.
    """
    layout = Layout(Path(directory))
    if "slurmctld" not in running_daemons(layout):
        raise ClusterError(f"no slurmctld is running in {layout.root}; run `up` first")
    if not layout.base_conf.exists():
        shutil.copyfile(layout.conf, layout.base_conf)
    layout.conf.write_text(with_settings(layout.base_conf.read_text(), settings))
    _restart(layout, timeout)
    log(f"slurmctld restarted with {', '.join(settings) or 'no extra settings'}")


def restore_controller(directory: str | os.PathLike[str], timeout: float = 60.0) -> None:
    """Restart slurmctld with the configuration ``up`` wrote (undo
    :func:`restart_controller`); a no-op when no extra settings are applied."""
    layout = Layout(Path(directory))
    if not layout.base_conf.exists():
        return
    shutil.copyfile(layout.base_conf, layout.conf)
    layout.base_conf.unlink()
    _restart(layout, timeout)
    log("slurmctld restarted with its original configuration")


def _restart(layout: Layout, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    stop_slurmctld(layout)
    start_slurmctld(layout)
    wait_answering(layout, deadline)
    # Its nodes re-register at once (rather than at the next ping, ~4 s) and read the
    # new slurm.conf too, so that the controller sees no configuration mismatch.
    subprocess.run(["scontrol", "reconfigure"], env=slurm_env(layout), check=False,
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    wait_responding(layout, layout.nodes(), deadline)
