"""A task racing others for chunks, in a process of its own (test_claims.py). A module
of its own so that a forkserver child imports only this, not pytest."""

from __future__ import annotations

import time
from multiprocessing import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

from slurmexecutor.folder import claims


def claim_all(folder: str, chunks: int, tasks: int, task: int, seconds: float,
              start: Barrier, out: Queue) -> None:
    start.wait(timeout=60)  # all together, to make them race
    claimer = claims.Claimer(Path(folder), claims.claim_order(chunks, tasks, task), str(task))
    won = []
    for chunk in claimer.claims():
        won.append(chunk)
        time.sleep(seconds)
    out.put((task, won, claimer.stats()))
