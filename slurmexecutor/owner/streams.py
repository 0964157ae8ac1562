"""Reading the result streams of live tasks for the owner thread (engine.py).

One scandir per live batch's folder finds the streams that grew: finished batches are
never listed again, so a round costs what is live, not the run's history. A task whose
stream is known is looked at by name (one stat) between listings of its folder, which
come every `LISTING` s (a new attempt's stream shows up then): many warm tasks idle in
as many finished batches' folders cost a stat each, not a listing each. Streams of tasks the scheduler says
have ended are also opened by name and read to their end: an open revalidates NFS's
cached attributes (close-to-open consistency), while a cached listing or size may hide
what a compute node wrote last.

An I/O error on one folder or stream (a permission changed, NFS's ESTALE or EIO) never
stops the owner: it is retried at the next rounds with one warning, and only when a
stream stays unreadable (`give_up_after` s and `give_up_errors` tries) does its task
fail, with the error named. Meanwhile a round is not a complete read (no `StreamsRead`),
so no ended task is judged to have left no result.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

from slurmexecutor._log import log
from slurmexecutor.core.events import Event, Records, StreamFound, StreamsRead, StreamState
from slurmexecutor.folder import spool
from slurmexecutor.folder.warm import JOIN_BASE

TaskKey = tuple[int, int]  # (batch, task)
#: seconds between listings of the folders of tasks whose streams are known
LISTING = 0.5
#: records taken from one stream per read: a task that wrote 100,000 results since the
#: last read is taken in parts (the owner reads on at once), so the client never holds
#: them all as events at the same time
RECORDS_PER_READ = 2_000


class StreamReader:
    """Cursors over a run's result streams; `read` turns new records into events."""

    give_up_after, give_up_errors = 30.0, 5  # then the stream's task fails

    def __init__(self, run_dir: Path, key: bytes, listing: float = LISTING) -> None:
        self.run_dir, self.key, self.listing = run_dir, key, listing
        self._cursors: dict[str, spool.StreamCursor] = {}
        self._names: dict[TaskKey, list[str]] = {}  # a task's streams (one per attempt)
        self._failing: dict[str, tuple[float, int]] = {}  # path -> first error, errors
        self._found: set[TaskKey] = set()  # joined streams reported (StreamFound: once)
        self._next_listing = 0.0  # when known tasks' folders are listed again

    def _failed(self, name: str, error: OSError) -> str | None:
        """Note a failed read of `name` (a stream or a folder): warn once, and return
        the error to fail its task with once it has lasted long enough."""
        now = time.monotonic()
        first, count = self._failing.get(name, (now, 0))
        self._failing[name] = (first, count + 1)
        if not count:
            log.warning("slurmexecutor: cannot read %s (%s); retrying", name, error)
        if count + 1 >= self.give_up_errors and now - first >= self.give_up_after:
            return f"{name} could not be read for {now - first:.0f} s: {error!r}"
        return None

    def read(self, live: Iterable[TaskKey], ended: Iterable[TaskKey],
             batches: Iterable[int] = ()) -> list[Event]:
        """Events for what the streams of `live` tasks gained, then `StreamsRead`.
        `ended`: the live tasks Slurm says have ended (opened by name as well);
        `batches`: live batches, whose folders are listed even without live tasks (a
        warm task may join them: `StreamFound`)."""
        started = time.monotonic()
        live = set(live)
        fresh: dict[str, TaskKey] = {}  # stream path -> its task, to read now
        events: list[Event] = []
        unread = False
        listing = started >= self._next_listing
        if listing:
            self._next_listing = started + self.listing
        folders = {b for b, t in live if listing or (b, t) not in self._names} | set(batches)
        for key in live:  # the others: by name
            if key[0] not in folders:
                for name in self._names[key]:
                    self._grown(name, key, fresh)
        for batch in sorted(folders):
            folder = str(spool.batch_dir(self.run_dir, batch))
            try:
                self._list(batch, live, fresh, events)
            except FileNotFoundError:
                continue
            except OSError as error:  # its tasks' streams are read by name once ended
                self._failed(folder, error)
                continue
            self._failing.pop(folder, None)
        for key in ended:
            first = str(spool.stream_path(self.run_dir, key[0], key[1], 0))
            for name in self._names.get(key) or [first]:
                fresh.setdefault(name, key)
        for name, (batch, task) in fresh.items():
            cursor = self._cursors.get(name) or spool.StreamCursor(Path(name))
            try:
                records = spool.read_records(cursor, self.key, RECORDS_PER_READ)
            except OSError as error:
                if (given_up := self._failed(name, error)) is not None:
                    events.append(StreamState(batch, task, given_up, None))
                else:
                    unread = True  # not a read of the folder the core may judge by
                continue
            self._failing.pop(name, None)
            if name not in self._cursors and (cursor.opened or cursor.error):
                self._cursors[name] = cursor  # it exists: follow it from now on
                self._names.setdefault((batch, task), []).append(name)
            attempt = _attempt(name)
            if records:
                events.append(Records(batch, task, records, attempt))
            unread |= cursor.more  # read on at once: not a complete read yet
            truncated = (f"{cursor.path} is truncated ({cursor.pending_bytes} bytes of an "
                         f"incomplete record at byte {cursor.offset})"
                         ) if cursor.pending_bytes else None
            events.append(StreamState(batch, task, cursor.error, truncated, cursor.opened,
                                      attempt))
        if not unread:
            events.append(StreamsRead(started))
        return events

    def _list(self, batch: int, live: set[TaskKey], fresh: dict[str, TaskKey],
              events: list[Event]) -> None:
        """One listing of a batch's folder: streams that grew, and joiners."""
        for entry in os.scandir(spool.batch_dir(self.run_dir, batch)):
            parsed = spool.parse_stream_name(entry.name)
            if parsed is not None and parsed[0] >= JOIN_BASE and (
                    (batch, parsed[0]) not in live) and (batch, parsed[0]) not in self._found:
                self._found.add((batch, parsed[0]))
                events.append(StreamFound(batch, parsed[0]))
            if parsed is None or (batch, parsed[0]) not in live:
                continue
            cursor = self._cursors.get(entry.path)
            if cursor is None or entry.stat().st_size > cursor.offset:
                fresh[entry.path] = (batch, parsed[0])

    def _grown(self, name: str, key: TaskKey, fresh: dict[str, TaskKey]) -> None:
        """A known stream is read if it grew (or cannot be looked at: the read says why)."""
        cursor = self._cursors.get(name)
        try:
            grown = cursor is None or os.stat(name).st_size > cursor.offset
        except OSError:
            grown = True
        if grown:
            fresh[name] = key

    def forget(self, batch: int, keep: Iterable[TaskKey] = ()) -> None:
        """A finished batch: drop its cursors (but those of its tasks in `keep`, warm
        tasks followed until their `end` record)."""
        folder = str(spool.batch_dir(self.run_dir, batch))
        for name in [n for n in self._failing if n == folder or n.startswith(folder + "/")]:
            del self._failing[name]
        self._found = {k for k in self._found if k[0] != batch}
        kept = set(keep)
        for key in [k for k in self._names if k[0] == batch and k not in kept]:
            for name in self._names.pop(key):
                self._cursors.pop(name, None)


def _attempt(path: str) -> int:
    """The attempt a stream's name says (`tIIII.rA.out`: A, Slurm's restart count)."""
    parsed = spool.parse_stream_name(os.path.basename(path))
    return parsed[1] if parsed else 0
