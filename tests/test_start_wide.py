"""Starting wide when slots are free, and warm tasks taking a lone call at once.

Core rules with plain values (policies.start_width, warm_free), the Slurm
idle-CPU parsing, and one executor test on both backends (the first array's throttle)."""

from __future__ import annotations

import re

from slurmexecutor import SlurmExecutor
from slurmexecutor.core.events import BatchAdded, Record, SubmitTasks, TasksSubmitted
from slurmexecutor.core.ledger import Config
from slurmexecutor.core.state import Core
from slurmexecutor.folder import spool
from slurmexecutor.schedulers.slurm import parse_idle_slots


def core(**options) -> Core:
    return Core(Config(**{"poll_interval": 1.0, "result_grace": 0.0, **options}))


def first_submit(event: BatchAdded) -> SubmitTasks:
    [submit] = [a for a in core().step([event], 0.0) if isinstance(a, SubmitTasks)]
    return submit


def chunks(count: int) -> list[list[int]]:
    return [[c] for c in range(count)]


def test_unmeasured_work_starts_up_to_the_free_slots():
    submit = first_submit(BatchAdded(0, chunks(40), 16, throttled=True, free=6))
    assert (submit.count, submit.throttled, submit.width) == (16, True, 6)


def test_unmeasured_work_with_room_for_all_is_not_throttled():
    submit = first_submit(BatchAdded(0, chunks(40), 16, throttled=True, free=30))
    assert submit.throttled is False


def test_no_free_slots_keeps_one_task():
    for free in (0, 1):
        submit = first_submit(BatchAdded(0, chunks(40), 16, throttled=True, free=free))
        assert (submit.throttled, submit.width) == (True, 1)


def test_measured_cheap_work_stays_on_one_task_whatever_is_free():
    # 1,000 calls of 1 ms: 1 s of work, under one horizon (3 s)
    event = BatchAdded(0, [list(range(c, c + 10)) for c in range(0, 1000, 10)], 16,
                       throttled=True, free=10_000, measured=0.001)
    assert not core().may_start_wide(1000, 0.001)
    assert (first_submit(event).throttled, first_submit(event).width) == (True, 1)


def test_measured_work_starts_one_task_per_horizon_of_it():
    # 20 calls x 0.5 s = 10 s of work: 4 tasks of a 3 s horizon, fewer than free
    event = BatchAdded(0, chunks(20), 16, throttled=True, free=12, measured=0.5)
    assert core().may_start_wide(20, 0.5)
    assert first_submit(event).width == 4


def idle_warm_task(machine: Core, resources: str = "r") -> None:
    """Batch 0 ran on job 7 task 0, which now waits warm (keep_alive 30 s)."""
    machine.step([BatchAdded(0, [[0]], 1, resources=resources)], 0.0)
    machine.step([TasksSubmitted(0, "7", 0, 1),
                  Record(0, 0, "start", None, {"host": "h", "pid": 1, "job_id": "7"}),
                  Record(0, 0, "claim", 0, None), Record(0, 0, "ok", 0, b"x"),
                  Record(0, 0, "idle", None, {"keep_alive": 30})], 0.1)


def test_an_idle_warm_task_takes_one_window_at_once():
    machine = core(keep_alive=30)
    assert machine.warm_free("r", 0.0) == 0
    idle_warm_task(machine)
    assert machine.warm_free("r", 0.2) == 1
    assert machine.warm_free("other", 0.2) == 0  # other resources: not for it
    machine.step([BatchAdded(1, [[1]], 1, resources="r")], 0.2)  # waits for a joiner
    assert machine.warm_free("r", 0.3) == 0  # the next window packs again
    assert machine.warm_free("r", 40.0) == 0  # past its keep_alive


def test_idle_slots_from_sinfo_count_each_node_once():
    sinfo = "n1|2/14/0/16\nn1|2/14/0/16\nn2|16/0/0/16\nn3|1/7/0/8\nbad line\n"
    assert parse_idle_slots(sinfo, 1) == 21
    assert parse_idle_slots(sinfo, 4) == 3 + 1


def nap(x: int) -> int:
    import time

    time.sleep(0.2)
    return x


def inc(x: int) -> int:
    return x + 1


def first_array_line(ex: SlurmExecutor, batch: int) -> str:
    text = spool.script_path(ex.run_dir, batch, 0).read_text()
    return re.search(r"--array=\S+", text).group(0)


def test_a_first_map_starts_wide_and_a_measured_cheap_one_on_one_task(make_executor):
    ex = make_executor()
    slots = ex.backend.slots()
    assert slots > 1  # the test needs room for two tasks
    assert list(ex.map(nap, range(4 * slots), chunksize=1)) == list(range(4 * slots))
    assert not first_array_line(ex, 0).endswith("%1")  # free slots: more than one at once
    assert list(ex.map(inc, range(300))) == list(range(1, 301))  # measured cheap next
    assert sum(ex.map(inc, range(300))) == sum(range(1, 301))
    line = first_array_line(ex, 2)  # one task at once (or one chunk: its cost is known)
    assert line.endswith("%1") or line == "--array=0-0"


def asks_of_a_warm_batch(free: int | None, seconds_per_call: float) -> list[SubmitTasks]:
    """The arrays asked for while an idle warm task that joined batch 1 (20 one-call
    chunks; the scheduler reported `free` idle slots) runs its first 5 calls, one
    result per `seconds_per_call`."""
    machine = core(keep_alive=30)
    idle_warm_task(machine)
    out = machine.step([BatchAdded(1, [[c] for c in range(1, 21)], 20, throttled=True,
                                   resources="r", free=free, measured=seconds_per_call)], 0.2)
    submits = [a for a in out if isinstance(a, SubmitTasks)]
    assert not submits  # it waits for the joiner
    joined = 1_000_000
    machine.step([Record(0, 0, "end", None, {"joined": 1, "as": joined}),
                  Record(1, joined, "start", None, {"host": "h", "pid": 1, "job_id": "7"}),
                  Record(1, joined, "claim", 0, None)], 0.3)
    for call in range(1, 6):
        for tick in range(1, 11):  # the owner's rounds in between
            now = 0.3 + (call - 1 + tick / 10) * seconds_per_call
            records = [Record(1, joined, "ok", call, b"x"),
                       Record(1, joined, "claim", call, None)] if tick == 10 else []
            submits += [a for a in machine.step(records, now) if isinstance(a, SubmitTasks)]
    return submits


def test_a_warm_batch_asks_for_tasks_its_measured_work_needs_when_slots_are_idle():
    # 15+ calls x 1 s left for one joined task: over a horizon (3 s)
    assert len(asks_of_a_warm_batch(free=4, seconds_per_call=1.0)) == 1
    assert len(asks_of_a_warm_batch(free=None, seconds_per_call=1.0)) == 1  # not asked


def test_with_no_idle_slot_a_warm_batch_asks_only_for_minutes_of_work():
    # the scheduler reported no idle slot: new tasks would wait in the queue (on a
    # cluster of its own, for the joined task's own CPU); 15-19 s of work stay on it
    assert not asks_of_a_warm_batch(free=0, seconds_per_call=1.0)
    # 15+ x 10 s: over QUEUED_WORK (60 s) per joined task, worth a place in the queue
    assert len(asks_of_a_warm_batch(free=0, seconds_per_call=10.0)) == 1
