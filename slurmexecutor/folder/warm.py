"""Warm tasks (`keep_alive`): a task with nothing left to claim waits for the next batch.

    client (engine.py)                       a warm array task (worker.py)
    ------------------                       -----------------------------
    writes batch N, then <run>/batches = N   idle: an `idle` record, then opens
      (one small file per run)                 <run>/batches, every 0.5 ms backing off to
                                               0.1 s, for up to keep_alive s
    waits `warm_wait` s for a warm task      sees N: same resources and interpreter
      to join before it submits an array       (manifest's `resources` key) and chunks
                                               left? joins: an `end` record for its old
                                               batch, then a new stream bN/t1000000+k,
                                               and claims like any task of batch N
    shutdown: <run>/batches = "closed", and  exits at its next poll (or at once: the
      scancel of the warm tasks it knows       scancel), or after keep_alive idle s

A task joins only with one of the batch's join tickets (one per chunk, `claims/join.K`).
The signal file is "N W1 W2 ...": after the latest batch N, the earlier batches W whose
chunks wait while their own tasks have not started (idle warm tasks may hold the CPUs);
every write names all of them (`Signal`), so a new batch never hides a wanted one, and
an idle task looks at each once.

The watch costs one open (an NFS GETATTR: an open revalidates cached attributes, where
a stat may be answered from a cache for seconds) per poll of one file per run: every
0.5 ms for the first FAST_PHASE s idle (a round trip's next call is taken at once), then
backing off to 0.11 s: at most 600 metadata operations per idle minute per warm task,
none on the run folder's other files.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from slurmexecutor.folder import spool
from slurmexecutor.folder.diskio import create_exclusive, create_holding

SIGNAL = "batches"
CLOSED = "closed"
#: task indices of tasks that joined a batch start here (array tasks are below)
JOIN_BASE = 1_000_000
FIRST_POLL, MAX_POLL = 0.0005, 0.11
#: idle seconds polled at FIRST_POLL before backing off: the next call of a task farm or
#: of a user waiting on results comes within a few ms (round trips), and is taken at once
FAST_PHASE = 0.015
#: `_joinable`'s verdict on a batch of other resources with work left: this task leaves,
#: so that its CPUs go to that batch's array (`SlurmExecutor.options`)
STEP_ASIDE = "step aside"
TOO_LATE = "too late"  # a chunk of the batch would outlast the task (walltime.py)
#: seconds a batch before the latest announced one may stay unreadable before a warm
#: task looks past it (its writing failed after its number was taken; or a shared
#: filesystem shows it this late, and then its own array runs it)
UNREADABLE_SKIP = 10.0


def resources_key(resources: dict, python: str, setup: list[str], extra: list[str]) -> str:
    """What a batch needs of a task: a task joins only batches with the same key."""
    text = json.dumps([resources, python, setup, extra], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def announce(run_dir: Path, batch: int, wanted: Iterable[int] = ()) -> None:
    """Tell warm tasks batch `batch` is written (after all its files); `wanted`: earlier
    batches that still have chunks nobody runs (their own tasks wait for CPUs idle warm
    tasks may hold): idle tasks look at each of them again."""
    text = " ".join(str(b) for b in [batch, *sorted(wanted)])
    spool.write_atomic(run_dir / SIGNAL, text.encode())


class Signal:
    """The client's side of the signal file: the latest batch written and every earlier
    one still wanted, in each write (a new batch's announcement never hides a wanted one)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.latest, self.wanted = run_dir, -1, set[int]()

    def written(self, batch: int) -> None:
        self.latest = max(self.latest, batch)
        announce(self.run_dir, self.latest, self.wanted)

    def want(self, batch: int) -> None:
        self.wanted.add(batch)
        announce(self.run_dir, max(self.latest, batch), self.wanted)

    def done(self, batch: int) -> None:
        """The batch needs no joiner any more (named again at the next write, not now)."""
        self.wanted.discard(batch)


def close(run_dir: Path) -> None:
    """Tell warm tasks the executor is gone: they exit at their next poll."""
    spool.write_atomic(run_dir / SIGNAL, CLOSED.encode())


class Watcher:
    """A warm task's wait for a batch it can join."""

    def __init__(self, run_dir: Path, key: bytes, after: int, wanted_key: str | None,
                 stopping: Callable[[], bool],
                 fits: Callable[[dict], bool] | None = None) -> None:
        self.run_dir, self.key, self.after = run_dir, key, after
        self.wanted_key, self.stopping = wanted_key, stopping
        self.fits = fits  # whether a chunk of a batch (its manifest) ends in time
        self.too_late: int | None = None  # a batch it left because it could not finish it
        self.polls = 0  # metadata operations on the signal file
        self.stepped_aside: int | None = None  # the batch this task left its CPUs to
        self._unreadable: tuple[int, float] | None = None  # (batch, since when)
        self._wanted_seen: set[int] = set()  # earlier batches asked for, looked at

    def wait(self, seconds: float) -> tuple[int, dict] | None:
        """The next batch to join and its manifest, or None after `seconds` idle, at
        close, when the task is told to stop, or when a batch of other resources waits
        for CPUs (STEP_ASIDE). Every batch after the last one looked at is looked at, in
        order: none is missed when several come at once. Polls start fast after the
        task's own work and back off, also while batches it cannot join go by (idle
        tasks do not all spin at each new batch)."""
        began = time.monotonic()
        deadline, fast_until = began + seconds, began + FAST_PHASE
        interval = FIRST_POLL
        while time.monotonic() < deadline and not self.stopping():
            self.polls += 1
            try:  # open, not stat: an open revalidates NFS's cached attributes
                with open(self.run_dir / SIGNAL, "rb") as handle:
                    text = handle.read().decode(errors="replace").strip()
            except FileNotFoundError:
                text = ""
            if text == CLOSED:
                return None
            words = text.split()
            latest = int(words[0]) if words and words[0].isdigit() else self.after
            for wanted in [int(w) for w in words[1:] if w.isdigit()]:
                if wanted <= self.after and wanted not in self._wanted_seen:
                    verdict = self._joinable(wanted)  # an earlier batch needs a task
                    if verdict is not None:
                        self._wanted_seen.add(wanted)
                    if isinstance(verdict, dict):
                        return wanted, verdict
                    if verdict == TOO_LATE:
                        return None
            while self.after < latest:
                verdict = self._joinable(self.after + 1)
                if verdict is None and not self._give_up_on(self.after + 1, latest):
                    break  # not readable yet: look again at the next poll
                self.after += 1
                if isinstance(verdict, dict):
                    return self.after, verdict
                if verdict == STEP_ASIDE:
                    self.stepped_aside = self.after
                    return None
                if verdict == TOO_LATE:
                    return None
            time.sleep(interval)
            if time.monotonic() >= fast_until:
                interval = min(interval * 1.5, MAX_POLL)
        return None

    def _give_up_on(self, batch: int, latest: int) -> bool:
        """Look past an unreadable batch once a later one is announced and it has stayed
        unreadable for UNREADABLE_SKIP s (else one failed write would stop this task from
        ever joining again)."""
        now = time.monotonic()
        if self._unreadable is None or self._unreadable[0] != batch:
            self._unreadable = (batch, now)
        return batch < latest and now - self._unreadable[1] >= UNREADABLE_SKIP

    def _joinable(self, batch: int) -> dict | bool | str | None:
        """Its manifest if this task can join the batch, False if it never can (no
        stealing, every chunk claimed), STEP_ASIDE for other resources with chunks left,
        None if that is not known yet."""
        try:
            manifest = spool.read_blob(spool.manifest_path(self.run_dir, batch), self.key)
            claimed = sum(1 for name in os.listdir(spool.claims_dir(self.run_dir, batch))
                          if name.isdigit())
        except Exception:  # noqa: BLE001  (not there, or not whole yet)
            return None
        if not manifest["steal"] or claimed >= manifest["chunks"]:
            return False
        if manifest.get("resources") != self.wanted_key:
            return STEP_ASIDE
        if self.fits is not None and not self.fits(manifest):  # its time is nearly up:
            self.too_late = batch  # leave, so that the batch's own array runs it
            return TOO_LATE
        return manifest if self._ticket(batch, manifest["chunks"]) else False

    def _ticket(self, batch: int, chunks: int) -> bool:
        """One of the batch's `chunks` join tickets (`claims/join.K`, O_EXCL): at most
        as many warm tasks join as it has chunks, not every idle one (a lone call would
        otherwise have all of them join, and all but one find nothing)."""
        folder = spool.claims_dir(self.run_dir, batch)
        try:
            return any(create_exclusive(folder / f"join.{k}", b"") for k in range(chunks))
        except OSError:
            return False


def join_stream(run_dir: Path, key: bytes, batch: int, start: tuple) -> int:
    """Create this task's stream in a batch it joins, holding its `start` record from
    the first moment (the client never sees a joined task it cannot name: killed right
    after joining, it is still followed by its Slurm id); return its task index there.
    One listing finds where the free indices begin, so joiners do not all probe from
    the first (each probe costs metadata operations on a shared filesystem)."""
    taken = [parsed[0] for name in os.listdir(spool.batch_dir(run_dir, batch))
             if (parsed := spool.parse_stream_name(name)) is not None]
    first = max([JOIN_BASE - 1, *taken]) + 1
    for index in range(first, first + 100_000):
        path = spool.stream_path(run_dir, batch, index, 0)
        if create_holding(path, spool.encode_record(key, path, start)):
            return index
    raise RuntimeError(f"batch {batch}: no free task index to join it")
