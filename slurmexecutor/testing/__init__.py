"""A throwaway Slurm cluster on this host, for testing code that uses Slurm.

From Python::

    from slurmexecutor.testing import up
    cluster = up("/tmp/c", nodes=2, cpus=4)   # then SLURM_CONF=cluster.conf
    ...
    cluster.down()

From the shell: ``python -m slurmexecutor.testing up|down|env DIR`` (see ``--help``).
With pytest: the ``slurm_cluster`` session fixture (``slurmexecutor.testing.plugin``,
registered for pytest when slurmexecutor is installed).

It needs root and Debian's ``slurm-wlm`` and ``munge`` packages; it writes nothing
outside DIR and never touches the system's munged.
"""

from slurmexecutor.testing.cluster import (
    Cluster,
    down,
    kill_node,
    restart_controller,
    restore_controller,
    start_node,
    up,
)
from slurmexecutor.testing.config import CAPPED_MAX_TIME
from slurmexecutor.testing.layout import ClusterError, Shared
from slurmexecutor.testing.waiting import slurm_installed

__all__ = [
    "CAPPED_MAX_TIME",
    "Cluster",
    "ClusterError",
    "Shared",
    "down",
    "kill_node",
    "restart_controller",
    "restore_controller",
    "slurm_installed",
    "start_node",
    "up",
]
