"""Where every file of a throwaway test cluster lives, and the errors it reports."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

SLURMCTLD = "/usr/sbin/slurmctld"
SLURMD = "/usr/sbin/slurmd"
MUNGED = "/usr/sbin/munged"

# Set in the environment of our daemons; slurmstepd inherits it, which is how the
# step daemons (and so the jobs) of one cluster are recognised.
MARKER_DIR = "SLURM_CLUSTER_SCRIPT_DIR"
MARKER_NODE = "SLURM_CLUSTER_SCRIPT_NODE"

UNIX_PATH_MAX = 107  # sun_path holds 108 bytes including the terminating NUL


class ClusterError(RuntimeError):
    """A failure to report to the user as one clear message."""


def log(message: str) -> None:
    """Print a progress message to stderr (the CLI's stdout is for the export line)."""
    print(f"slurm_cluster: {message}", file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, or a note saying why there are none."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text[-lines:]) if text else f"({path} is empty)"


class Shared:
    """A shared folder REAL: at MNT for the jobs, and late at MNT for the caller (lagfs)."""

    def __init__(self, real: Path, mount: Path, lag: float, strict: bool = False) -> None:
        self.real = real
        self.mount = mount
        self.lag = lag
        self.strict = strict  # no close-to-open: data lags too (stricter than NFS)

    def to_json(self) -> str:
        return json.dumps({"real": str(self.real), "mount": str(self.mount), "lag": self.lag,
                           "strict": self.strict})


class Layout:
    """Where every file of one cluster lives, all under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
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
        self.base_conf = self.run / "slurm.conf.base"  # while extra settings are applied
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
        return Shared(Path(data["real"]), Path(data["mount"]), float(data["lag"]),
                      bool(data.get("strict")))

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
