"""The daemons of a test cluster: munged, slurmctld and one slurmd per node.

Each is started detached (a session of its own, stdio to files under DIR/log) and found
again by its pid file, checked against its command line, so that a pid reused by an
unrelated process is never taken for one of ours.
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from slurmexecutor.testing.layout import (
    MARKER_DIR,
    MARKER_NODE,
    MUNGED,
    SLURMCTLD,
    SLURMD,
    ClusterError,
    Layout,
    tail,
)
from slurmexecutor.testing.processes import (
    all_pids,
    cmdline,
    environ,
    is_alive,
    protected_pids,
    read_pid,
    terminate,
)
from slurmexecutor.testing.sharedfs import check_node_sees_real, lagfs_pid


def daemon_pid(path: Path, binary: str, marker: str) -> int | None:
    """The live pid recorded in ``path`` if it is ``binary`` running for this cluster.

    ``marker`` must occur in its command line (our conf file or munge socket), so a
    pid reused by an unrelated process is never mistaken for our daemon.
    """
    pid = read_pid(path)
    if pid is None or not is_alive(pid):
        return None
    args = cmdline(pid)
    if not args or Path(args[0]).name != Path(binary).name:
        return None
    if not any(marker in arg for arg in args):
        return None
    return pid


def running_daemons(layout: Layout) -> dict[str, int]:
    """Name -> pid of each of this cluster's daemons that is running now."""
    conf = str(layout.conf)
    found: dict[str, int | None] = {
        "munged": daemon_pid(layout.munge_pid, MUNGED, str(layout.munge_socket)),
        "slurmctld": daemon_pid(layout.slurmctld_pid, SLURMCTLD, conf),
    }
    pid_files = {layout.slurmd_pid(node) for node in layout.nodes()}
    pid_files.update(layout.run.glob("slurmd-*.pid") if layout.run.is_dir() else [])
    for path in sorted(pid_files):
        found[path.stem] = daemon_pid(path, SLURMD, conf)
    found["lagfs"] = lagfs_pid(layout)
    return {name: pid for name, pid in found.items() if pid is not None}


def job_process_roots(layout: Layout, node: str | None = None) -> set[int]:
    """slurmstepd daemons (and stray job processes) of this cluster, or of one node.

    Every process started by our daemons inherits the marker variables (slurmstepd
    from slurmd, slurmscriptd from slurmctld); the daemons themselves are left out.
    A job process that escaped its slurmstepd's tree (a double-forked daemon) is
    recognised by the environment Slurm gives every task: ``SLURM_JOB_ID`` plus our
    ``SLURM_CONF``.
    """
    root = str(layout.root)
    conf = str(layout.conf)
    daemons = set(running_daemons(layout).values())
    roots = set()
    for pid in set(all_pids()) - daemons:
        env = environ(pid)
        if env.get(MARKER_DIR) == root:
            node_of_process = env.get(MARKER_NODE)
        elif env.get("SLURM_CONF") == conf and "SLURM_JOB_ID" in env:
            node_of_process = env.get("SLURMD_NODENAME")
        else:
            continue
        if node is None or node_of_process == node:
            roots.add(pid)
    return roots - protected_pids()


def spawn_daemon(layout: Layout, name: str, argv: Sequence[str], env: dict[str, str]) -> None:
    """Run a self-daemonising program detached from us: new session, stdio to files.

    The launching process forks the real daemon and exits; a non-zero exit status
    means the daemon could not start.
    """
    out_path = layout.launcher_log(name)
    with open(os.devnull, "rb") as devnull, open(out_path, "ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=devnull,
            stdout=out,
            stderr=out,
            env=env,
            cwd=layout.root,
            start_new_session=True,
            close_fds=True,
        )
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            proc.wait()
            raise ClusterError(f"{name} did not detach within 30 s") from exc
    if code != 0:
        raise ClusterError(f"{name} failed to start (exit {code}):\n{tail(out_path)}")


def wait_for_pid(path: Path, binary: str, marker: str, name: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = daemon_pid(path, binary, marker)
        if pid is not None:
            return pid
        time.sleep(0.05)
    raise ClusterError(f"{name} wrote no pid file {path} within {timeout:.0f} s")


def daemon_env(layout: Layout, node: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["SLURM_CONF"] = str(layout.conf)
    env[MARKER_DIR] = str(layout.root)
    if node is not None:
        env[MARKER_NODE] = node
    return env


def start_munged(layout: Layout) -> None:
    layout.munge_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(layout.munge_dir, 0o755)  # munged wants its socket's folder searchable
    if not layout.munge_key.exists():
        fd = os.open(layout.munge_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as key:
            key.write(secrets.token_bytes(1024))
    os.chmod(layout.munge_key, 0o600)
    argv = [
        MUNGED,
        "--force",
        f"--socket={layout.munge_socket}",
        f"--key-file={layout.munge_key}",
        f"--pid-file={layout.munge_pid}",
        f"--log-file={layout.munge_log}",
        f"--seed-file={layout.munge_seed}",
        "--num-threads=10",
    ]
    spawn_daemon(layout, "munged", argv, daemon_env(layout))
    wait_for_pid(layout.munge_pid, MUNGED, str(layout.munge_socket), "munged", 10)
    check = subprocess.run(
        f"munge -n -S {shlex.quote(str(layout.munge_socket))}"
        f" | unmunge -S {shlex.quote(str(layout.munge_socket))}",
        shell=True,
        check=False,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise ClusterError(f"munge self-test failed:\n{check.stderr.strip()}")


def start_slurmctld(layout: Layout) -> None:
    argv = [SLURMCTLD, "-f", str(layout.conf)]
    spawn_daemon(layout, "slurmctld", argv, daemon_env(layout))
    wait_for_pid(layout.slurmctld_pid, SLURMCTLD, str(layout.conf), "slurmctld", 15)


def start_slurmd(layout: Layout, node: str) -> None:
    (layout.spool / node).mkdir(parents=True, exist_ok=True)
    argv = [SLURMD, "-f", str(layout.conf), "-N", node]
    shared = layout.shared()
    if shared is not None:
        # A mount namespace of its own, inherited by every job of this node, where MNT is
        # REAL itself. A copy of the caller's lagfs mount (when the node starts after it,
        # as with start-node) is dropped there first so that it does not keep lagfs alive.
        mnt, real = shlex.quote(str(shared.mount)), shlex.quote(str(shared.real))
        script = f'umount -l {mnt} 2>/dev/null; mount --bind {real} {mnt} && exec "$@"'
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *argv]
    spawn_daemon(layout, f"slurmd-{node}", argv, daemon_env(layout, node))
    pid = wait_for_pid(layout.slurmd_pid(node), SLURMD, str(layout.conf), f"slurmd {node}", 15)
    if shared is not None:
        check_node_sees_real(pid, node, shared)


def stop_slurmctld(layout: Layout) -> bool:
    """Stop this cluster's slurmctld (SIGTERM: it saves its state first); True if it ran."""
    pid = daemon_pid(layout.slurmctld_pid, SLURMCTLD, str(layout.conf))
    if pid is not None:
        terminate([pid])
    return pid is not None
