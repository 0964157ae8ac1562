#!/usr/bin/env python3
"""The result cache's costs: keys, lookups (misses, half hits, all hits) and writes.

    python benchmarks/cache_lookup.py [--calls 10000] [--dir DIR]

In a fresh cache under DIR (default: a temporary folder), for `--calls` calls of one
function with one small argument each: the fingerprint, the keys (CallKeys: cloudpickle
of the arguments + SHA-256), `get_many` of all keys on an empty cache, after half were stored,
and after all were; `put_pickled` per entry. Each lookup is timed with shards listed
(cache.LIST_SHARD_FROM, the default) and with every entry opened by name.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cloudpickle

from slurmexecutor.folder import cache


def work(x: int) -> int:
    return x * x


def timed(label: str, action):
    started = time.perf_counter()
    result = action()
    print(f"{label:<52} {time.perf_counter() - started:8.3f} s")
    return result


def lookups(store: cache.ResultCache, keys: list[str], label: str) -> None:
    default = cache.LIST_SHARD_FROM
    for mode, threshold in (("listed shards", default), ("opened by name", 10**9)):
        cache.LIST_SHARD_FROM = threshold
        found = timed(f"get_many, {label}, {mode}", lambda: store.get_many(keys))
        print(f"{'':<52} {len(found)} hits")
    cache.LIST_SHARD_FROM = default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="cache-bench-"))
    store = cache.ResultCache(root / "cache")
    print(f"{args.calls} calls, cache in {store.path}")
    calls = timed("CallKeys(fn): the function's fingerprint", lambda: cache.CallKeys(work))
    keys = timed("CallKeys.key for every call", lambda: [
        calls.key((i,), {}) for i in range(args.calls)])
    lookups(store, keys, "empty cache")
    half = args.calls // 2
    timed(f"put_pickled x {half}", lambda: [
        store.put_pickled(key, cloudpickle.dumps(work(i))) for i, key in
        enumerate(keys[:half])])
    lookups(store, keys, "half stored")
    timed(f"put_pickled x {args.calls - half}", lambda: [
        store.put_pickled(key, cloudpickle.dumps(work(i + half))) for i, key in
        enumerate(keys[half:])])
    lookups(store, keys, "all stored")
    timed("clear", store.clear)


if __name__ == "__main__":
    main()
