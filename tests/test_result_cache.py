"""The result cache through the executor (issue 12): hits resolve without a job, also in
a new client process; half-cached maps submit only the rest; a changed function body,
a failed or a cancelled call is not a hit; a corrupt entry is a miss with a WARNING.
Storage, keys and fingerprints alone: tests/test_cache.py."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from slurmexecutor import JobCancelledError, SlurmExecutor, map_reduce
from slurmexecutor.folder import formats, spool


def square(x):
    return x * x


def boom(x):
    raise ValueError(f"boom {x}")


def submitted_calls(ex) -> int:
    """How many calls the run handed to the cluster."""
    return sum(len(formats.expand_ids(chunk)) for journal in spool.read_journals(ex.run_dir)
               for chunk in journal["chunks"])


@pytest.fixture
def cached(make_executor):
    def make(**options):
        return make_executor(cache=True, **options)
    return make


def test_hits_resolve_without_a_job_and_half_cached_maps_submit_the_rest(cached):
    first = cached()
    assert list(first.map(square, range(10))) == [x * x for x in range(10)]
    first.shutdown()
    second = cached()
    assert list(second.map(square, range(15))) == [x * x for x in range(15)]
    assert submitted_calls(second) == 5  # only the 5 new ones
    assert second.submit(square, 3).result(timeout=60) == 9
    futures = second.submit_many(square, [(2,), (20,)])
    assert [f.result(timeout=120) for f in futures] == [4, 400]
    assert submitted_calls(second) == 6
    assert map_reduce(square, range(10), 3, reducer=sum, executor=second) == 285
    before = submitted_calls(second)
    assert map_reduce(square, range(10), 3, reducer=sum, executor=second) == 285
    assert submitted_calls(second) == before  # the fractions were hits
    assert second.submit(square, second.submit(square, 3)).result(timeout=120) == 81


def test_failed_and_cancelled_calls_are_not_cached(cached):
    ex = cached(submit_window=5, max_window=10)
    assert isinstance(ex.submit(boom, 1).exception(timeout=120), ValueError)
    waiting = ex.submit(square, 12)
    assert waiting.cancel()
    ex.shutdown()
    again = cached()
    assert isinstance(again.submit(boom, 1).exception(timeout=120), ValueError)
    assert again.submit(square, 12).result(timeout=120) == 144
    assert submitted_calls(again) == 2


def test_a_corrupt_entry_is_a_miss_with_a_warning(cached, caplog):
    ex = cached()
    assert ex.submit(square, 7).result(timeout=120) == 49
    ex.shutdown()
    entries = [p for p in (ex.folder / "cache").rglob("*") if p.is_file() and
               p.name != "key" and p.parent.name != "cache"]
    assert len(entries) == 1
    data = bytearray(entries[0].read_bytes())
    data[-1] ^= 0xFF
    entries[0].write_bytes(bytes(data))
    again = cached()
    with caplog.at_level(logging.WARNING, logger="slurmexecutor"):
        assert again.submit(square, 7).result(timeout=120) == 49
    assert any("could not be used" in r.getMessage() for r in caplog.records)
    assert submitted_calls(again) == 1


CLIENT = textwrap.dedent("""
    import sys
    from slurmexecutor import SlurmExecutor
    from slurmexecutor.folder import spool

    def step(x):
        return x + {increment}

    with SlurmExecutor(sys.argv[1], backend=sys.argv[2], cache=sys.argv[3],
                       keep_alive=0, poll_interval=0.1) as ex:
        print(list(ex.map(step, range(6))))
    print(sum(len(j["arrays"]) for j in spool.read_journals(ex.run_dir)))
""")


def test_a_new_client_process_hits_and_a_changed_body_misses(backend, tmp_path):
    script = tmp_path / "client.py"
    cache_dir = tmp_path / "elsewhere"  # cache="PATH": outside the executor's folder

    def run(increment: int) -> tuple[str, int]:
        script.write_text(CLIENT.format(increment=increment))
        done = subprocess.run([sys.executable, str(script), str(tmp_path / "spool"), backend,
                               str(cache_dir)], capture_output=True, text=True, timeout=180,
                              cwd=tmp_path, stdin=subprocess.DEVNULL, check=False)
        assert done.returncode == 0, done.stderr
        results, arrays = done.stdout.split("\n")[:2]
        return results, int(arrays)

    assert run(1) == (str([x + 1 for x in range(6)]), 1)
    assert run(1) == (str([x + 1 for x in range(6)]), 0)  # all hits: no array at all
    assert run(2) == (str([x + 2 for x in range(6)]), 1)  # a changed body is a miss
    assert (cache_dir / "key").exists()
    done = subprocess.run([sys.executable, "-m", "slurmexecutor", "--folder",
                           str(tmp_path / "spool"), "clean", "--cache-dir", str(cache_dir)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert run(2)[1] == 1  # emptied: computed again


def test_bad_cache_option_is_a_clear_error(tmp_path):
    with pytest.raises(TypeError, match="cache must be True, False or a path"):
        SlurmExecutor(tmp_path, backend="local", cache=3)
    assert not list(tmp_path.glob("2*"))  # no run was created
    assert Path(tmp_path).exists()


def make_scaled():
    factor = [1]

    def scaled(x):
        return x * factor[0]
    return scaled, factor


def test_a_closure_changed_within_a_window_is_not_stored_under_the_new_code(cached):
    """Closures are pickled by value, once per window and fingerprint: a change between
    two submits of one window reaches the second call, and its result is stored under
    the new fingerprint only."""
    ex = cached(submit_window=2, max_window=5)
    scaled, factor = make_scaled()
    first = ex.submit(scaled, 5)
    factor[0] = 3
    second = ex.submit(scaled, 5)
    assert (first.result(timeout=120), second.result(timeout=120)) == (5, 15)
    ex.shutdown()
    again = cached()
    other, other_factor = make_scaled()
    other_factor[0] = 3
    assert again.submit(other, 5).result(timeout=60) == 15  # a hit, with the new code
    other_factor[0] = 1
    assert again.submit(other, 5).result(timeout=60) == 5  # a hit, with the old
    assert submitted_calls(again) == 0


def test_dependent_calls_are_cached_and_an_abandoned_map_stops_the_rest(cached):
    ex = cached()
    assert ex.submit(square, ex.submit(square, 2)).result(timeout=120) == 16
    assert list(ex.map(sleepy_square, range(2))) == [0, 1]
    ex.shutdown()
    again = cached(submit_window=30, max_window=60)
    assert again.submit(square, again.submit(square, 2)).result(timeout=60) == 16
    assert submitted_calls(again) == 0  # both were hits
    cancelled = []
    cancel = again.cancel
    again.cancel = lambda futures: (cancelled.extend(futures), cancel(futures))
    results = again.map(sleepy_square, [0, 1, 30, 31])  # 0, 1: hits; 30, 31: sleep
    assert next(results) == 0
    results.close()  # abandoned before any call ran: those not run are stopped
    assert cancelled
    for future in cancelled:
        assert future.cancelled() or isinstance(future.exception(timeout=60),
                                                JobCancelledError)


def sleepy_square(x):
    import time
    time.sleep(x if x > 2 else 0)
    return x * x


def test_calls_cancelled_before_their_batch_is_written_leave_no_key_behind(tmp_path):
    """The owner keeps each call's cache key until its result is stored; calls of a
    submit_many cancelled while the owner writes their batch drop theirs (the cancel's
    notice follows the batch on the owner's queue)."""
    import threading

    with SlurmExecutor(tmp_path, backend="local", cache=True, keep_alive=0) as ex:
        engine, entered, release = ex._engine, threading.Event(), threading.Event()
        launch = engine._launch

        def slow_launch(spec, sinks):  # the owner, just before it looks at the sinks
            entered.set()
            release.wait(10)
            launch(spec, sinks)

        engine._launch = slow_launch
        futures = ex.submit_many(square, [(x,) for x in range(6)])
        assert entered.wait(10)
        cancelled = [f.cancel() for f in futures[:4]]
        release.set()
        assert cancelled == [True] * 4
        assert [f.result(timeout=60) for f in futures[4:]] == [16, 25]
        assert engine._cache_keys == {}


def half_megabyte(x):
    return bytes([x]) * (512 << 10)


def test_a_read_only_cache_turns_itself_off_with_one_warning(read_only_disk, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="slurmexecutor"), SlurmExecutor(
            tmp_path / "spool", backend="local", keep_alive=0,
            cache=read_only_disk / "cache") as ex:
        assert list(ex.map(square, range(3))) == [0, 1, 4]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cannot be used" in warnings[0], warnings
    assert "Read-only file system" in warnings[0]


def test_a_full_cache_stops_storing_with_one_warning(small_disk, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="slurmexecutor"), SlurmExecutor(
            tmp_path / "spool", backend="local", keep_alive=0,
            cache=small_disk / "cache") as ex:
        values = list(ex.map(half_megabyte, range(8), chunksize=1))
    assert [value[:1] for value in values] == [bytes([x]) for x in range(8)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cannot store results" in warnings[0], warnings
    assert "ENOSPC" in warnings[0]
