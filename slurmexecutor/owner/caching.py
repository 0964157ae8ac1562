"""The executor's side of the result cache (`SlurmExecutor(cache=True)`; storage and
keys in cache.py, what a function's fingerprint covers in fingerprint.py).

Callers look their calls up before anything is submitted: a hit is resolved by the owner
thread with the stored result and never reaches Slurm; a miss goes out as usual with its
key, and the owner stores the worker's pickled result as is when the call succeeds
(`store`). Failed, cancelled and lost calls are not stored.

A call's key (cache.CallKeys) covers the function's fingerprint, taken when the call is
submitted (once per submit, map, submit_many or map_reduce), the pickled arguments, and
the fingerprints of every function and class met in them (cloudpickle pickles importable
ones by name only: map_reduce passes the user's function to its fraction runner, and an
argument's class may have changed).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slurmexecutor._log import log
from slurmexecutor.folder.cache import CallKeys, ResultCache, UncacheableError, default_cache_dir
from slurmexecutor.folder.folders import UnsafeFolderError
from slurmexecutor.owner.batches import Settings


def open_cache(option: bool | str | os.PathLike | None, folder: Path,
               key: bytes) -> ResultCache | None:
    """The cache `SlurmExecutor(cache=...)` asks for: True for `<folder>/cache` (signed
    with the folder's key), a path for a cache of its own (with its own key file)."""
    if option is None or option is False:
        return None
    if not (option is True or isinstance(option, (str, os.PathLike))):
        raise TypeError(f"cache must be True, False or a path, not {option!r}")
    path = default_cache_dir(folder) if option is True else Path(option).expanduser()
    try:
        return ResultCache(path, key if option is True else None)
    except UnsafeFolderError:
        raise
    except OSError as error:  # read-only, full, not ours to create: run uncached
        log.warning("the result cache in %s cannot be used (%s): calls run uncached in "
                    "this session", path, error)
        return None


class WorkerKeys(CallKeys):
    """Keys that also cover where the calls run: the workers' interpreter and setup
    lines (a view with another `python=` or `setup=` does not get results computed by
    another environment). Resources (memory, time, partition) are not part of it."""

    def __init__(self, fn: Callable, settings: Settings) -> None:
        super().__init__(fn)
        self.environment = json.dumps([settings.python, settings.setup])

    def key(self, args: tuple, kwargs: dict) -> str:
        digest = hashlib.sha256(super().key(args, kwargs).encode() + b"\0")
        digest.update(self.environment.encode())
        return digest.hexdigest()


class CallCache:
    """Keys of calls and lookups, for one executor (thread-safe)."""

    def __init__(self, store: ResultCache) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        #: results to store: written by a thread of their own, so that the owner does
        #: not wait for a file per result (0.1-1 ms each on a disk, more on NFS)
        self._pending: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._unwritten: dict[str, bytes] = {}  # queued results: lookups see them too
        self.writes_off = False  # a write failed: results are no longer stored

    def keys_for(self, fn: Callable, settings: Settings) -> CallKeys | None:
        """Key maker for calls of `fn` submitted now with these settings (its fingerprint
        is taken here), or None, with one WARNING per function, when it cannot be
        fingerprinted: its calls then run uncached."""
        try:
            return WorkerKeys(fn, settings)
        except (UncacheableError, TypeError, ValueError) as error:
            name = getattr(fn, "__qualname__", repr(fn))
            with self._lock:
                first = name not in self._warned
                self._warned.add(name)
            if first:
                log.warning("calls of %s are not cached: %s", name, error)
            return None

    @staticmethod
    def key(keys: CallKeys, args: tuple, kwargs: dict) -> str | None:
        """A call's key (None when its arguments cannot be keyed: it runs uncached, and
        an unpicklable argument fails as usual when the call is pickled)."""
        try:
            return keys.key(args, kwargs)
        except Exception:  # noqa: BLE001
            return None

    def lookup(self, keys: Sequence[str | None]) -> dict[int, Any]:
        """{position: stored result} for the keys that are hits (results still being
        written included; a key asked twice gets a copy the second time)."""
        with self._lock:
            queued = {k: self._unwritten[k] for k in keys if k in self._unwritten}
        found: dict[str, Any] = {}
        for k, body in queued.items():
            try:
                found[k] = pickle.loads(body)
            except Exception as error:  # noqa: BLE001  (a miss: the call runs again)
                log.info("a queued cache entry cannot be unpickled: %r", error)
        found.update(self.store.get_many({k for k in keys if k is not None} - set(found)))
        hits: dict[int, Any] = {}
        given: set[str] = set()
        for position, key in enumerate(keys):
            if key is not None and key in found:
                hits[position] = copy.deepcopy(found[key]) if key in given else found[key]
                given.add(key)
        return hits

    def store_result(self, key: str, body: bytes) -> None:
        """Store a successful call's result, pickled as the worker sent it (in the
        background: `flush` waits for it)."""
        if self.writes_off:
            return
        if self._writer is None:
            self._writer = threading.Thread(target=self._write, daemon=True,
                                            name="slurmexecutor-cache-writer")
            self._writer.start()
        with self._lock:
            self._unwritten[key] = body
        self._pending.put((key, body))

    def _write(self) -> None:
        while True:
            item = self._pending.get()
            try:
                if item is None:
                    return
                if not self.writes_off and not self.store.put_pickled(*item):
                    self.writes_off = True  # one warning, not one per result
                    log.warning("the result cache in %s cannot store results (%s): no more "
                                "are stored in this session", self.store.path,
                                self.store.last_error)
                with self._lock:
                    self._unwritten.pop(item[0], None)
            finally:
                self._pending.task_done()

    def flush(self) -> None:
        """Wait until every result handed to `store_result` is written; stop the writer."""
        if self._writer is not None:
            self._pending.put(None)
            self._writer.join()
            self._writer = None

    def record(self, run_dir: Path) -> None:
        """Append the hits and misses counted so far to the run's record (for status)."""
        try:
            self.store.record_hits(run_dir)
        except OSError as error:
            log.info("could not record the cache hits: %s", error)
