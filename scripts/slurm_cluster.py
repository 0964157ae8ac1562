#!/usr/bin/env python3
"""Start and stop a throwaway single-host Slurm cluster kept entirely under one folder.

Usage::

    slurm_cluster.py up DIR [--nodes N] [--cpus C] [--max-array-size M] [--timeout S]
                            [--shared REAL --mount MNT [--lag L]]
    slurm_cluster.py down DIR
    slurm_cluster.py env DIR
    slurm_cluster.py kill-node DIR NODENAME
    slurm_cluster.py start-node DIR NODENAME

``up`` writes ``DIR/slurm.conf``, starts a private munged (own key and socket),
slurmctld and one slurmd per node (``n1`` .. ``nN``, all on this host, each on its
own free TCP port), waits until every node is idle and prints
``export SLURM_CONF=DIR/slurm.conf``. ``down`` stops exactly the daemons whose pid
files are in DIR, plus any job processes left over from this cluster's slurmstepd.
``kill-node`` simulates a node crash (SIGKILL of that node's slurmd, slurmstepd and
job processes); ``start-node`` starts that node's slurmd again.

A login node with a lagging shared filesystem (``--shared REAL --mount MNT --lag L``): each
slurmd runs in a mount namespace of its own (``unshare -m --propagation private``) where the
folder REAL is bind-mounted at MNT, so every job reads and writes REAL directly at path MNT;
in the namespace of the caller (the "login node", where the client and the tests run) MNT
is ``scripts/lagfs.py``, a FUSE view of REAL that shows what the jobs write only L seconds
(default 2) after they wrote it, while the caller's own writes through MNT show at once.
``down`` stops lagfs (pid file ``DIR/run/lagfs.pid``, log ``DIR/log/lagfs.log``) and
makes sure MNT is unmounted. For example::

    python3 scripts/slurm_cluster.py up /tmp/c --shared /tmp/shared --mount /tmp/mnt --lag 2
    export SLURM_CONF=/tmp/c/slurm.conf
    sbatch -o /dev/null --wrap 'echo hi > /tmp/mnt/x'  # in /tmp/shared at once,
    ls /tmp/mnt                                        # but here only after ~2 s
    python3 scripts/slurm_cluster.py down /tmp/c

This needs root, ``unshare`` (util-linux), /dev/fuse, Debian ``fuse3`` and the ``mfusepy``
package (``bash scripts/bootstrap.sh test`` installs them). REAL and MNT are created if
missing; they must not contain each other and MNT must not be a mount point already.

Nothing is written outside DIR (but for REAL and MNT with ``--shared``) and the system
munged is never touched. The settings follow shared/SLURM-NOTES.md: no cgroups, no
accounting, a scheduler tuned for fast turnaround of short test jobs. Progress goes to
stderr; only the export line goes to stdout. Python standard library only (lagfs needs
``mfusepy``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
MUNGED = "/usr/sbin/munged"
LAGFS = Path(__file__).resolve().with_name("lagfs.py")

# Set in the environment of our slurmd daemons; slurmstepd inherits it, which is
# how this script recognises the step daemons (and so the jobs) of its own cluster.
MARKER_DIR = "SLURM_CLUSTER_SCRIPT_DIR"
MARKER_NODE = "SLURM_CLUSTER_SCRIPT_NODE"

UNIX_PATH_MAX = 107  # sun_path holds 108 bytes including the terminating NUL
STOP_GRACE_S = 5.0


class ClusterError(RuntimeError):
    """A failure to report to the user as one clear message."""


def log(message: str) -> None:
    """Print a progress message to stderr (stdout is reserved for the export line)."""
    print(f"slurm_cluster: {message}", file=sys.stderr, flush=True)


class Layout:
    """Where every file of one cluster lives, all under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.munge_key = self.munge_dir / "munge.key"
        self.munge_socket = self.munge_dir / "munge.sock"
        self.munge_pid = self.munge_dir / "munged.pid"
        self.munge_log = self.munge_dir / "munged.log"
        self.munge_seed = self.munge_dir / "munged.seed"
        self.state = self.root / "state"
        self.spool = self.root / "spool"
        self.run = self.root / "run"
        self.logs = self.root / "log"
        self.jobcomp = self.logs / "jobcomp.txt"
        self.slurmctld_pid = self.run / "slurmctld.pid"
        self.slurmctld_log = self.logs / "slurmctld.log"
        self.shared_settings = self.run / "shared.json"
        self.lagfs_pid = self.run / "lagfs.pid"
        self.lagfs_log = self.logs / "lagfs.log"

    def slurmd_pid(self, node: str) -> Path:
        return self.run / f"slurmd-{node}.pid"

    def slurmd_log(self, node: str) -> Path:
        return self.logs / f"slurmd-{node}.log"

    def launcher_log(self, name: str) -> Path:
        """Stdout/stderr of a daemon's launching process (early start-up errors)."""
        return self.logs / f"{name}.out"

    def shared(self) -> Shared | None:
        """The shared-folder settings of the cluster in DIR (None: it has none)."""
        try:
            data = json.loads(self.shared_settings.read_text())
        except (OSError, ValueError):
            return None
        return Shared(Path(data["real"]), Path(data["mount"]), float(data["lag"]))

    def export_line(self) -> str:
        return f"export SLURM_CONF={shlex.quote(str(self.conf))}"

    def nodes(self) -> list[str]:
        """Node names declared in slurm.conf (empty if there is none)."""
        if not self.conf.is_file():
            return []
        nodes = []
        for line in self.conf.read_text().splitlines():
            for word in line.split():
                if word.startswith("NodeName="):
                    nodes.append(word.removeprefix("NodeName="))
        return nodes


class Shared:
    """A shared folder REAL: at MNT for the jobs, and late at MNT for the caller (lagfs)."""

    def __init__(self, real: Path, mount: Path, lag: float) -> None:
        self.real = real
        self.mount = mount
        self.lag = lag

    def to_json(self) -> str:
        return json.dumps({"real": str(self.real), "mount": str(self.mount), "lag": self.lag})


# --------------------------------------------------------------------------- processes


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            env[key] = value
    return env


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after it.
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[1]) if len(fields) > 1 else None


def is_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X", "")


def all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def protected_pids() -> set[int]:
    """This process and its ancestors: never signalled."""
    pids = set()
    pid: int | None = os.getpid()
    while pid and pid not in pids:
        pids.add(pid)
        pid = parent_pid(pid)
    return pids


def descendants(roots: Iterable[int]) -> set[int]:
    """``roots`` plus every process below them in the process tree."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        ppid = parent_pid(pid)
        if ppid is not None:
            children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def send(pids: Iterable[int], sig: signal.Signals) -> None:
    protected = protected_pids()
    for pid in pids:
        if pid in protected:
            continue
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def wait_gone(pids: Iterable[int], timeout: float) -> set[int]:
    """Wait until none of ``pids`` is alive; return those still alive at the timeout."""
    remaining = set(pids)
    deadline = time.monotonic() + timeout
    while True:
        remaining = {pid for pid in remaining if is_alive(pid)}
        if not remaining or time.monotonic() >= deadline:
            return remaining
        time.sleep(0.05)


def terminate(pids: Iterable[int], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL whatever is left."""
    pids = set(pids) - protected_pids()
    if not pids:
        return
    send(pids, signal.SIGTERM)
    left = wait_gone(pids, grace)
    if left:
        send(left, signal.SIGKILL)
        wait_gone(left, 2.0)


def kill_trees(roots: Iterable[int]) -> set[int]:
    """Freeze ``roots``, then SIGKILL them and all their descendants at once."""
    roots = set(roots) - protected_pids()
    if not roots:
        return set()
    send(roots, signal.SIGSTOP)  # no new children while we collect the tree
    victims = descendants(roots) - protected_pids()
    send(victims, signal.SIGKILL)
    wait_gone(victims, 2.0)
    return victims


# ------------------------------------------------------------------ daemons of a cluster


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


# ------------------------------------------------------------------- the shared folder


def mount_points() -> dict[str, str]:
    """Mount point -> filesystem type, in this process's mount namespace (last wins)."""
    found = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        # Spaces and the like are written as octal escapes (\040).
        point = fields[4].encode().decode("unicode_escape").encode("latin-1").decode()
        found[point] = after[0] if after else ""
    return found


def is_lagfs_mounted(mount: Path) -> bool:
    return mount_points().get(str(mount)) == "fuse.lagfs"


def lagfs_pid(layout: Layout) -> int | None:
    """The live pid of this cluster's lagfs, checked against its command line."""
    shared = layout.shared()
    pid = read_pid(layout.lagfs_pid)
    if shared is None or pid is None or not is_alive(pid):
        return None
    args = cmdline(pid)
    if not any(Path(arg).name == LAGFS.name for arg in args) or str(shared.mount) not in args:
        return None
    return pid


def check_node_sees_real(pid: int, node: str, shared: Shared) -> None:
    """The node's slurmd (and so its jobs) must see REAL itself at MNT."""
    try:
        seen = os.stat(f"/proc/{pid}/root{shared.mount}")
        real = os.stat(shared.real)
    except OSError as exc:
        raise ClusterError(f"slurmd {node}: cannot check its view of {shared.mount}: {exc}")
    if (seen.st_dev, seen.st_ino) != (real.st_dev, real.st_ino):
        raise ClusterError(f"slurmd {node} does not see {shared.real} at {shared.mount}")


def start_lagfs(layout: Layout, shared: Shared, timeout: float = 15.0) -> None:
    """Mount the lagging view of REAL at MNT in our namespace; wait until it is mounted."""
    env = {key: value for key, value in os.environ.items()
           if key not in (MARKER_DIR, MARKER_NODE, "SLURM_JOB_ID")}
    argv = [
        sys.executable, str(LAGFS), str(shared.real), str(shared.mount),
        "--lag", str(shared.lag), "--pid-file", str(layout.lagfs_pid),
    ]
    with open(os.devnull, "rb") as devnull, open(layout.lagfs_log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=devnull, stdout=out, stderr=out, env=env,
                                cwd=layout.root, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(
                f"lagfs exited with {proc.returncode}:\n{tail(layout.lagfs_log)}")
        if is_lagfs_mounted(shared.mount) and lagfs_pid(layout) == proc.pid:
            return
        time.sleep(0.05)
    raise ClusterError(f"lagfs did not mount {shared.mount} within {timeout:.0f} s")


def stop_lagfs(layout: Layout) -> bool:
    """Stop this cluster's lagfs and make sure its mount point is unmounted."""
    shared = layout.shared()
    if shared is None:
        return False
    pid = lagfs_pid(layout)
    if pid is not None:
        terminate([pid])  # lagfs unmounts MNT when it gets SIGTERM
    deadline = time.monotonic() + 5.0
    while is_lagfs_mounted(shared.mount) and time.monotonic() < deadline:
        if pid is None or not is_alive(pid):  # killed, or not unmounted: do it ourselves
            for command in (["fusermount3", "-u", "-z"], ["umount", "-l"]):
                if shutil.which(command[0]):
                    subprocess.run([*command, str(shared.mount)], check=False,
                                   stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
                if not is_lagfs_mounted(shared.mount):
                    break
        time.sleep(0.05)
    if is_lagfs_mounted(shared.mount):
        log(f"warning: {shared.mount} is still mounted")
    return pid is not None


def check_shared(layout: Layout, shared: Shared) -> None:
    """Refuse a shared folder or mount point that up would break or that would break up."""
    if shutil.which("unshare") is None:
        raise ClusterError("--shared needs `unshare` (util-linux)")
    if not Path("/dev/fuse").exists():
        raise ClusterError("--shared needs FUSE (/dev/fuse); apt-get install -y fuse3")
    if shared.lag < 0:
        raise ClusterError("--lag must be >= 0")
    real, mount = str(shared.real), str(shared.mount)
    if os.path.commonpath([real, mount]) in (real, mount):
        raise ClusterError(f"--shared {real} and --mount {mount} must not contain each other")
    wiped = (layout.state, layout.spool, layout.run, layout.logs, layout.munge_dir)
    for path in (shared.real, shared.mount):
        if any(path == folder or folder in path.parents for folder in wiped):
            raise ClusterError(f"{path} is inside {layout.root}'s own folders, which up wipes")
        if path.exists() and not path.is_dir():
            raise ClusterError(f"{path} exists and is not a folder")
    if mount in mount_points():
        raise ClusterError(f"{mount} is a mount point already; unmount it first")


# ---------------------------------------------------------------------------- slurm.conf


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
    }
    lines = [
        "# Throwaway test cluster written by scripts/slurm_cluster.py; do not edit.",
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


# ------------------------------------------------------------------------------ waiting


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


def tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text[-lines:]) if text else f"({path} is empty)"


def print_log_tails(layout: Layout) -> None:
    paths = [layout.munge_log, layout.slurmctld_log]
    paths += sorted(layout.logs.glob("slurmd-*.log")) + sorted(layout.logs.glob("*.out"))
    for path in paths:
        if path.exists():
            print(f"----- tail of {path} -----\n{tail(path)}", file=sys.stderr)


# ----------------------------------------------------------------------------- commands


def cmd_up(
    layout: Layout,
    nodes_count: int,
    cpus: int,
    max_array_size: int,
    timeout: float,
    shared: Shared | None = None,
) -> int:
    started = time.monotonic()
    deadline = started + timeout
    running = running_daemons(layout)
    if running:
        names = ", ".join(f"{name} (pid {pid})" for name, pid in running.items())
        raise ClusterError(
            f"a cluster is already running in {layout.root}: {names}; "
            f"run `{Path(sys.argv[0]).name} down {layout.root}` first"
        )
    if nodes_count < 1 or cpus < 1 or max_array_size < 1:
        raise ClusterError("--nodes, --cpus and --max-array-size must be at least 1")
    nodes = [f"n{k}" for k in range(1, nodes_count + 1)]
    check_paths(layout, nodes)

    # Leftovers of an earlier cluster that was not shut down cleanly.
    kill_trees(job_process_roots(layout))
    stop_lagfs(layout)
    if shared is not None:
        check_shared(layout, shared)
    for stale in (
        layout.state,
        layout.spool,
        layout.run,
        layout.logs,
        layout.munge_dir,
    ):
        shutil.rmtree(stale, ignore_errors=True)
    for folder in (layout.root, layout.state, layout.spool, layout.run, layout.logs):
        folder.mkdir(parents=True, exist_ok=True)

    ports = free_ports(1 + len(nodes))
    layout.conf.write_text(render_conf(layout, nodes, cpus, max_array_size, ports[0], ports[1:]))
    try:
        if shared is not None:
            shared.real.mkdir(parents=True, exist_ok=True)
            shared.mount.mkdir(parents=True, exist_ok=True)
            layout.shared_settings.write_text(shared.to_json())
        start_munged(layout)
        start_slurmctld(layout)
        for node in nodes:
            start_slurmd(layout, node)  # before lagfs, so no node holds a copy of its mount
        if shared is not None:
            start_lagfs(layout, shared)
        wait_idle(layout, nodes, deadline)
    except (ClusterError, OSError, subprocess.SubprocessError) as exc:
        log(f"up failed: {exc}")
        print_log_tails(layout)
        log("stopping what was started")
        cmd_down(layout)
        return 1
    log(
        f"cluster up in {time.monotonic() - started:.1f} s: {len(nodes)} node(s) x {cpus} CPUs,"
        f" slurmctld port {ports[0]}"
    )
    if shared is not None:
        log(
            f"jobs see {shared.real} at {shared.mount}; here {shared.mount} shows it"
            f" {shared.lag:g} s late (lagfs)"
        )
    print(layout.export_line(), flush=True)
    return 0


def cmd_down(layout: Layout) -> int:
    daemons = running_daemons(layout)
    munged = daemons.pop("munged", None)
    slurmctld = daemons.pop("slurmctld", None)
    daemons.pop("lagfs", None)
    if slurmctld is not None:  # first, so that nothing new is launched
        terminate([slurmctld])
    terminate(daemons.values())  # the slurmd daemons
    killed = kill_trees(job_process_roots(layout))
    lagfs = stop_lagfs(layout)  # after the nodes: nothing of theirs holds its mount now
    if munged is not None:  # last: the others talk to it while shutting down
        terminate([munged])
    stopped = len(daemons) + (slurmctld is not None) + (munged is not None) + lagfs
    log(f"stopped {stopped} daemon(s) and {len(killed)} job process(es) in {layout.root}")
    return 0


def cmd_kill_node(layout: Layout, node: str) -> int:
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
    return 0


def cmd_start_node(layout: Layout, node: str) -> int:
    if node not in layout.nodes():
        raise ClusterError(f"no node {node!r} in {layout.conf}")
    if daemon_pid(layout.slurmd_pid(node), SLURMD, str(layout.conf)) is not None:
        raise ClusterError(f"slurmd of node {node} is already running")
    if "slurmctld" not in running_daemons(layout):
        raise ClusterError(f"no slurmctld is running in {layout.root}; run `up` first")
    start_slurmd(layout, node)
    log(f"node {node}: slurmd started")
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a cluster in DIR and wait until it is idle")
    up.add_argument("dir", type=Path, metavar="DIR")
    up.add_argument("--nodes", type=int, default=1, help="number of nodes n1..nN (default 1)")
    up.add_argument("--cpus", type=int, default=16, help="CPUs declared per node (default 16)")
    up.add_argument("--max-array-size", type=int, default=1001, help="MaxArraySize (default 1001)")
    up.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for idle nodes (default 60)",
    )
    up.add_argument(
        "--shared",
        type=Path,
        metavar="REAL",
        help="a shared folder the jobs see at MNT directly and the caller late (lagfs)",
    )
    up.add_argument("--mount", type=Path, metavar="MNT", help="where jobs and caller see REAL")
    up.add_argument(
        "--lag",
        type=float,
        metavar="L",
        help="seconds before the caller sees what jobs write under MNT (default 2)",
    )

    down = sub.add_parser("down", help="stop the cluster in DIR (safe to repeat)")
    down.add_argument("dir", type=Path, metavar="DIR")

    env = sub.add_parser("env", help="print the export SLURM_CONF=... line")
    env.add_argument("dir", type=Path, metavar="DIR")

    for name, text in (
        (
            "kill-node",
            "simulate a crash: SIGKILL the node's slurmd, slurmstepd and jobs",
        ),
        ("start-node", "start the node's slurmd again"),
    ):
        node_parser = sub.add_parser(name, help=text)
        node_parser.add_argument("dir", type=Path, metavar="DIR")
        node_parser.add_argument("node", metavar="NODENAME")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    layout = Layout(args.dir)
    try:
        if args.command == "up":
            shared = None
            if (args.shared is None) != (args.mount is None):
                raise ClusterError("--shared and --mount go together")
            if args.shared is not None:
                lag = 2.0 if args.lag is None else args.lag
                shared = Shared(args.shared.expanduser().resolve(),
                                args.mount.expanduser().resolve(), lag)
            elif args.lag is not None:
                raise ClusterError("--lag needs --shared and --mount")
            return cmd_up(
                layout, args.nodes, args.cpus, args.max_array_size, args.timeout, shared
            )
        if args.command == "down":
            return cmd_down(layout)
        if args.command == "env":
            print(layout.export_line())
            return 0
        if args.command == "kill-node":
            return cmd_kill_node(layout, args.node)
        if args.command == "start-node":
            return cmd_start_node(layout, args.node)
    except ClusterError as exc:
        log(f"error: {exc}")
        return 1
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
