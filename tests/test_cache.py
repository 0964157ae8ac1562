"""The result cache's storage half: function fingerprints, call keys, signed entries,
clearing, hits per run, and the CLI's `clean --cache` and status (no Slurm needed)."""

from __future__ import annotations

import functools
import importlib
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import cloudpickle
import pytest

from slurmexecutor import SlurmExecutor
from slurmexecutor.apps.cli import main as cli_main
from slurmexecutor.folder import cache
from slurmexecutor.folder.cache import CallKeys, ResultCache, UncacheableError, function_fingerprint

fingerprint = function_fingerprint


def key_of(fn, *args, **kwargs) -> str:
    return CallKeys(fn).key(args, kwargs)


# -- fingerprints ------------------------------------------------------------------------

MODULE = """
import dataclasses, enum, functools
import {helper}

SCALE = {scale}
TAGS = {{"alpha", "beta", "gamma", "delta"}}
TABLE = {{"a": 1, "b": [1, 2, frozenset({{"x", "y", "z"}})]}}

def helper(x):
    return x * SCALE

def f(x):
    if x in {{"u", "v", "w"}}:
        return 0
    return helper(x) + len(TAGS) + len(TABLE) + {helper}.g(x)

def fact(n):
    return 1 if n <= 1 else n * fact(n - 1)

def make_adder(n):
    return lambda x: x + n

class Color(enum.Enum):
    RED = 1

@dataclasses.dataclass
class Model:
    w: int
    tags: set = dataclasses.field(default_factory=lambda: {{"p", "q", "r"}})

    def predict(self, x):
        return self.w * x + len(self.tags) + Color.RED.value

    def __call__(self, x):
        return self.predict(x)

OBJECTS = {{
    "f": f, "fact": fact, "closure": make_adder(3), "lambda": lambda x: x - 1,
    "partial": functools.partial(f, 2), "method": Model(2).predict, "callable": Model(5),
    "abs": abs, "class": Model,
}}
"""


def write_module(where: Path, name: str, scale: int = 3, helper_body: str = "x + 1",
                 padding: str = "") -> None:
    (where / f"{name}_helper.py").write_text(f"def g(x):\n    return {helper_body}\n")
    (where / f"{name}.py").write_text(padding + MODULE.format(helper=f"{name}_helper",
                                                             scale=scale))


def load(where: Path, name: str) -> dict:
    """(Re)import the module and its helper from `where`; its fingerprints by name."""
    if str(where) not in sys.path:
        sys.path.insert(0, str(where))
    importlib.invalidate_caches()
    for module in (f"{name}_helper", name):
        sys.modules.pop(module, None)
    objects = importlib.import_module(name).OBJECTS
    return {label: fingerprint(obj) for label, obj in objects.items()}


@pytest.fixture
def module_dir(tmp_path):
    name = f"fpmod_{uuid.uuid4().hex[:8]}"
    write_module(tmp_path, name)
    yield tmp_path, name
    if str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))
    for module in (f"{name}_helper", name):
        sys.modules.pop(module, None)


def test_same_source_same_fingerprints_and_keys_in_new_processes_whatever_the_hash_seed(
        module_dir):
    where, name = module_dir
    here = load(where, name)
    script = where / "notebook.py"  # functions of __main__, as in a notebook kernel
    script.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(where)!r})
        from slurmexecutor.folder.cache import CallKeys, function_fingerprint as fp
        import {name} as module
        SEEDS = {{"a", "b", "c", "d", "e"}}
        def local(x):
            return x in SEEDS and x in {{"k", "l", "m"}}
        class Point:  # cloudpickle gives a class of __main__ a random id
            def __init__(self, x):
                self.x = x
        out = {{label: fp(obj) for label, obj in module.OBJECTS.items()}}
        out["__main__"] = fp(local)
        out["key"] = CallKeys(local).key((Point(1), module.Model(2, ["p"]), module.f), {{"y": 3}})
        print(json.dumps(out))
    """))
    results = []
    for seed in ("1", "2"):  # string hashes, set orders differ between the two
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}, timeout=60,
                              check=True)
        results.append(json.loads(done.stdout))
    assert results[0] == results[1]
    assert {label: results[0][label] for label in here} == here
    assert len(set(here.values())) == len(here)  # all distinct


def test_a_changed_body_constant_or_helper_changes_the_fingerprint(module_dir):
    where, name = module_dir
    before = load(where, name)
    write_module(where, name, padding="\n# moved down by a comment and blank lines\n\n")
    assert load(where, name) == before  # line numbers are not covered
    write_module(where, name, scale=4)  # a global constant f's helper reads
    changed = load(where, name)
    assert changed["f"] != before["f"] and changed["partial"] != before["partial"]
    assert changed["fact"] == before["fact"] and changed["method"] == before["method"]
    write_module(where, name, helper_body="x + 2")  # helper module's function, via attribute
    before = load(where, name)
    assert before["f"] != changed["f"]
    source = (where / f"{name}.py").read_text()
    (where / f"{name}.py").write_text(source.replace("self.w * x", "self.w * x * 2"))
    changed = load(where, name)  # a method body: the method, the callable, the class
    assert {label for label in before if changed[label] != before[label]} == {
        "method", "callable", "class"}


def _body_a(x):
    return x + 1


def _body_b(x):
    return x + 2


def test_functions_closures_lambdas_partials():
    assert fingerprint(_body_a) == fingerprint(_body_a)
    assert fingerprint(_body_a) != fingerprint(_body_b)

    def make(n):
        return lambda x: x + n

    assert fingerprint(make(1)) == fingerprint(make(1))
    assert fingerprint(make(1)) != fingerprint(make(2))
    assert fingerprint(lambda x: x + 1) != fingerprint(lambda x: x + 2)
    assert fingerprint(lambda x: x * 2) == fingerprint(lambda x: x * 2)
    assert fingerprint(functools.partial(_body_a, 1)) == fingerprint(
        functools.partial(_body_a, 1))
    assert fingerprint(functools.partial(_body_a, 1)) != fingerprint(
        functools.partial(_body_a, 2))
    assert fingerprint(functools.partial(_body_a, 1)) != fingerprint(
        functools.partial(_body_b, 1))


class _Scaler:
    def __init__(self, factor):
        self.factor = factor

    def scale(self, x):
        return x * self.factor

    def __call__(self, x):
        return self.scale(x)


def test_bound_methods_callable_objects_and_builtins():
    assert fingerprint(_Scaler(2).scale) == fingerprint(_Scaler(2).scale)
    assert fingerprint(_Scaler(2).scale) != fingerprint(_Scaler(3).scale)
    assert fingerprint(_Scaler(2)) != fingerprint(_Scaler(3))
    assert fingerprint(_Scaler(2)) != fingerprint(_Scaler(2).scale)
    names = [abs, len, math.sqrt, math.floor, str.upper, os.path.join, [1].append,
             [2].append]
    prints = [fingerprint(fn) for fn in names]
    assert len(set(prints)) == len(prints)
    assert prints == [fingerprint(fn) for fn in names]


def test_decorated_functions_and_big_globals():
    def cached(body):
        namespace: dict = {"functools": functools}
        exec(f"@functools.lru_cache\ndef f(x):\n    return {body}\n", namespace)  # noqa: S102
        return namespace["f"]

    assert fingerprint(cached("x + 1")) == fingerprint(cached("x + 1"))
    assert fingerprint(cached("x + 1")) != fingerprint(cached("x + 2"))
    big = list(range(100_000))

    def uses_big():
        return big

    before = fingerprint(uses_big)
    big[50_000] = -1
    assert fingerprint(uses_big) != before


def test_recursion_and_deep_values():
    def even(n):
        return n == 0 or odd(n - 1)

    def odd(n):
        return n != 0 and even(n - 1)

    assert fingerprint(even) == fingerprint(even) != fingerprint(odd)
    deep: list = []
    for _ in range(10_000):
        deep = [deep]

    def uses_deep():
        return deep

    with pytest.raises(UncacheableError):
        fingerprint(uses_deep)


def test_call_keys():
    assert key_of(_body_a, 1) == key_of(_body_a, 1)
    assert len({key_of(_body_a, 1), key_of(_body_a, 2), key_of(_body_b, 1),
                key_of(_body_a, x=1)}) == 4
    assert len(key_of(_body_a, 1)) == 64


def test_call_keys_cover_code_passed_as_arguments(module_dir):
    """cloudpickle pickles an importable function or class by name: a changed body of
    one passed as an argument must still change the key."""
    where, name = module_dir
    load(where, name)
    module = sys.modules[name]
    before = (key_of(map, module.helper, [1]), key_of(_body_a, module.Model(2)))
    assert before == (key_of(map, module.helper, [1]), key_of(_body_a, module.Model(2)))
    source = (where / f"{name}.py").read_text()
    (where / f"{name}.py").write_text(source.replace("return x * SCALE", "return -x")
                                      .replace("self.w * x", "self.w - x"))
    load(where, name)
    module = sys.modules[name]
    after = (key_of(map, module.helper, [1]), key_of(_body_a, module.Model(2)))
    assert after[0] != before[0] and after[1] != before[1]


# -- the store --------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path) -> ResultCache:
    return ResultCache(tmp_path / "cache", b"k" * 32)


@pytest.mark.parametrize("list_from", [1, 10**9])  # shards listed, or each entry opened
def test_put_and_get_many(store, tmp_path, monkeypatch, list_from):
    monkeypatch.setattr(cache, "LIST_SHARD_FROM", list_from)
    keys = [key_of(_body_a, i) for i in range(300)]
    for i, key in enumerate(keys[:150]):
        if i % 2:
            assert store.put(key, {"value": i})
        else:
            assert store.put_pickled(key, cloudpickle.dumps({"value": i}))  # as the worker
    found = store.get_many(keys + keys[:5])
    assert found == {key: {"value": i} for i, key in enumerate(keys[:150])}
    assert store.get(keys[0]) == (True, {"value": 0}) and store.get(keys[-1]) == (False, None)
    assert (store.hits, store.misses) == (151, 151)
    entry = store.entry_path(keys[0])
    assert entry == tmp_path / "cache" / "v1" / keys[0][:2] / keys[0][2:]
    assert oct(entry.stat().st_mode & 0o777) == "0o600"
    assert oct(entry.parent.stat().st_mode & 0o777) == "0o700"
    assert store.put(keys[0], None) and store.get(keys[0]) == (True, None)  # overwritten
    with pytest.raises(ValueError):
        store.get_many(["../../etc/passwd"])


def test_an_unusable_entry_is_a_miss_with_one_warning(store, caplog):
    keys = [key_of(_body_a, i) for i in range(6)]
    for key in keys:
        store.put(key, "good")
    paths = [store.entry_path(key) for key in keys]
    data = bytearray(paths[0].read_bytes())
    data[-3] ^= 0xFF
    paths[0].write_bytes(bytes(data))  # corrupted
    paths[1].write_bytes(paths[1].read_bytes()[:-5])  # truncated
    paths[2].write_bytes(paths[3].read_bytes())  # another key's entry, swapped in
    ResultCache(store.path, b"x" * 32).put(keys[4], "forged")  # signed with another key
    store.put_pickled(keys[5], b"not a pickle")
    with caplog.at_level(logging.WARNING, logger="slurmexecutor"):
        found = store.get_many(keys)
    assert found == {keys[3]: "good"}
    [record] = [r for r in caplog.records if r.name == "slurmexecutor"]
    assert record.levelno == logging.WARNING and "5 result cache entries" in record.message
    store.put(keys[0], "again")  # the call ran again: its entry is rewritten
    assert store.get(keys[0]) == (True, "again")


def test_own_key_and_a_moved_cache(tmp_path):
    first = ResultCache(tmp_path / "a")  # its own key file
    assert (tmp_path / "a" / "key").exists()
    key = key_of(_body_a, 1)
    first.put(key, 42)
    (tmp_path / "a").rename(tmp_path / "b")
    assert ResultCache(tmp_path / "b").get(key) == (True, 42)


def test_clear(tmp_path):
    store = ResultCache(tmp_path / "cache")
    keys = [key_of(_body_a, i) for i in range(10)]
    for key in keys:
        store.put(key, 1)
    key_file = (store.path / "key").read_bytes()
    assert store.clear() == 10
    assert store.get_many(keys) == {}
    assert (store.path / "key").read_bytes() == key_file  # the key stays
    assert store.clear() == 0 and cache.clear_cache(store.path / "nothing") == 0
    store.put(keys[0], 2)
    assert store.get(keys[0]) == (True, 2)


def test_hits_per_run(store, tmp_path):
    assert cache.read_hits(tmp_path) is None
    keys = [key_of(_body_a, i) for i in range(5)]
    store.put(keys[0], 1)
    store.get_many(keys)
    assert store.record_hits(tmp_path) == cache.CacheCounts(1, 4)
    assert store.record_hits(tmp_path) == cache.CacheCounts(0, 0)  # nothing new
    store.get_many(keys[:1])
    store.record_hits(tmp_path)
    assert cache.read_hits(tmp_path) == cache.CacheCounts(2, 4)
    assert (tmp_path / cache.HITS_FILE).read_text() == "1 4\n1 0\n"


# -- the command ---------------------------------------------------------------------


def test_clean_cache_command(tmp_path, capsys):
    folder = tmp_path / "spool"
    store = ResultCache(cache.default_cache_dir(folder), b"k" * 32)
    for i in range(3):
        store.put(key_of(_body_a, i), i)
    assert cli_main(["--folder", str(folder), "clean", "--cache"]) == 0
    assert "3 result(s) removed" in capsys.readouterr().out
    assert store.get_many([key_of(_body_a, i) for i in range(3)]) == {}
    elsewhere = ResultCache(tmp_path / "elsewhere")
    elsewhere.put(key_of(_body_a, 1), 1)
    assert cli_main(["--folder", str(folder), "clean", "--cache-dir",
                     str(tmp_path / "elsewhere")]) == 0
    assert "1 result(s) removed" in capsys.readouterr().out
    assert cli_main(["--folder", str(tmp_path / "none"), "clean", "--cache"]) == 0
    assert "no result cache" in capsys.readouterr().out


def test_status_shows_cache_hits_per_run(tmp_path, capsys):
    folder = tmp_path / "spool"
    run_dirs = []
    for _ in range(2):
        with SlurmExecutor(folder, backend="local", keep_alive=0) as executor:
            assert executor.submit(abs, -3).result() == 3
        run_dirs.append(executor.run_dir)
    cache.record_hits(run_dirs[1], 7, 2)
    cache.record_hits(run_dirs[1], 1, 0)
    assert cli_main(["--folder", str(folder), "status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    column = lines[0].split().index("CACHED")
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[run_dirs[0].name][column + 1] == "-"  # CREATED is two words
    assert rows[run_dirs[1].name][column + 1] == "8"
    assert cli_main(["--folder", str(folder), "status", run_dirs[1].name]) == 0
    assert "result cache: 8 call(s) found in it (not run), 2 not" in capsys.readouterr().out
