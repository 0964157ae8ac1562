"""The result cache: results of successful calls, kept across clients and kernels.

A call's key (`CallKeys(fn).key(args, kwargs)`) is SHA-256 over the function's
fingerprint (fingerprint.py says exactly what it covers), the call's arguments as
cloudpickle bytes, and the fingerprints of the functions and classes those arguments
contain (cloudpickle pickles those of importable modules by name: without their
fingerprints, a changed function passed as an argument would be a wrong hit). Equal
arguments usually pickle to equal bytes, but not always (a set of strings pickles in
hash order, which differs between processes; an object passed twice pickles
differently from two equal copies; keyword arguments in another order): such a call is
a miss, never a wrong hit. (The functions and classes in arguments are pickled there as
placeholders, so instances of a notebook's classes do hit across kernels.)

    <cache>/                     mode 0700; `<folder>/cache` by default
      key                        the cache's own HMAC key, when it was not given one
      v1/ab/cdef...              one entry per key (sharded by its first 2 hex digits)

An entry is a signed blob (spool.write_blob: HMAC over `v1/ab/cdef...` and the payload,
written atomically) holding the result's pickle as the worker made it; the path inside
the signature binds an entry to its key, so a swapped or moved entry is refused. A
missing entry is a miss; an unreadable, unsigned, corrupt or unpicklable one is a miss
too, with a WARNING (one per `get_many`). Entries are never evicted: `clear()` (or
`slurmexecutor clean --cache`) empties the cache.

Hits per run: the executor appends its counts to `<run>/cache-hits` (`record_hits`);
`slurmexecutor status` sums them (`read_hits`).
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import string
import threading
import types
from collections.abc import Iterable
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import cloudpickle

from slurmexecutor._log import log
from slurmexecutor.errors import IntegrityError
from slurmexecutor.folder import spool
from slurmexecutor.folder.fingerprint import UncacheableError, function_fingerprint

__all__ = [
    "DEFAULT_DIR",
    "HITS_FILE",
    "CacheCounts",
    "CallKeys",
    "ResultCache",
    "UncacheableError",
    "arguments_bytes",
    "call_key",
    "clear_cache",
    "default_cache_dir",
    "function_fingerprint",
    "is_cache",
    "read_hits",
    "record_hits",
]

DEFAULT_DIR = "cache"  # under the executor's folder
ENTRIES = "v1"  # the entries' folder: its name is the entry format's version
HITS_FILE = "cache-hits"  # in a run's folder: one "hits misses" line per record
ENTRY_KIND = "result"
#: a shard with at least this many keys asked is listed once instead of opening each
#: key's entry (on NFS a listing is a few round trips, a missing file one each)
LIST_SHARD_FROM = 8
_HEX = frozenset(string.hexdigits.lower())


def default_cache_dir(folder: Path) -> Path:
    """Where `SlurmExecutor(cache=True)` keeps its cache: `<folder>/cache`."""
    return Path(folder) / DEFAULT_DIR


def call_key(fingerprint: str, pickled_arguments: bytes, code: Iterable[str] = ()) -> str:
    """The cache key of a call: SHA-256 hex of the function's fingerprint, the arguments'
    pickle and the fingerprints of the code in them (`code`). `CallKeys` makes all
    three; pickle the arguments alone, not with a batch's shared arguments (those are
    pickled as references, not content)."""
    digest = sha256(b"slurmexecutor-call-1\0")
    digest.update(fingerprint.encode() + b"\0")
    digest.update(len(pickled_arguments).to_bytes(8, "big") + pickled_arguments)
    for part in code:
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()


def arguments_bytes(args: tuple, kwargs: dict) -> bytes:
    """cloudpickle of `(tuple(args), dict(kwargs))`, as `CallKeys.key` pickles them (but
    without noting the code in them: prefer `CallKeys`)."""
    return cloudpickle.dumps((tuple(args), dict(kwargs)))


class CallKeys:
    """The keys of calls of `fn`, made when they are submitted (one per map or submit:
    the fingerprints of `fn` and of the code in arguments are taken once, here).

    `key(args, kwargs)` cloudpickles `(tuple(args), dict(kwargs))` (the same for submit,
    map and map_reduce, so a call made through one is found through another). Raises
    UncacheableError when `fn` or code in the arguments cannot be fingerprinted, and
    what cloudpickle raises for unpicklable arguments."""

    def __init__(self, fn: Any) -> None:
        self.fingerprint = function_fingerprint(fn)
        self._code: dict[int, str] = {}  # id -> fingerprint of code met in arguments
        self._keep: list[Any] = []  # those objects, so their ids stay theirs

    def key(self, args: tuple, kwargs: dict) -> str:
        buffer = io.BytesIO()
        pickler = _KeyPickler(buffer, self)
        pickler.dump((tuple(args), dict(kwargs)))
        return call_key(self.fingerprint, buffer.getvalue(), pickler.code)

    def code_fingerprint(self, obj: Any) -> str:
        found = self._code.get(id(obj))
        if found is None:
            found = self._code[id(obj)] = function_fingerprint(obj)
            self._keep.append(obj)
        return found


class _KeyPickler(cloudpickle.CloudPickler):
    """cloudpickle whose functions and classes are their fingerprints: each is pickled as
    a numbered placeholder and its fingerprint noted in `code`, in order. The key then
    covers the code of importable ones (pickled by name otherwise), and the pickle does
    not carry the random id cloudpickle gives classes of `__main__` (a notebook's
    instances hit across kernels). These bytes are only hashed, never unpickled."""

    def __init__(self, file: io.BytesIO, keys: CallKeys) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._keys = keys
        self.code: list[str] = []

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (types.FunctionType, type)):
            self.code.append(self._keys.code_fingerprint(obj))
            return repr, (f"slurmexecutor-code-{len(self.code) - 1}",)  # not a type
        return super().reducer_override(obj)


def _check_key(key: str) -> str:
    if len(key) != 64 or not _HEX.issuperset(key):
        raise ValueError(f"not a cache key (64 lowercase hex digits): {key!r}")
    return key


class ResultCache:
    """Signed result entries, one file per key, in `path`.

    `key` is the HMAC key entries are signed with: the executor's folder key, or None
    for the cache's own key file (`<path>/key`, created on first use), which lets a cache
    outside the folder (`cache="PATH"`) serve executors of several folders. Thread-safe.
    """

    def __init__(self, path: Path, key: bytes | None = None) -> None:
        self.path = spool.ensure_private_dir(Path(path).expanduser())
        self._key = key if key is not None else spool.load_key(self.path, create=True)
        self._entries = self.path / ENTRIES
        self._lock = threading.Lock()
        self.hits = 0  # keys found by get_many, since the cache was opened
        self.misses = 0  # keys not found (or unusable)
        self._recorded = (0, 0)  # hits and misses already written by record_hits
        self.last_error: OSError | None = None  # of the last write that failed

    def entry_path(self, key: str) -> Path:
        """The file of one key's entry: `<path>/v1/ab/cdef...`."""
        _check_key(key)
        return self._entries / key[:2] / key[2:]

    # -- reading ---------------------------------------------------------------------

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The cached results of those `keys` that have one: {key: value}. Keys without
        a usable entry are absent (misses); unusable entries are logged once."""
        wanted = list(dict.fromkeys(_check_key(key) for key in keys))
        shards: dict[str, list[str]] = {}
        for key in wanted:
            shards.setdefault(key[:2], []).append(key)
        found: dict[str, Any] = {}
        problems: list[str] = []
        for shard, shard_keys in shards.items():
            folder = self._entries / shard
            if len(shard_keys) >= LIST_SHARD_FROM:
                try:
                    present = set(os.listdir(folder))
                except FileNotFoundError:
                    continue
                except OSError as error:
                    problems.append(f"{folder}: {error}")
                    continue
                shard_keys = [key for key in shard_keys if key[2:] in present]
            for key in shard_keys:
                value = self._read(folder / key[2:], problems)
                if value is not _ABSENT:
                    found[key] = value
        if problems:
            log.warning("%d result cache entr%s could not be used (treated as misses, they "
                        "are run again and rewritten): %s", len(problems),
                        "y" if len(problems) == 1 else "ies", problems[0])
        with self._lock:
            self.hits += len(found)
            self.misses += len(wanted) - len(found)
        return found

    def get(self, key: str) -> tuple[bool, Any]:
        """(True, value) for a hit, (False, None) for a miss."""
        found = self.get_many([key])
        return (True, found[key]) if key in found else (False, None)

    def _read(self, path: Path, problems: list[str]) -> Any:
        try:
            entry = spool.read_blob(path, self._key)
        except FileNotFoundError:
            return _ABSENT
        except Exception as error:  # noqa: BLE001  (IntegrityError, OSError, bad pickle)
            problems.append(f"{path}: {error}")
            return _ABSENT
        if not (isinstance(entry, tuple) and len(entry) == 2 and entry[0] == ENTRY_KIND
                and isinstance(entry[1], bytes)):
            problems.append(f"{path}: not a result entry")
            return _ABSENT
        try:
            return pickle.loads(entry[1])
        except BaseException as error:  # noqa: BLE001  (as outcomes.decode)
            problems.append(f"{path}: the result cannot be unpickled here: {error!r}")
            return _ABSENT

    # -- writing ---------------------------------------------------------------------

    def put(self, key: str, value: Any) -> bool:
        """Store a call's result (cloudpickled here); see `put_pickled`."""
        return self.put_pickled(key, cloudpickle.dumps(value))

    def put_pickled(self, key: str, body: bytes) -> bool:
        """Store a call's result already pickled: the body of the worker's "ok" record
        (`("ok", call_id, body)`, as outcomes.decode reads it), stored as is. A write
        that fails (disk full, read-only, a concurrent clear) returns False, its error in
        `last_error`: the call's result stands, it is only not cached."""
        path = self.entry_path(key)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            spool.write_blob(path, self._key, (ENTRY_KIND, bytes(body)))
        except OSError as error:
            log.info("a result could not be cached in %s: %s", path, error)
            self.last_error = error
            return False
        return True

    def clear(self) -> int:
        """Remove every entry; return how many there were."""
        return clear_cache(self.path)

    # -- counts ----------------------------------------------------------------------

    def record_hits(self, run_dir: Path) -> CacheCounts:
        """Append the hits and misses counted since the last record to the run's
        `cache-hits` file (nothing when there were none); return them."""
        with self._lock:
            hits, misses = self.hits - self._recorded[0], self.misses - self._recorded[1]
            self._recorded = (self.hits, self.misses)
        if hits or misses:
            record_hits(run_dir, hits, misses)
        return CacheCounts(hits, misses)


_ABSENT = object()


def is_cache(path: Path) -> bool:
    """`path` is a result cache: its own key file, or `<folder>/cache` of a folder with
    one (whose key signs it); either key must be a valid one of ours."""
    path = Path(path).expanduser()
    for holder in (path, path.parent if path.name == DEFAULT_DIR else None):
        if holder is not None and (holder / spool.KEY_FILE).is_file():
            try:
                spool.load_key(holder)
                return True
            except (OSError, IntegrityError):
                return False
    return False


def clear_cache(path: Path) -> int:
    """Empty the cache at `path` (its entries; the key stays); return how many entries
    there were. The entries' folder is renamed away first, so readers see an empty
    cache at once; nothing but `<path>/v1` and leftovers of earlier clears is touched."""
    path = Path(path).expanduser()
    trash = path / f".cleared.{os.getpid()}.{os.urandom(4).hex()}"
    try:
        os.rename(path / ENTRIES, trash)
    except FileNotFoundError:
        pass
    removed = 0
    for leftover in path.glob(".cleared.*"):
        removed += sum(1 for _, _, files in os.walk(leftover)
                       for name in files if not name.startswith("."))
        shutil.rmtree(leftover, ignore_errors=True)
    return removed


# -- hits per run ------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheCounts:
    hits: int
    misses: int

    @property
    def lookups(self) -> int:
        return self.hits + self.misses


def record_hits(run_dir: Path, hits: int, misses: int) -> None:
    """Append one `hits misses` line to `<run>/cache-hits` (one writer: the run's
    client)."""
    fd = os.open(Path(run_dir) / HITS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{int(hits)} {int(misses)}\n".encode())
    finally:
        os.close(fd)


def read_hits(run_dir: Path) -> CacheCounts | None:
    """The run's cache hits and misses, summed; None when it never used a cache."""
    try:
        text = (Path(run_dir) / HITS_FILE).read_text()
    except FileNotFoundError:
        return None
    hits = misses = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            hits, misses = hits + int(parts[0]), misses + int(parts[1])
    return CacheCounts(hits, misses)
