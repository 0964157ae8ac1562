#!/usr/bin/env python3
"""Compatibility wrapper: the test cluster is ``python -m slurmexecutor.testing`` now.

``python3 scripts/slurm_cluster.py up|down|env|kill-node|start-node DIR ...`` runs the
same command line (see ``slurmexecutor/testing/__main__.py``); importing this file gives
the helpers older callers used (``Layout``, ``running_daemons``, ``job_process_roots``,
``kill_trees``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout, not installed

from slurmexecutor.testing.__main__ import main
from slurmexecutor.testing.daemons import job_process_roots, running_daemons
from slurmexecutor.testing.layout import Layout
from slurmexecutor.testing.processes import kill_trees

__all__ = ["Layout", "job_process_roots", "kill_trees", "main", "running_daemons"]

if __name__ == "__main__":
    sys.exit(main())
