"""Arguments many calls of one batch share, pickled and stored once per batch.

`ex.map(f, items, [genome] * n)` passes the same object to every call. Each chunk is one
pickle, so without this `genome` would be written once per chunk. Instead, an argument
object passed to two or more calls of a batch (the same object, by identity) whose
pickle is at least SHARE_MIN_BYTES goes into the batch's `shared` file once; the chunks
refer to it by a persistent id, and each task unpickles it once, when a call first needs
it. Only top-level arguments (positional, keyword values) are looked at.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Iterable
from typing import Any

import cloudpickle

#: an argument shared by calls is stored once when its pickle is at least this big
SHARE_MIN_BYTES = 64 * 1024
_SMALL_TYPES = (int, float, complex, bool, type(None))


class _Pickler(cloudpickle.CloudPickler):
    """cloudpickle's pickler with its reduction table as one dict, copied when the
    pickler is made: the same lookups as cloudpickle's ChainMap of its own table and
    copyreg's, without a Python-level miss for every object of a type in neither (a
    list of 1,000 small objects pickles in about half the time)."""

    def __init__(self, file: io.BytesIO) -> None:
        self.dispatch_table = _one_table()
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)


def _one_table() -> dict:
    """cloudpickle's table of reductions (a ChainMap: its own, then copyreg's) as one
    dict: `update` from the last map to the first (2 us, where `dict(chainmap)` takes
    20 us: a Python-level lookup per key)."""
    table: dict = {}
    for reductions in reversed(cloudpickle.CloudPickler.dispatch_table.maps):
        table.update(reductions)
    return table


class _SharingPickler(_Pickler):
    def __init__(self, file: io.BytesIO, shared: dict[int, int]) -> None:
        super().__init__(file)
        self._shared = shared

    def persistent_id(self, obj: Any) -> int | None:
        return self._shared.get(id(obj))


def dumps(obj: Any) -> bytes:
    """`cloudpickle.dumps(obj)`, faster for many objects of classes (see `_Pickler`)."""
    buffer = io.BytesIO()
    _Pickler(buffer).dump(obj)
    return buffer.getvalue()


class SharedArguments:
    """The shared objects of one batch: their pickles, and their ids for the pickler."""

    def __init__(self) -> None:
        self.blobs: list[bytes] = []
        self._index: dict[int, int] = {}  # id(object) -> its position in blobs
        self._keep: list[Any] = []  # the objects, so their ids stay theirs

    def find(self, calls: Iterable[tuple[tuple, dict]]) -> None:
        """Register the big arguments passed to more than one of `calls`."""
        seen: dict[int, int] = {}
        objects: dict[int, Any] = {}
        for args, kwargs in calls:
            for value in (*args, *kwargs.values()):
                if isinstance(value, _SMALL_TYPES) or id(value) in self._index:
                    continue
                seen[id(value)] = seen.get(id(value), 0) + 1
                objects[id(value)] = value
        for key, count in seen.items():
            if count > 1:
                value = objects[key]
                blob = dumps(value)
                if len(blob) >= SHARE_MIN_BYTES:
                    self.add(value, blob)

    def add(self, value: Any, blob: bytes) -> int:
        self._index[id(value)] = len(self.blobs)
        self.blobs.append(blob)
        self._keep.append(value)
        return self._index[id(value)]

    def dumps(self, obj: Any) -> bytes:
        """cloudpickle `obj`, with the shared objects replaced by references."""
        if not self._index:
            return dumps(obj)
        buffer = io.BytesIO()
        _SharingPickler(buffer, self._index).dump(obj)
        return buffer.getvalue()


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, resolve: Callable[[int], Any]) -> None:
        super().__init__(file)
        self._resolve = resolve

    def persistent_load(self, pid: Any) -> Any:
        return self._resolve(pid)


class SharedObjects:
    """The worker's (or a retry's) view of a batch's shared file: each object unpickled
    once, on first use."""

    def __init__(self, load_blobs: Callable[[], list[bytes]]) -> None:
        self._load_blobs = load_blobs
        self._blobs: list[bytes] | None = None
        self.objects: dict[int, Any] = {}

    def get(self, index: int) -> Any:
        if index not in self.objects:
            if self._blobs is None:
                self._blobs = self._load_blobs()
            self.objects[index] = pickle.loads(self._blobs[index])
        return self.objects[index]

    def loads(self, blob: bytes) -> Any:
        return _Unpickler(io.BytesIO(blob), self.get).load()

    def as_shared(self) -> SharedArguments:
        """The same references for re-pickling (a retry): objects loaded so far keep
        their positions."""
        shared = SharedArguments()
        if self._blobs is None and not self.objects:
            return shared
        blobs = self._blobs if self._blobs is not None else self._load_blobs()
        shared.blobs = list(blobs)
        for index, value in self.objects.items():
            shared._index[id(value)] = index
            shared._keep.append(value)
        return shared
