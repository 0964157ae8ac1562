"""A task racing others for chunks, in a process of its own (test_claims.py). A module
of its own so that a forkserver child imports only this, not pytest."""

from __future__ import annotations

import time
from multiprocessing import Queue
from pathlib import Path

from slurmexecutor.folder import claims


def claim_all(folder: str, chunks: int, tasks: int, task: int, seconds: float,
              start: float, out: Queue) -> None:
    start_seen = start - time.time()  # < 0: this task came late to the race
    while time.time() < start:  # all together, to make them race
        time.sleep(0.001)
    claimer = claims.Claimer(Path(folder), claims.claim_order(chunks, tasks, task), str(task))
    won = []
    for chunk in claimer.claims():
        won.append(chunk)
        time.sleep(seconds)
    out.put((task, won, claimer.stats(), start_seen))
