"""How array tasks share a batch's chunks: O_EXCL claim files, O(C + K) metadata cost.

Task i of K owns the i-th contiguous block of the C chunks (about C/K, the first blocks
the larger) and takes it in ascending order, so a task alone starts calls in submission
order; once its block is taken, it steals from the ends of the others' blocks (task
i+1's first), so a thief and a block's owner meet in the middle, and thieves start on
different victims, instead of all racing for the same chunk.
Which chunks are taken it learns from ONE listing of `bNNNN/claims/`, and again after
each claim it lost; a taken chunk never becomes free, so what the listing said stays
true. Per task the cost is one listing, one create per chunk it runs, and one create
plus one listing per race it lost: O(C + K) for the batch, not O(C x K) blind creates.

Correct on NFS: the create is atomic (O_EXCL) and decides; a stale listing only costs a
lost race. A claim is never undone, so a task that dies fails exactly what it claimed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from slurmexecutor.folder.diskio import create_exclusive


def try_claim(path: Path, owner: str) -> bool:
    """Claim a chunk: True for exactly one claimant (O_EXCL create is atomic, NFS too)."""
    return create_exclusive(path, owner.encode())


def claim_order(chunks: int, tasks: int, task: int) -> list[int]:
    """The order in which task `task` of `tasks` tries the chunks: its own block (a
    contiguous share, so one task alone starts calls in submission order) ascending,
    then the others' blocks from their ends, one chunk of each in turn, beginning with
    the next task's (so thieves start on different victims and meet owners last)."""
    tasks = max(1, tasks)
    task %= tasks
    starts = [-(-owner * chunks // tasks) for owner in range(tasks + 1)]  # ceil: the
    blocks = [range(starts[owner], starts[owner + 1]) for owner in range(tasks)]  # first
    # blocks are the larger ones
    order = list(blocks[task])
    for depth in range(1, max(len(b) for b in blocks) + 1):
        for offset in range(1, tasks):
            block = blocks[(task + offset) % tasks]
            if depth <= len(block):
                order.append(block[-depth])
    return order


class Claimer:
    """One task's claims on one batch, with the metadata operations it cost."""

    def __init__(self, claims_dir: Path, order: list[int], owner: str) -> None:
        self.claims_dir, self.order, self.owner = claims_dir, order, owner
        self.taken: set[int] = set()
        self.taken_by_me: list[int] = []
        self.attempts = self.won = self.listings = 0
        self._listed = False

    def claims(self) -> Iterator[int]:
        """Yield each chunk this task won, in order; stop when every chunk is taken."""
        for chunk in self.order:
            if not self._listed:
                self._list()
            if chunk in self.taken:
                continue
            self.attempts += 1
            if try_claim(self.claims_dir / str(chunk), self.owner):
                self.won += 1
                self.taken.add(chunk)
                self.taken_by_me.append(chunk)
                yield chunk
            else:  # somebody was quicker: learn what else is gone
                self.taken.add(chunk)
                self._listed = False

    def _list(self) -> None:
        self.listings += 1
        self._listed = True
        try:
            names = os.listdir(self.claims_dir)
        except FileNotFoundError:
            names = []
        self.taken.update(int(name) for name in names if name.isdigit())

    def stats(self) -> dict[str, int]:
        return {"attempts": self.attempts, "won": self.won, "listings": self.listings}


#: a chunk claimed this many times longer ago than a chunk typically takes (as the idle
#: task measured its own) is a straggler: an idle task runs it a second time
STRAGGLER_FACTOR = 2.0


def mark_done(claims_dir: Path, chunk: int) -> None:
    """Say a chunk's calls all ran (what backups look at); one create per chunk."""
    try_claim(claims_dir / f"{chunk}.done", "")


class Backups:
    """Backup executions (the MapReduce paper's): a task that found every chunk taken
    runs again, once per chunk, a chunk claimed by another task that has not finished
    after STRAGGLER_FACTOR x the time a chunk typically takes; the client keeps the
    first result of each call and stops the other copy."""

    def __init__(self, claims_dir: Path, owner: str) -> None:
        self.claims_dir, self.owner = claims_dir, owner
        self.listings = 0

    def next(self, skip: set[int], typical: float, stopping: Callable[[], bool]
             ) -> int | None:
        """Wait for a straggler and claim its backup; None once there is none to wait
        for (every other chunk finished, backed up, or the client's)."""
        while not stopping():
            self.listings += 1
            names = set(os.listdir(self.claims_dir))
            open_chunks = [int(n) for n in names if n.isdigit() and int(n) not in skip
                           and f"{n}.done" not in names and f"{n}.backup" not in names]
            ages: dict[int, float] = {}
            for chunk in open_chunks:
                try:
                    path = self.claims_dir / str(chunk)
                    if path.read_text() == "client":  # cancelled: nothing to run
                        continue
                    ages[chunk] = time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue
            if not ages:
                return None
            chunk = max(ages, key=ages.__getitem__)
            wait = STRAGGLER_FACTOR * typical - ages[chunk]
            if wait <= 0:
                if try_claim(self.claims_dir / f"{chunk}.backup", self.owner):
                    return chunk
                continue
            time.sleep(min(wait, 1.0))
        return None
