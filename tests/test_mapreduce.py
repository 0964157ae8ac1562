"""map_reduce on the real Slurm cluster and the local backend, and its pure parts."""

from __future__ import annotations

import json
import operator
import time
from collections import Counter

import pytest
from conftest import wait_until

from slurmexecutor import JobCancelledError, map_reduce, map_reduce_async, reducers
from slurmexecutor.folder import spool
from slurmexecutor.mapreduce import split_fractions
from slurmexecutor.reducers import as_reducer


def identity(x):
    return x


def count_mod3(x):
    return Counter({x % 3: 1})


def value_of_pair(pair):
    return pair[1]


def scaled(x, factor, *, offset=0):
    return x * factor + offset


def fail_on(x, bad):
    if x == bad:
        raise KeyError(f"no {x}")
    return x


def slow(x):
    time.sleep(60)
    return x


# -- on the backends -----------------------------------------------------------------


def test_numbers_and_extra_arguments(make_executor):
    ex = make_executor()
    assert map_reduce(identity, range(100), 7, executor=ex) == 4950
    assert map_reduce(scaled, range(10), 3, sum, 2, executor=ex, offset=1) == 100
    assert map_reduce(identity, range(10), 4, max, executor=ex) == 9
    assert map_reduce(identity, [[1], [2], [3]], 2, reducers.concat, executor=ex) == [1, 2, 3]


def test_counters_with_sum_the_divide_and_slurm_way(make_executor):
    counts = map_reduce(count_mod3, range(10), 3, sum, executor=make_executor())
    assert counts == Counter({0: 4, 1: 3, 2: 3}) and isinstance(counts, Counter)


def test_fractions_are_claimed_like_chunks(make_executor):
    ex = make_executor()
    task = map_reduce_async(identity, range(50), 20, executor=ex)
    assert task.result(timeout=120) == sum(range(50))
    assert len(task.fractions) == 20
    # fractions are chunks that tasks claim: never a task per fraction (the first run of
    # a function may start as wide as the free slots: its cost is not known yet)
    logs = {fraction.log_path for fraction in task.fractions}
    assert None not in logs and len(logs) <= max(1, ex.backend.slots()) < 20
    [journal] = [json.loads(p.read_text()) for p in ex.run_dir.glob("b*.json")]
    assert journal["steal"] and len(journal["chunks"]) == 20
    # measured cheap now: the next run's first task folds them all
    again = map_reduce_async(identity, range(50), 20, executor=ex)
    assert again.result(timeout=120) == sum(range(50))
    assert len({fraction.log_path for fraction in again.fractions}) == 1


def test_dict_and_generator_input(make_executor):
    ex = make_executor()
    assert map_reduce(value_of_pair, {"a": 1, "b": 2, "c": 3}, 2, executor=ex) == 6
    assert map_reduce(identity, (x for x in range(10)), 3, executor=ex) == 45


def test_fewer_items_than_fractions(make_executor):
    task = map_reduce_async(identity, [5, 6], 20, executor=make_executor())
    assert task.result(timeout=120) == 11 and len(task.fractions) == 2


def test_empty_input(make_executor):
    ex = make_executor()
    with pytest.raises(ValueError, match="empty"):
        map_reduce(identity, [], 4, executor=ex)
    assert map_reduce(identity, [], 4, executor=ex, initial=0) == 0
    assert map_reduce(count_mod3, [], 4, executor=ex, initial=Counter()) == Counter()


def test_failing_fraction_strict_names_it(make_executor):
    with pytest.raises(KeyError, match="no 7") as caught:
        map_reduce(fail_on, range(10), 5, sum, 7, executor=make_executor())
    assert any("fraction 3 (items 6-7)" in note for note in caught.value.__notes__)


def test_failing_fraction_permissive_keeps_the_rest(make_executor):
    result = map_reduce(fail_on, range(10), 5, sum, 7, executor=make_executor(),
                        permissive=True)
    assert result.value == sum(range(10)) - 6 - 7
    [failure] = result.failures
    assert (failure.index, failure.first_item, failure.size) == (3, 6, 2)
    assert isinstance(failure.error, KeyError) and not result.complete


def test_cancel_a_running_map_reduce(make_executor):
    ex = make_executor()
    task = map_reduce_async(slow, range(4), 4, executor=ex)
    deadline = time.monotonic() + 60
    while task.counts()["running"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert task.counts()["running"] >= 1
    started = time.monotonic()
    task.cancel()
    assert task.future.cancelled()
    for fraction in task.fractions:  # running ones are killed, the others never start
        try:
            fraction.result(timeout=30)
        except (JobCancelledError, Exception) as error:  # noqa: BLE001
            assert fraction.cancelled() or isinstance(error, JobCancelledError), error
    assert time.monotonic() - started < 30
    jobs = {array["job_id"] for journal in spool.read_journals(ex.run_dir)
            for array in journal["arrays"]}
    assert wait_until(lambda: all(state.final for state in ex.backend.states(jobs).values()),
                      timeout=30)  # no task of it is left running or pending


def test_status_counts_of_the_async_handle(make_executor):
    task = map_reduce_async(identity, range(6), 3, executor=make_executor())
    assert task.result(timeout=120) == 15
    assert task.counts() == {"pending": 0, "running": 0, "done": 3, "failed": 0,
                             "cancelled": 0}


# -- pure parts ----------------------------------------------------------------------


def test_split_fractions_contiguous_and_never_empty():
    assert split_fractions(range(10), 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert split_fractions(range(2), 5) == [[0], [1]]
    assert split_fractions([], 5) == []
    assert split_fractions({"a": 1}, 2) == [[("a", 1)]]
    with pytest.raises(ValueError, match="fractions"):
        split_fractions([1], 0)


@pytest.mark.parametrize("reducer, values, expected", [
    (sum, [1, 2, 3], 6),
    (sum, [Counter(a=1), Counter(a=-1, b=2)], Counter(a=0, b=2)),  # zero counts kept
    (sum, [[1], [2]], [1, 2]),
    (min, [3, 1, 2], 1),
    (max, [3, 1, 2], 3),
    (operator.or_, [{1}, {2}], {1, 2}),
    (lambda a, b: a * b, [2, 3, 4], 24),
    (reducers.counter_merge, [{"x": 1}, {"x": 2}], Counter(x=3)),
    (reducers.set_union, [[1, 2], [2, 3]], {1, 2, 3}),
    (reducers.dict_merge("last"), [{"k": 1}, {"k": 2, "j": 0}], {"k": 2, "j": 0}),
    (reducers.dict_merge("first"), [{"k": 1}, {"k": 2}], {"k": 1}),
    (reducers.dict_merge(lambda key, a, b: a + b), [{"k": 1}, {"k": 2}], {"k": 3}),
])
def test_reducers(reducer, values, expected):
    assert as_reducer(reducer).fold(values) == expected


def test_reducer_folds_do_not_depend_on_grouping():
    values = [Counter({i % 4: i}) for i in range(12)]
    add = as_reducer(sum)
    grouped = add.fold([add.fold(values[:5]), add.fold(values[5:9]), add.fold(values[9:])])
    assert grouped == add.fold(values)


def test_dict_merge_conflict_raises():
    with pytest.raises(KeyError, match="in two results"):
        reducers.dict_merge().fold([{"k": 1}, {"k": 2}])


def test_numpy_arrays_add():
    import numpy

    total = as_reducer(sum).fold([numpy.ones(3), numpy.ones(3)])
    assert total.tolist() == [2.0, 2.0, 2.0]
