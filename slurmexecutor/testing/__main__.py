"""Command line of the throwaway test cluster.

Usage::

    python -m slurmexecutor.testing up DIR [--nodes N] [--cpus C] [--max-array-size M]
                                           [--timeout S] [--shared REAL --mount MNT [--lag L]]
    python -m slurmexecutor.testing down DIR
    python -m slurmexecutor.testing env DIR
    python -m slurmexecutor.testing kill-node DIR NODENAME
    python -m slurmexecutor.testing start-node DIR NODENAME
    python -m slurmexecutor.testing restart-controller DIR [Key=Value ...]
    python -m slurmexecutor.testing restore-controller DIR

``up`` starts a cluster in DIR, waits until it is idle and prints
``export SLURM_CONF=DIR/slurm.conf`` (so ``eval "$(python -m slurmexecutor.testing up
DIR)"`` points this shell at it); ``down`` stops it (safe to repeat). ``kill-node``
simulates a node crash (SIGKILL of that node's slurmd, slurmstepd and job processes);
``start-node`` starts that node's slurmd again. ``restart-controller`` restarts slurmctld
with extra slurm.conf settings (queued jobs are kept); ``restore-controller`` undoes it.

``--shared REAL --mount MNT --lag L``: a login node with a lagging shared filesystem.
Each slurmd runs in a mount namespace of its own where REAL is bind-mounted at MNT, so
every job reads and writes REAL directly at path MNT; in the caller's namespace MNT is
``scripts/lagfs.py``, a FUSE view of REAL that shows what the jobs write only L seconds
(default 2) later. ``down`` stops lagfs and unmounts MNT. This needs a source checkout,
root, ``unshare``, /dev/fuse, Debian ``fuse3`` and the ``mfusepy`` package.

Progress goes to stderr; only the export line goes to stdout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from slurmexecutor.testing.cluster import (
    down,
    kill_node,
    restart_controller,
    restore_controller,
    start_node,
    up,
)
from slurmexecutor.testing.layout import ClusterError, Layout, Shared, log


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m slurmexecutor.testing",
        description="Start and stop a throwaway single-host Slurm cluster kept under DIR.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    start = sub.add_parser("up", help="start a cluster in DIR and wait until it is idle")
    start.add_argument("dir", type=Path, metavar="DIR")
    start.add_argument("--nodes", type=int, default=1, help="number of nodes n1..nN (default 1)")
    start.add_argument("--cpus", type=int, default=16, help="CPUs declared per node (default 16)")
    start.add_argument("--max-array-size", type=int, default=1001,
                       help="MaxArraySize (default 1001)")
    start.add_argument("--timeout", type=float, default=60.0,
                       help="seconds to wait for idle nodes (default 60)")
    start.add_argument("--shared", type=Path, metavar="REAL",
                       help="a shared folder the jobs see at MNT directly and the caller late")
    start.add_argument("--mount", type=Path, metavar="MNT", help="where jobs and caller see REAL")
    start.add_argument("--lag", type=float, metavar="L",
                       help="seconds before the caller sees what jobs write under MNT (default 2)")
    start.add_argument("--strict", action="store_true",
                       help="with --lag: no close-to-open (data lags too, stricter than NFS)")

    for name, text in (
        ("down", "stop the cluster in DIR (safe to repeat)"),
        ("env", "print the export SLURM_CONF=... line"),
        ("restore-controller", "restart slurmctld without the settings of restart-controller"),
    ):
        sub.add_parser(name, help=text).add_argument("dir", type=Path, metavar="DIR")
    for name, text in (
        ("kill-node", "simulate a crash: SIGKILL the node's slurmd, slurmstepd and jobs"),
        ("start-node", "start the node's slurmd again"),
    ):
        node_parser = sub.add_parser(name, help=text)
        node_parser.add_argument("dir", type=Path, metavar="DIR")
        node_parser.add_argument("node", metavar="NODENAME")
    restart = sub.add_parser("restart-controller",
                             help="restart slurmctld with extra Key=Value settings")
    restart.add_argument("dir", type=Path, metavar="DIR")
    restart.add_argument("settings", nargs="*", metavar="Key=Value")
    return parser.parse_args(argv)


def shared_of(args: argparse.Namespace) -> Shared | None:
    """The --shared/--mount/--lag options, checked."""
    if (args.shared is None) != (args.mount is None):
        raise ClusterError("--shared and --mount go together")
    if args.shared is None:
        if args.lag is not None:
            raise ClusterError("--lag needs --shared and --mount")
        return None
    lag = 2.0 if args.lag is None else args.lag
    return Shared(args.shared.expanduser().resolve(), args.mount.expanduser().resolve(), lag,
                  args.strict)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "up":
            cluster = up(args.dir, args.nodes, args.cpus, args.max_array_size, args.timeout,
                         shared_of(args))
            print(cluster.layout.export_line(), flush=True)
        elif args.command == "down":
            down(args.dir)
        elif args.command == "env":
            print(Layout(args.dir).export_line())
        elif args.command == "kill-node":
            kill_node(args.dir, args.node)
        elif args.command == "start-node":
            start_node(args.dir, args.node)
        elif args.command == "restart-controller":
            restart_controller(args.dir, args.settings)
        elif args.command == "restore-controller":
            restore_controller(args.dir)
        else:
            raise AssertionError(f"unhandled command {args.command}")
    except ClusterError as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
