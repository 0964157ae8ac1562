"""pytest plugin: a throwaway Slurm cluster for a test session.

Registered for pytest (entry point ``pytest11``) when slurmexecutor is installed. It
only defines fixtures, so it changes nothing for tests that do not ask for them:

- ``slurm_cluster`` (session): a running :class:`~slurmexecutor.testing.Cluster` started
  in a temporary folder, with ``SLURM_CONF`` naming it for the whole session; stopped at
  the end. With ``SLURMEXECUTOR_TEST_CLUSTER=DIR`` set, the cluster runs in DIR: one
  already running there (``python -m slurmexecutor.testing up DIR``) is reused and left
  running, which saves its start-up when tests are run again and again.
- ``slurm_cluster_options`` (session): the keyword arguments of
  :func:`~slurmexecutor.testing.up` (``nodes``, ``cpus``, ``max_array_size``, ...);
  override it in a conftest.py to change the cluster's size. Default: 1 node, 4 CPUs.

Example (in a test file)::

    def test_squares(slurm_cluster, tmp_path):
        with SlurmExecutor(tmp_path, backend="slurm") as ex:
            assert list(ex.map(abs, [-1, -2])) == [1, 2]
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slurmexecutor.testing.cluster import Cluster, up
from slurmexecutor.testing.layout import ClusterError
from slurmexecutor.testing.waiting import slurm_installed

#: Names a folder to run the session's cluster in (one running there is reused).
CLUSTER_DIR_VARIABLE = "SLURMEXECUTOR_TEST_CLUSTER"


@pytest.fixture(scope="session")
def slurm_cluster_options() -> dict[str, Any]:
    """Keyword arguments of ``slurmexecutor.testing.up`` for the session's cluster."""
    return {"nodes": 1, "cpus": 4}


@pytest.fixture(scope="session")
def slurm_cluster(
    slurm_cluster_options: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A running single-host Slurm cluster; ``SLURM_CONF`` names it for the session."""
    if not slurm_installed():
        pytest.fail("Slurm is not installed (as root: apt-get install -y slurm-wlm munge): "
                    "the tests that use the slurm_cluster fixture cannot run", pytrace=False)
    named = os.environ.get(CLUSTER_DIR_VARIABLE)
    cluster = Cluster(Path(named) if named else tmp_path_factory.mktemp("slurm"))
    reused = cluster.running()
    if not reused:
        try:
            up(cluster.directory, **slurm_cluster_options)
        except ClusterError as exc:
            pytest.fail(f"could not start a Slurm test cluster: {exc}", pytrace=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(cluster.conf))
        try:
            yield cluster
        finally:
            if not reused:
                cluster.down()
