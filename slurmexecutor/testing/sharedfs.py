"""The lagged shared folder of a test cluster (``up --shared REAL --mount MNT --lag L``).

Each slurmd runs in a mount namespace of its own where REAL is bind-mounted at MNT; in
the caller's namespace MNT is ``scripts/lagfs.py``, a FUSE view of REAL that shows what
the jobs write only L seconds later. This needs a source checkout (lagfs is not part of
the installed package), root, ``unshare``, /dev/fuse and the ``mfusepy`` package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from slurmexecutor.testing.layout import (
    MARKER_DIR,
    MARKER_NODE,
    ClusterError,
    Layout,
    Shared,
    log,
    tail,
)
from slurmexecutor.testing.processes import cmdline, is_alive, read_pid, terminate

LAGFS = Path(__file__).resolve().parents[2] / "scripts" / "lagfs.py"


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
        *(["--strict"] if shared.strict else []),
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
    if not LAGFS.is_file():
        raise ClusterError(f"--shared needs {LAGFS} (a source checkout of slurmexecutor)")
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
