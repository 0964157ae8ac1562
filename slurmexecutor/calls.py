"""Making calls: `submit`, `map`, `submit_many` and `options`, shared by the executor and
its views (`SlurmExecutor.options(mem="64G")`).

Everything here runs in the caller's thread: it pickles (so a bad argument fails at the
call), builds futures, and puts one request on the owner's queue. A view differs from its
executor only in `_settings` (resources, python, setup, sbatch options): its calls go to
arrays of their own, in the executor's folder, followed by the executor's owner thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any, Protocol

from slurmexecutor.folder import formats
from slurmexecutor.folder.sharing import SharedArguments
from slurmexecutor.owner.bars import CallProgress
from slurmexecutor.owner.batches import BatchSpec, Chunk, Settings, auto_chunksize, dumps
from slurmexecutor.owner.caching import CallCache
from slurmexecutor.owner.dependencies import Dependent, find_futures, snapshot
from slurmexecutor.owner.engine import Engine
from slurmexecutor.owner.futures import ChunkSink, FutureSink, SlurmFuture
from slurmexecutor.owner.handoff import CachedResult, Submit
from slurmexecutor.schedulers.script import validate_extra, validate_resources

#: a map looks at most this many of its first calls for arguments they share (an object
#: passed to every call shows in the first few)
PEEK_MOST = 2_000


class Executing(Protocol):
    """What making calls needs of the executor (executor.py): its owner thread's engine,
    call ids under its lock, its cache, its cancel and shutdown."""

    run_id: str
    _engine: Engine
    _lock: threading.Lock
    _next_call: int
    _cache: CallCache | None

    def _check_open(self) -> None: ...
    def _reserve(self, count: int) -> int: ...
    def _put_launch(self, spec: BatchSpec, sinks: list[FutureSink],
                    cache_keys: dict[int, str] | None = None) -> None: ...
    def _slots_for(self, settings: Settings) -> int: ...
    def _pickled(self, fn: Callable, fingerprint: str | None = None) -> tuple[Any, bytes]: ...
    def cancel(self, futures: Iterable[Future]) -> None: ...
    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None: ...


def callable_name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


class CallMaker:
    """`submit`, `map`, `submit_many` and `options` over an executor and its settings."""

    _executor: Executing
    _settings: Settings

    def options(self, *, python: str | None = None, setup: Iterable[str] | None = None,
                sbatch_extra: Iterable[str] | None = None,
                **resources: Any) -> ExecutorView:
        """A view of this executor whose calls use these resources (sbatch long options
        as keywords, merged over the executor's; `None` removes one), and optionally
        another `python`, `setup` or `sbatch_extra`. It shares the executor's folder,
        owner thread, scheduler polling and shutdown; calls with equal resources still
        go out together, others in arrays of their own."""
        merged = {**self._settings.resources, **resources}
        merged = validate_resources({k: v for k, v in merged.items() if v is not None})
        settings = dataclasses.replace(
            self._settings, resources=merged,
            python=python or self._settings.python,
            setup=self._settings.setup if setup is None else [str(s) for s in setup],
            sbatch_extra=self._settings.sbatch_extra if sbatch_extra is None else (
                validate_extra(list(sbatch_extra))))
        settings.slots = self._executor._slots_for(settings)
        return ExecutorView(self._executor, settings)

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> SlurmFuture:
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        ex, name = self._executor, callable_name(fn)
        inputs = find_futures((args, kwargs))
        arguments = snapshot(args, kwargs, inputs, f"an argument of {name}") if inputs else (
            dumps(formats.stored_calls([args], [kwargs]), f"an argument of {name}"))
        cache = ex._cache
        call_keys = cache.keys_for(fn, self._settings) if cache is not None else None
        fn_key, blob = ex._pickled(fn, call_keys.fingerprint if call_keys else None)
        key, hit = None, {}
        if cache is not None and call_keys is not None and not inputs:
            key = cache.key(call_keys, args, kwargs)
            hit = cache.lookup([key])
        with ex._lock:
            ex._check_open()
            future = SlurmFuture(ex._engine, [ex._next_call])
            ex._next_call += 1
            if inputs:  # waits in the owner's state for its inputs (dependencies.py)
                ex._engine.put(Dependent(future, fn_key, blob, name, arguments,
                                         self._settings, inputs, len(inputs), call_keys))
            elif hit:  # answered by the cache: no job
                ex._engine.put(CachedResult(future, hit[0]))
            else:
                ex._engine.put(Submit(future, fn_key, blob, name, arguments,
                                      self._settings, key))
        return future

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int | None = None, progress: bool | None = None) -> Iterator:
        """Like `Executor.map`: all calls go out now, as one array; results in order.
        Calls with futures among their arguments wait for them, one `submit` each."""
        end_time = None if timeout is None else timeout + time.monotonic()
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        ex, name = self._executor, callable_name(fn)
        with ex._lock:
            ex._check_open()
        count, calls = _zipped(iterables)  # sized inputs are not copied into a list
        bar = CallProgress(count, progress and bool(count), desc=name)
        if not count:
            return _chained_results(ex, [], end_time, bar)
        if _may_hold_futures(iterables):
            calls_list = list(calls)
            if find_futures(calls_list):
                futures = [self.submit(fn, *args) for args in calls_list]
                return _chained_results(ex, futures, end_time, bar, single=True)
            calls = iter(calls_list)
        hits: dict[int, Any] = {}
        keys: list[str | None] | None = None
        total = count
        if ex._cache is not None:  # hits are not submitted (caching.py)
            items = list(calls)
            keys = self._cache_keys(fn, ((args, {}) for args in items))
            hits = ex._cache.lookup(keys) if keys else {}
            if hits:
                for _ in hits:
                    bar.advance(True)
                missing = [i for i in range(total) if i not in hits]
                items = [items[i] for i in missing]
                keys = [keys[i] for i in missing] if keys else None
            count, calls = len(items), iter(items)
        futures = self._map_batch(fn, name, count, calls, chunksize, bar, keys) if (
            count) else []
        results = _chained_results(ex, futures, end_time, bar)
        return _with_hits(results, hits, total, ex, futures, bar) if hits else results

    def _map_batch(self, fn: Callable, name: str, count: int, calls: Iterator[tuple],
                   chunksize: int | None, bar: CallProgress,
                   keys: list[str | None] | None) -> list[SlurmFuture]:
        """Put a map's calls out as one batch of chunks; one future per chunk."""
        ex, settings = self._executor, self._settings
        size = chunksize or settings.chunksize or auto_chunksize(
            count, settings.slots, ex._engine.cost.get((name,)))
        blob = dumps(fn, f"the function {name}")
        chunks, futures = [], []
        sinks: list[FutureSink] = []
        shared = SharedArguments()  # an object passed to many calls: stored once
        peek = list(itertools.islice(calls, min(max(2 * size, 16), PEEK_MOST)))
        shared.find((args, {}) for args in peek)
        calls = itertools.chain(peek, calls)
        first = ex._reserve(count)
        for start in range(0, count, size):
            part = list(itertools.islice(calls, size))
            ids = range(first + start, first + start + len(part))
            future = SlurmFuture(ex._engine, ids)
            sinks.append(ChunkSink(future, ids[0], len(ids), progress=bar))
            chunks.append(Chunk(ids, [(0, dumps(formats.stored_calls(part),
                                                f"an argument of {name}", shared),
                                       len(ids))]))
            futures.append(future)
        spec = BatchSpec("map", [blob], [name], chunks, min(settings.slots, len(chunks)),
                         shared=shared.blobs, settings=settings)
        ex._put_launch(spec, sinks, _keyed(first, keys))
        return futures

    def _cache_keys(self, fn: Callable,
                    calls: Iterable[tuple[tuple, dict]]) -> list[str | None] | None:
        """The calls' cache keys (None: the function cannot be cached)."""
        cache = self._executor._cache
        call_keys = cache.keys_for(fn, self._settings) if cache is not None else None
        if cache is None or call_keys is None:
            return None
        return [cache.key(call_keys, args, kwargs) for args, kwargs in calls]

    def submit_many(self, fn: Callable, calls: Iterable[tuple], *,
                    chunksize: int | None = None,
                    task_per_chunk: bool = False) -> list[SlurmFuture]:
        """Submit `fn(*args)` for each tuple in `calls` now, as one batch, with one
        Future per call and `chunksize` calls per chunk. With `task_per_chunk`, every
        chunk gets an array task of its own, all submitted at once; otherwise tasks
        claim chunks as usual. Calls with futures among their arguments wait for them,
        one `submit` each."""
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        ex, name = self._executor, callable_name(fn)
        with ex._lock:
            ex._check_open()
        listed = [tuple(args) for args in calls]
        if find_futures(listed):
            return [self.submit(fn, *args) for args in listed]
        keys = self._cache_keys(fn, ((args, {}) for args in listed))
        hits = ex._cache.lookup(keys) if ex._cache is not None and keys else {}
        if hits:  # answered by the cache: no job; the rest goes out as one batch
            missing = [i for i in range(len(listed)) if i not in hits]
            rest = iter(self._submit_batch(fn, name, [listed[i] for i in missing],
                                           [keys[i] for i in missing] if keys else None,
                                           chunksize, task_per_chunk))
            return [self._cached_future(hits[i]) if i in hits else next(rest)
                    for i in range(len(listed))]
        return self._submit_batch(fn, name, listed, keys, chunksize, task_per_chunk)

    def _cached_future(self, value: Any) -> SlurmFuture:
        ex = self._executor
        with ex._lock:
            ex._check_open()
            future = SlurmFuture(ex._engine, [ex._next_call])
            ex._next_call += 1
            ex._engine.put(CachedResult(future, value))
        return future

    def _submit_batch(self, fn: Callable, name: str, listed: list[tuple],
                      keys: list[str | None] | None, chunksize: int | None,
                      task_per_chunk: bool) -> list[SlurmFuture]:
        ex = self._executor
        shared = SharedArguments()  # an object passed to many calls: stored once
        shared.find((args, {}) for args in listed)
        arguments = [dumps(formats.stored_calls([args]), f"an argument of {name}", shared)
                     for args in listed]
        if not arguments:
            return []
        blob = dumps(fn, f"the function {name}")
        first = ex._reserve(len(arguments))
        futures = [SlurmFuture(ex._engine, [first + i]) for i in range(len(arguments))]
        settings = self._settings
        size = chunksize or settings.chunksize or auto_chunksize(
            len(arguments), settings.slots, ex._engine.cost.get((name,)))
        chunks = [Chunk([f.call_id for f in futures[s:s + size]],
                        [(0, a, 1) for a in arguments[s:s + size]])
                  for s in range(0, len(arguments), size)]
        planned = len(chunks) if task_per_chunk else min(settings.slots, len(chunks))
        spec = BatchSpec("fractions" if task_per_chunk else "submit", [blob], [name],
                         chunks, planned, steal=not task_per_chunk, shared=shared.blobs,
                         settings=settings)
        ex._put_launch(spec, [FutureSink(f) for f in futures], _keyed(first, keys))
        return futures


class ExecutorView(CallMaker):
    """`SlurmExecutor.options(...)`: the executor's calls with other resources. It has no
    owner thread of its own: `cancel` and `shutdown` are the executor's."""

    def __init__(self, executor: Executing, settings: Settings) -> None:
        self._executor, self._settings = executor, settings

    @property
    def resources(self) -> dict:
        return self._settings.resources

    def cancel(self, futures: Iterable[Future]) -> None:
        self._executor.cancel(futures)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shut the executor down (a view shares its executor's life)."""
        self._executor.shutdown(wait, cancel_futures=cancel_futures)

    def __getattr__(self, name: str) -> Any:  # folder, run_id, backend, key, futures...
        return getattr(self._executor, name)

    def __repr__(self) -> str:
        return f"<ExecutorView of {self._executor.run_id} with {self.resources}>"


def _keyed(first: int, keys: list[str | None] | None) -> dict[int, str] | None:
    """{call id: cache key} for calls numbered from `first`."""
    if not keys:
        return None
    return {first + i: key for i, key in enumerate(keys) if key is not None}


def _with_hits(results: Iterator, hits: dict[int, Any], total: int,
               executor: Executing, futures: list[SlurmFuture],
               bar: CallProgress) -> Iterator:
    """A map's results in order: cached ones from `hits`, the others from `results`.
    Abandoned early (even before `results` started), it stops the calls not yet run."""
    try:
        for position in range(total):
            yield hits[position] if position in hits else next(results)
    finally:
        results.close()  # type: ignore[attr-defined]
        unfinished = [f for f in futures if not f.done()]
        if unfinished:
            executor.cancel(unfinished)
        bar.close()


def _may_hold_futures(iterables: tuple[Iterable, ...]) -> bool:
    """False for inputs that cannot hold futures (ranges, strings, bytes, arrays)."""
    return not all(isinstance(it, (range, str, bytes)) or type(it).__name__ == "ndarray"
                   for it in iterables)


def _zipped(iterables: tuple[Iterable, ...]) -> tuple[int, Iterator[tuple]]:
    """How many calls a map makes, and an iterator over their argument tuples: sized
    inputs (lists, ranges, arrays) are not copied, others are read into a list once."""
    if all(hasattr(it, "__len__") for it in iterables):
        return min(len(it) for it in iterables), zip(*iterables)  # type: ignore[arg-type]
    items = list(zip(*iterables))
    return len(items), iter(items)


def _chained_results(executor: Executing, futures: list[SlurmFuture],
                     end_time: float | None, bar: CallProgress,
                     single: bool = False) -> Iterator:
    """Yield the calls' results in order; raise a call's exception at its position.
    Futures are map chunks ((values, errors by position) each), or one call each
    (`single`).
    Abandoning the iterator stops the calls that have not run yet."""
    try:
        futures.reverse()
        while futures:
            future = futures[-1]
            remaining = None if end_time is None else end_time - time.monotonic()
            if single:
                exc = future.exception(remaining)
                values, errors = [None if exc is not None else future.result()], (
                    {} if exc is None else {0: exc})
                bar.advance(exc is None)
            else:
                values, errors = future.result(remaining)
            futures.pop()
            del future
            values.reverse()  # popped as yielded: nothing here keeps a yielded value
            position = 0  # alive (CPython issue 14406)
            while values:
                if position in errors:
                    raise errors[position]
                position += 1
                yield values.pop()
    finally:
        if futures:
            executor.cancel(futures)
        bar.close()
