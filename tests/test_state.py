"""The pure core (state.py): every policy tested with plain values, no processes."""

from __future__ import annotations

import pytest

from slurmexecutor.core.events import (
    BatchAdded,
    BatchDone,
    CancelRequested,
    CancelTasks,
    ClaimChunks,
    ClaimsWon,
    Deliver,
    Fail,
    FinalAnswer,
    LiftThrottle,
    QueryFinal,
    QueryScheduler,
    Record,
    Records,
    Retry,
    SchedulerAnswer,
    ShutdownRequested,
    StreamFound,
    StreamsRead,
    StreamState,
    SubmitDeferred,
    SubmitFailed,
    SubmitTasks,
    TasksSubmitted,
    WriteCancel,
)
from slurmexecutor.core.ledger import Config
from slurmexecutor.core.state import Core, window_due
from slurmexecutor.errors import (
    CallLostError,
    IntegrityError,
    JobCancelledError,
    JobTimeoutError,
    NodeFailureError,
    SubmissionDeferred,
    SubmissionError,
    WorkerCrashedError,
)
from slurmexecutor.schedulers import TaskState


def core(**options) -> Core:
    config = {"poll_interval": 1.0, "result_grace": 0.0, **options}
    return Core(Config(**config))


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def delivered(actions) -> list:
    """The calls' results the actions deliver, one `Delivery` each."""
    return [d for a in of(actions, Deliver) for d in a.each()]


def started_batch(machine: Core, chunks=((0, 1), (2, 3)), planned=2, now=0.0, **options):
    """A batch with its array submitted as job 7 and task 0 started."""
    actions = machine.step([BatchAdded(0, [list(c) for c in chunks], planned, **options)], now)
    [submit] = of(actions, SubmitTasks)
    machine.step([TasksSubmitted(0, "7", 0, submit.count),
                  Record(0, 0, "start", None, {"host": "h", "pid": 1})], now)
    return submit


def failed(actions) -> dict[int, type]:
    return {c: a.failure.error_type for a in of(actions, Fail) for c in a.call_ids}


def test_a_new_batch_asks_for_its_planned_tasks_throttled():
    machine = core()
    [submit] = of(machine.step([BatchAdded(0, [[0, 1], [2]], 2, throttled=True)], 0), SubmitTasks)
    assert (submit.first, submit.count, submit.throttled) == (0, 2, True)


def test_results_are_delivered_once_and_the_batch_retires():
    machine = core()
    started_batch(machine)
    out = machine.step([Record(0, 0, "claim", 0, None), Record(0, 0, "ok", 0, b"a"),
                        Record(0, 0, "ok", 0, b"again"), Record(0, 0, "ok", 1, b"b")], 0.1)
    assert [(d.call_id, d.body) for d in delivered(out)] == [(0, b"a"), (1, b"b")]
    out = machine.step([Record(0, 0, "claim", 1, None)] + [
        Record(0, 0, "ok", c, b"x") for c in (2, 3)] + [Record(0, 0, "end", None, {})], 0.2)
    assert of(out, BatchDone) and machine.idle
    assert of(out, CancelTasks) == [CancelTasks(("7_1",))]  # the unneeded pending task


def test_scheduler_is_asked_once_per_poll_interval_for_all_arrays():
    machine = core(poll_interval=2.0)
    started_batch(machine)
    assert len(of(machine.step([], 5.0), QueryScheduler)) == 1
    assert not of(machine.step([], 6.0), QueryScheduler)
    assert of(machine.step([], 7.1), QueryScheduler) == [QueryScheduler(frozenset({"7"}))]


def test_a_task_that_ended_fails_exactly_the_calls_it_held():
    machine = core()
    started_batch(machine, chunks=((0, 1), (2, 3)))
    machine.step([Record(0, 0, "claim", 0, None), Record(0, 0, "ok", 0, b"")], 0)
    out = machine.step([SchedulerAnswer({("7", 0): TaskState("FAILED", 1),
                                         ("7", 1): TaskState("RUNNING")})], 1.0)
    assert not failed(out)  # not before the folder was read again
    out = machine.step([StreamsRead(1.1)], 1.2)
    assert failed(out) == {1: WorkerCrashedError}
    assert not machine.idle  # chunk 1 is still for task 1


def test_the_result_grace_holds_back_a_verdict():
    machine = core(result_grace=3.0)
    started_batch(machine, chunks=((0,),), planned=1)
    machine.step([Record(0, 0, "claim", 0, None)], 0)
    assert not failed(machine.step([SchedulerAnswer({("7", 0): TaskState("COMPLETED")})], 1.0))
    assert not failed(machine.step([StreamsRead(3.8)], 3.9))
    out = machine.step([], 4.1)
    assert failed(out) == {0: WorkerCrashedError}


def test_a_verdict_waits_for_a_read_of_the_folder_that_began_after_the_end():
    machine = core()
    started_batch(machine, chunks=((0,),), planned=1)
    machine.step([Record(0, 0, "claim", 0, None)], 0)
    machine.step([StreamsRead(0.9), SchedulerAnswer({("7", 0): TaskState("COMPLETED")})], 1.0)
    assert not failed(machine.step([StreamsRead(0.95)], 5.0))  # began before: stale
    out = machine.step([Record(0, 0, "ok", 0, b"late"), StreamsRead(5.0)], 5.1)
    assert [d.call_id for d in delivered(out)] == [0] and not failed(out)


def test_requeueable_states_wait_for_a_second_answer_and_requeue_undoes_them():
    machine = core()
    started_batch(machine, chunks=((0,),), planned=1)
    machine.step([Record(0, 0, "claim", 0, None)], 0)
    assert not failed(machine.step([SchedulerAnswer({("7", 0): TaskState("NODE_FAIL")})], 1))
    assert not failed(machine.step([SchedulerAnswer({("7", 0): TaskState("PENDING")})], 3))
    assert not failed(machine.step([SchedulerAnswer({("7", 0): TaskState("NODE_FAIL")})], 5))
    out = machine.step([SchedulerAnswer({("7", 0): TaskState("NODE_FAIL")}),
                        StreamsRead(6)], 7)
    assert failed(out) == {0: NodeFailureError}


def test_retries_carry_unfinished_calls_to_a_new_batch_chunk_by_chunk():
    machine = core(retry_on=frozenset({"NODE_FAIL"}), max_retries=1)
    started_batch(machine, chunks=((0, 1), (2, 3)), planned=1)
    machine.step([Record(0, 0, "claim", 0, None), Record(0, 0, "ok", 0, b""),
                  Record(0, 0, "claim", 1, None)], 0)
    machine.step([SchedulerAnswer({("7", 0): TaskState("NODE_FAIL")})], 1)
    out = machine.step([SchedulerAnswer({("7", 0): TaskState("NODE_FAIL")}), StreamsRead(2)],
                       3)
    [retry] = of(out, Retry)
    assert retry.attempt == 2 and dict(retry.calls) == {0: (1,), 1: (2, 3)}
    assert not failed(out)


def test_retries_never_carry_cancelled_calls_and_stop_at_shutdown_cancel():
    machine = core(retry_on=frozenset({"NODE_FAIL"}), max_retries=3)
    started_batch(machine, chunks=((0, 1, 2),), planned=1)
    machine.step([Record(0, 0, "claim", 0, None), CancelRequested(frozenset({1}))], 0)
    machine.step([SchedulerAnswer({("7", 0): TaskState("NODE_FAIL")})], 1)
    out = machine.step([SchedulerAnswer({("7", 0): TaskState("NODE_FAIL")}), StreamsRead(2)],
                       3)
    assert dict(of(out, Retry)[0].calls) == {0: (0, 2)}
    assert failed(out) == {1: JobCancelledError}

    machine = core(retry_on=frozenset({"NODE_FAIL"}), max_retries=3)
    started_batch(machine, chunks=((0,),), planned=1)
    machine.step([Record(0, 0, "claim", 0, None), ShutdownRequested(cancel_futures=True)], 0)
    machine.step([SchedulerAnswer({("7", 0): TaskState("NODE_FAIL")})], 1)
    out = machine.step([SchedulerAnswer({("7", 0): TaskState("NODE_FAIL")}), StreamsRead(2)],
                       3)
    assert not of(out, Retry) and failed(out) == {0: JobCancelledError}


def test_cancel_claims_whole_unclaimed_chunks_and_stops_running_calls_by_their_workers():
    machine = core()
    started_batch(machine, chunks=((0, 1), (2, 3), (4,)), planned=2)
    machine.step([Record(0, 1, "start", None, {"host": "h", "pid": 2}),
                  Record(0, 0, "claim", 0, None), Record(0, 1, "claim", 1, None)], 0)
    out = machine.step([CancelRequested(frozenset({0, 2, 3, 4}))], 0.1)
    assert of(out, ClaimChunks) == [ClaimChunks(0, (2,))]
    assert [(w.chunk, w.call_ids, w.stop) for w in of(out, WriteCancel)] == [
        (0, (0,), True), (1, (2, 3), True), (2, (4,), True)]
    assert not of(out, CancelTasks)  # no task is ended for a cancel: its worker stops it
    assert not of(out, Fail)  # nothing is failed before the claims are known
    out = machine.step([ClaimsWon(0, (2,))], 0.2)
    assert failed(out) == {4: JobCancelledError}


def test_cancel_without_kill_only_skips():
    machine = core()
    started_batch(machine, chunks=((0, 1),), planned=1)
    machine.step([Record(0, 0, "claim", 0, None)], 0)
    out = machine.step([CancelRequested(frozenset({0, 1}), kill=False)], 0.1)
    assert not of(out, CancelTasks)
    assert [w.stop for w in of(out, WriteCancel)] == [False]  # running ones run on
    out = machine.step([Record(0, 0, "ok", 0, b"ran"), Record(0, 0, "skip", 1, None)], 0.2)
    assert [(d.call_id, d.kind, d.cancelled_here) for d in delivered(out)] == [
        (0, "ok", True), (1, "skip", True)]


def test_a_run_of_a_tasks_results_read_together_is_one_action():
    machine = core()
    started_batch(machine)
    out = machine.step([Records(0, 0, [("claim", 0, None), ("ok", 0, b"a"), ("ok", 1, b"b"),
                                       ("claim", 1, None), ("raised", 2, b"e")])], 0.1)
    # in order with the rest: the second claim comes between the runs
    assert [[(d.call_id, d.kind) for d in a.each()] for a in of(out, Deliver)] == [
        [(0, "ok"), (1, "ok")], [(2, "raised")]]
    assert [type(a).__name__ for a in out if type(a).__name__ in ("Claimed", "Deliver")] == [
        "Claimed", "Deliver", "Claimed", "Deliver"]


def test_scale_out_follows_the_measured_work_not_the_queue():
    machine = core(probe=0.3, horizon=3.0)
    chunks = [[c] for c in range(40)]
    machine.step([BatchAdded(0, chunks, 16, throttled=True)], 0)
    machine.step([TasksSubmitted(0, "7", 0, 16)], 0)
    assert not of(machine.step([], 30.0), LiftThrottle)  # pending 30 s: says nothing
    machine.step([Record(0, 0, "start", None, {"host": "h", "pid": 1}),
                  Record(0, 0, "claim", 0, None)], 30.0)
    assert not of(machine.step([], 30.2), LiftThrottle)  # before the probe
    # 0.31 s, no call done: each costs at least 0.31 s, 40 left: 12.4 s of work -> 5 tasks
    assert of(machine.step([], 30.31), LiftThrottle) == [LiftThrottle(0, 5)]
    assert not of(machine.step([], 30.4), LiftThrottle)  # measured again a probe later
    # 1.4 s, 5 tasks, 2 calls done: ~3.5 task-seconds per call, 38 left: all 16 tasks
    out = machine.step([Record(0, 0, "ok", 0, b""), Record(0, 0, "claim", 1, None),
                        Record(0, 0, "ok", 1, b"")], 31.4)
    assert of(out, LiftThrottle) == [LiftThrottle(0, 0)]


def test_cheap_work_never_scales_out():
    machine = core(probe=0.3, horizon=3.0)
    started_batch(machine, chunks=[(c,) for c in range(100)], planned=16, throttled=True)
    out = []
    for step in range(10):  # 100 calls of 1 ms: 0.1 s of work
        now = 0.05 * step
        records = [Record(0, 0, kind, c, b"" if kind == "ok" else None)
                   for c in range(step * 10, step * 10 + 10) for kind in ("claim", "ok")]
        out += machine.step(records, now)
    assert not of(out, LiftThrottle) and machine.idle


def test_a_measured_batch_is_not_scaled_out_for_its_start_up():
    """A batch whose function was measured cheap runs on one task; that task's start-up
    (its first call imports the function's modules: 2 s on a busy node) is no measure
    of the calls, so it stays narrow; calls that do turn out dear widen it."""
    for per_step, dear in ((50, False), (1, True)):  # calls done per 0.1 s from 2 s on
        machine = core(probe=0.3, horizon=3.0)
        started_batch(machine, chunks=[(c,) for c in range(300)], planned=16,
                      throttled=True, measured=1e-5)
        out = []
        for tick in range(1, 20):  # start-up: no result for 2 s
            out += machine.step([], 0.1 * tick)
        assert not of(out, LiftThrottle)
        for tick in range(20, 40):
            first = (tick - 20) * per_step
            out += machine.step([Record(0, 0, kind, c, b"" if kind == "ok" else None)
                                 for c in range(first, min(first + per_step, 300))
                                 for kind in ("claim", "ok")], 0.1 * tick)
        assert bool(of(out, LiftThrottle)) == dear, (per_step, of(out, LiftThrottle))
    # none done after `horizon` s: dear after all
    machine = core(probe=0.3, horizon=3.0)
    started_batch(machine, chunks=[(c,) for c in range(300)], planned=16, throttled=True,
                  measured=1e-5)
    assert not of(machine.step([], 2.9), LiftThrottle)
    assert of(machine.step([], 3.3), LiftThrottle)
    # never measured: the time before the first result counts (it may be the work)
    machine = core(probe=0.3, horizon=3.0)
    started_batch(machine, chunks=[(c,) for c in range(300)], planned=16, throttled=True)
    assert of(machine.step([], 0.31), LiftThrottle)


def test_a_chunks_cost_is_its_calls_own_time():
    """What a chunk's `times` record counts as its calls' cost: not the unpickling of the
    function and arguments (`load`: a task's first imports), and a first call at most
    as long as the chunk's median other (imports inside the function)."""
    from array import array

    from slurmexecutor.core.state import calls_seconds

    def times(took, **more):
        return {"start": 0.0, "end": 9.0, "took": array("f", took).tobytes(), **more}

    assert calls_seconds(times([2.0], load=1.99)) == pytest.approx(0.01, abs=1e-6)
    assert calls_seconds(times([2.0, 0.001, 0.001], load=1.99)) == pytest.approx(0.003,
                                                                                abs=1e-6)
    assert calls_seconds(times([2.0, 0.001, 0.001])) == pytest.approx(0.003, abs=1e-6)
    assert calls_seconds(times([1.0, 1.0, 1.0], load=0.0)) == pytest.approx(3.0)
    assert calls_seconds({"start": 1.0, "end": 3.5}) == 2.5  # an older record: its span


def test_work_done_by_the_first_task_never_scales_out():
    machine = core(probe=0.3)
    started_batch(machine, chunks=((0,), (1,)), planned=2, throttled=True)
    out = machine.step([Record(0, 0, "claim", 0, None), Record(0, 0, "claim", 1, None)], 0.1)
    assert of(out, CancelTasks) == [CancelTasks(("7_1",))]
    assert not of(machine.step([], 1.0), LiftThrottle)


def test_a_submission_error_fails_the_calls_when_no_task_is_left():
    machine = core()
    machine.step([BatchAdded(0, [[0, 1]], 1)], 0)
    error = SubmissionError("sbatch: error: invalid partition")
    out = machine.step([SubmitFailed(0, error)], 0.1)
    assert of(out, ClaimChunks) == [ClaimChunks(0, (0,))] and not of(out, Fail)
    out = machine.step([ClaimsWon(0, (0,), (0,))], 0.2)  # (a warm task cannot join now)
    [fail] = of(out, Fail)
    assert fail.call_ids == (0, 1) and fail.failure.error is error


def test_a_vanished_task_is_asked_about_once_then_lost():
    machine = core(poll_interval=1.0, vanish_grace=5.0)
    started_batch(machine, chunks=((0,),), planned=1)
    machine.step([Record(0, 0, "claim", 0, None)], 0)
    out = machine.step([SchedulerAnswer({})], 3.0)
    assert not of(out, QueryFinal)  # too early: it may just not be listed yet
    out = machine.step([SchedulerAnswer({})], 8.0)
    [query] = of(out, QueryFinal)
    assert query.workers == {(0, 0): ("h", 1, None)}  # (no start time in this record)
    assert not failed(machine.step([FinalAnswer(query.tasks, {}, frozenset({(0, 0)}))], 8.1))
    assert not failed(machine.step([FinalAnswer(query.tasks, {}, frozenset())], 9.0))
    out = machine.step([StreamsRead(9.05)], 9.1)
    assert failed(out) == {0: CallLostError}


def test_time_limit_and_broken_streams():
    machine = core()
    started_batch(machine, chunks=((0, 1),), planned=1, time_limit="0:10")
    out = machine.step([Record(0, 0, "claim", 0, None), Record(0, 0, "limit", None, {}),
                        Record(0, 0, "ok", 0, b""), Record(0, 0, "end", None, {})], 0)
    assert failed(out) == {1: JobTimeoutError}

    machine = core()
    started_batch(machine, chunks=((0, 1),), planned=1)
    machine.step([Record(0, 0, "claim", 0, None)], 0)
    out = machine.step([StreamState(0, 0, error="record at byte 9 failed authentication")], 1)
    assert failed(out) == {0: IntegrityError, 1: IntegrityError}


def test_window_due():
    assert window_due(0.0, 0.5, quiet=0.05, longest=1.0) == 0.55
    assert window_due(0.0, 0.99, quiet=0.05, longest=1.0) == 1.0


def test_without_an_end_record_the_verdict_waits_for_the_result_grace():
    machine = core(result_grace=60.0)
    started_batch(machine, chunks=((0, 1),), planned=1)
    machine.step([Record(0, 0, "claim", 0, None)], 0)
    machine.step([SchedulerAnswer({("7", 0): TaskState("COMPLETED")})], 1.0)
    assert not failed(machine.step([StreamsRead(30.0)], 30.0))
    out = machine.step([Record(0, 0, "ok", 0, b"late"), StreamsRead(40.0)], 40.0)
    assert [d.call_id for d in delivered(out)] == [0]  # a late result is not lost
    out = machine.step([StreamsRead(61.5)], 61.5)
    [fail] = of(out, Fail)
    assert fail.call_ids == (1,) and "raise result_grace" in fail.failure.message


def test_a_killed_worker_end_record_settles_at_once_with_the_scheduler_state():
    machine = core(result_grace=60.0)
    started_batch(machine, chunks=((0, 1),), planned=1)
    machine.step([Record(0, 0, "claim", 0, None), Record(0, 0, "ok", 0, b""),
                  Record(0, 0, "end", None, {"signal": 15})], 0)
    assert not failed(machine.step([StreamsRead(0.5)], 0.5))  # which state? ask first
    out = machine.step([SchedulerAnswer({("7", 0): TaskState("CANCELLED")}),
                        StreamsRead(1.1)], 1.1)
    out += machine.step([StreamsRead(1.2)], 1.2)
    assert failed(out) == {1: JobCancelledError}


def test_a_requeue_after_a_killed_end_waits_for_the_next_attempt():
    machine = core(result_grace=0.0)
    started_batch(machine, chunks=((0,),), planned=1)
    machine.step([Record(0, 0, "claim", 0, None), Record(0, 0, "end", None, {"signal": 15}),
                  SchedulerAnswer({("7", 0): TaskState("PREEMPTED")}), StreamsRead(0.1)], 0.1)
    machine.step([SchedulerAnswer({("7", 0): TaskState("PENDING")}), StreamsRead(2)], 2.1)
    out = machine.step([Record(0, 0, "ok", 0, b"second attempt"), StreamsRead(3)], 3.1)
    assert [d.call_id for d in delivered(out)] == [0] and not failed(out)


def test_a_requeue_seen_only_as_pending_again_waits_for_the_next_attempt():
    """Requeued at once (`scontrol requeue`, a preemption): no final state between the
    killed attempt's end and PENDING; the next attempt ends COMPLETED quickly, before
    its stream was read: its result still counts, the verdict is not taken early."""
    machine = core(result_grace=60.0)
    started_batch(machine, chunks=((0,),), planned=1)
    machine.step([Record(0, 0, "claim", 0, None), Record(0, 0, "end", None, {"signal": 15}),
                  SchedulerAnswer({("7", 0): TaskState("RUNNING")}), StreamsRead(0.1)], 0.1)
    machine.step([SchedulerAnswer({("7", 0): TaskState("PENDING")}), StreamsRead(1)], 1.1)
    out = machine.step([SchedulerAnswer({("7", 0): TaskState("COMPLETED")}), StreamsRead(2)],
                       2.1)
    out += machine.step([SchedulerAnswer({("7", 0): TaskState("COMPLETED")}), StreamsRead(3)],
                        3.1)
    assert not failed(out)
    out = machine.step([Record(0, 0, "ok", 0, b"second attempt"), StreamsRead(4)], 4.1)
    assert [d.call_id for d in delivered(out)] == [0] and not failed(out)


def test_an_earlier_attempts_stream_does_not_judge_a_requeued_task():
    """As above, with the killed attempt's stream opened (close-to-open: a read of it
    after the end shows all it holds). The attempt that ended COMPLETED wrote another
    stream (t0000.r1.out), not found yet: the first one's says nothing of it, so the
    verdict waits for the second (the next listing finds it), not for the first."""
    machine = core(result_grace=60.0, close_to_open=True)
    started_batch(machine, chunks=((0,),), planned=1)
    machine.step([Record(0, 0, "claim", 0, None), Record(0, 0, "end", None, {"signal": 15}),
                  StreamState(0, 0, seen=True), SchedulerAnswer({("7", 0): TaskState("RUNNING")}),
                  StreamsRead(0.1)], 0.1)
    machine.step([SchedulerAnswer({("7", 0): TaskState("PENDING")}), StreamsRead(1)], 1.1)
    out = []
    for now in (2.0, 3.0):
        out += machine.step([SchedulerAnswer({("7", 0): TaskState("COMPLETED")}),
                             StreamState(0, 0, seen=True), StreamsRead(now)], now + 0.1)
    assert not failed(out)
    out = machine.step([Records(0, 0, [("start", None, {"host": "h", "pid": 2}),
                                       ("ok", 0, b"second attempt"), ("end", None, {})], 1),
                        StreamState(0, 0, seen=True, attempt=1), StreamsRead(4)], 4.1)
    assert [d.call_id for d in delivered(out)] == [0] and not failed(out)
    assert not machine.tasks  # settled by the second attempt's end


def test_an_earlier_attempts_end_read_late_does_not_end_the_requeued_task():
    """The killed attempt's end record is read only after its rerun's start (its stream
    lagged): it ends nothing, so the rerun's COMPLETED waits for the rerun's records."""
    machine = core(result_grace=60.0, close_to_open=True)
    started_batch(machine, chunks=((0,),), planned=1)
    machine.step([Record(0, 0, "claim", 0, None),
                  SchedulerAnswer({("7", 0): TaskState("RUNNING")}), StreamsRead(0.1)], 0.1)
    machine.step([Record(0, 0, "start", None, {"host": "h", "pid": 2}, attempt=1)], 1.0)
    out = []
    for now in (2.0, 3.0):
        out += machine.step([Record(0, 0, "end", None, {"signal": 15}, attempt=0),
                             SchedulerAnswer({("7", 0): TaskState("COMPLETED")}),
                             StreamState(0, 0, seen=True), StreamsRead(now)], now + 0.1)
    assert not failed(out)
    out = machine.step([Records(0, 0, [("ok", 0, b"rerun"), ("end", None, {})], 1),
                        StreamState(0, 0, seen=True, attempt=1), StreamsRead(4)], 4.1)
    assert [d.call_id for d in delivered(out)] == [0] and not failed(out)


def test_a_result_that_comes_after_the_verdict_still_wins_where_it_can():
    machine = core(result_grace=10.0, retry_on=frozenset({"NODE_FAIL"}), max_retries=1)
    started_batch(machine, chunks=((0, 1),), planned=1)
    machine.step([Record(0, 0, "claim", 0, None)], 0)
    machine.step([SchedulerAnswer({("7", 0): TaskState("NODE_FAIL")})], 1)
    out = machine.step([SchedulerAnswer({("7", 0): TaskState("NODE_FAIL")}),
                        StreamsRead(11.5)], 11.5)
    [retry] = of(out, Retry)
    assert dict(retry.calls) == {0: (0, 1)}
    machine.step([BatchAdded(1, [[0, 1]], 1, attempt=2)], 11.6)  # the retry batch
    out = machine.step([Record(0, 0, "ok", 1, b"late after all")], 12.0)
    [late] = of(out, Deliver)
    assert ([d.call_id for d in late.each()], late.late) == ([1], True)
    assert machine.batches[1].open_calls == {0}  # the retry no longer waits for call 1
    assert not of(machine.step([Record(0, 0, "ok", 0, b"too late")], 30.0), Deliver)


def test_a_backup_copy_keeps_the_calls_alive_and_the_first_result_wins():
    machine = core()
    started_batch(machine)
    machine.step([Record(0, 0, "claim", 0, None), Record(0, 0, "ok", 0, b"a"),
                  Record(0, 1, "start", None, {"host": "h", "pid": 2}),
                  Record(0, 1, "claim", 1, None), Record(0, 1, "ok", 2, b"c"),
                  Record(0, 1, "ok", 3, b"d")], 0.1)
    # task 1 is idle and runs chunk 0 again: call 0 is done, so the backup skips it
    out = machine.step([Record(0, 1, "backup", 0, None)], 0.2)
    assert [(w.chunk, w.call_ids) for w in of(out, WriteCancel)] == [(0, (0,))]
    # the straggler (task 0) dies: call 1 is not failed, its backup still runs it
    out = machine.step([SchedulerAnswer({("7", 0): TaskState("NODE_FAIL"),
                                         ("7", 1): TaskState("RUNNING")}),
                        StreamsRead(0.5)], 0.4)
    out += machine.step([SchedulerAnswer({("7", 0): TaskState("NODE_FAIL"),
                                          ("7", 1): TaskState("RUNNING")}),
                         StreamsRead(1.5)], 1.6)
    assert not of(out, Fail) and not of(out, Retry)
    out = machine.step([Record(0, 1, "ok", 1, b"b")], 1.7)
    assert [(d.call_id, d.body) for d in delivered(out)] == [(1, b"b")]
    assert of(out, BatchDone)


def test_the_slower_copy_stops_each_call_the_other_answered():
    machine = core()
    started_batch(machine)
    machine.step([Record(0, 0, "claim", 0, None),
                  Record(0, 1, "start", None, {"host": "h", "pid": 2}),
                  Record(0, 1, "claim", 1, None), Record(0, 1, "ok", 2, b"c"),
                  Record(0, 1, "ok", 3, b"d"), Record(0, 1, "backup", 0, None)], 0.1)
    out = machine.step([Record(0, 1, "ok", 0, b"a")], 0.2)
    assert [(w.chunk, w.call_ids) for w in of(out, WriteCancel)] == [(0, (0,))]
    assert not of(out, CancelTasks)  # task 0 still holds call 1, nobody answered it
    out = machine.step([Record(0, 0, "ok", 1, b"b")], 0.3)  # the original was quicker
    assert [(w.chunk, w.call_ids, w.stop) for w in of(out, WriteCancel)] == [(0, (1,), True)]
    assert not of(out, CancelTasks)  # the backup's worker stops the call, not the task
    assert [d.call_id for d in delivered(out)] == [1]


def test_a_submission_refused_by_a_limit_is_asked_again_later_with_backoff():
    machine = core()
    [submit] = of(machine.step([BatchAdded(0, [[0, 1], [2, 3]], 2)], 0.0), SubmitTasks)
    refusal = SubmissionDeferred("MaxJobCount reached", kind="job_count")
    # the first task went out, the second was refused
    actions = machine.step([TasksSubmitted(0, "7", 0, 1),
                            SubmitDeferred(0, 1, 1, submit.throttled, refusal)], 0.0)
    assert not of(actions, SubmitTasks) and not of(actions, Fail)
    assert not of(machine.step([], 1.9), SubmitTasks)
    [again] = of(machine.step([], 2.0), SubmitTasks)
    assert (again.first, again.count) == (1, 1)
    machine.step([SubmitDeferred(0, 1, 1, again.throttled, refusal)], 2.0)
    assert not of(machine.step([], 4.9), SubmitTasks)  # backing off: 3 s now
    assert of(machine.step([], 5.0), SubmitTasks)


def test_a_deferred_batch_whose_calls_are_cancelled_is_not_submitted_again():
    machine = core()
    machine.step([BatchAdded(0, [[0, 1]], 1)], 0.0)
    refusal = SubmissionDeferred("QOSMaxSubmitJobPerUserLimit", kind="submit_limit")
    machine.step([SubmitDeferred(0, 0, 1, False, refusal)], 0.0)
    actions = machine.step([CancelRequested(frozenset({0, 1}))], 1.0)
    [claim] = of(actions, ClaimChunks)
    actions = machine.step([ClaimsWon(0, claim.chunks)], 1.0)
    assert failed(actions) == {0: JobCancelledError, 1: JobCancelledError}
    assert not of(machine.step([], 60.0), SubmitTasks)
    assert machine.idle


def test_a_batch_waits_for_an_idle_warm_task_only_if_it_may_join():
    machine = core(keep_alive=30.0)
    started_batch(machine, chunks=((0,),), planned=1, resources="A")
    machine.step([Record(0, 0, "claim", 0, None), Record(0, 0, "ok", 0, b"x"),
                  Record(0, 0, "idle", None, {"keep_alive": 30.0})], 0.1)
    assert machine.warm == {("7", 0): 30.1}
    # other resources (ex.options): no warm task can join, its array goes out at once
    assert of(machine.step([BatchAdded(1, [[1]], 1, resources="B")], 0.2), SubmitTasks)
    # the same resources: it waits warm_wait for the idle task to join
    assert not of(machine.step([BatchAdded(2, [[2]], 1, resources="A")], 0.3), SubmitTasks)
    assert of(machine.step([], 1.4), SubmitTasks)


def test_chunks_of_deferred_tasks_are_not_failed_when_the_submitted_ones_end():
    machine = core()
    machine.step([BatchAdded(0, [[0], [1], [2], [3]], 4, steal=False)], 0.0)
    refusal = SubmissionDeferred("MaxJobCount reached", kind="job_count")
    machine.step([TasksSubmitted(0, "7", 0, 2), SubmitDeferred(0, 2, 2, False, refusal)], 0.0)
    for task in (0, 1):
        machine.step([Record(0, task, "start", None, {"host": "h", "pid": task}),
                      Record(0, task, "claim", task, None),
                      Record(0, task, "ok", task, b"x"), Record(0, task, "end", None, {})],
                     0.5)
    actions = machine.step([], 1.0)
    assert not of(actions, Fail) and not of(actions, ClaimChunks)
    [again] = of(machine.step([], 2.0), SubmitTasks)  # asked again; still nobody fails
    assert (again.first, again.count) == (2, 1)  # halved: a part may fit
    assert not of(machine.step([], 2.0), Fail)
    [rest] = of(machine.step([TasksSubmitted(0, "8", 2, 1)], 2.1), SubmitTasks)
    assert (rest.first, rest.count) == (3, 1)
    assert ("8", 0) in {(t.job_id, t.array_index) for t in machine.tasks.values()}


def test_a_task_whose_joined_stream_holds_wanted_calls_is_never_killed():
    machine = core(keep_alive=30.0)
    started_batch(machine, chunks=((0,),), planned=1, resources="A")
    machine.step([Record(0, 0, "claim", 0, None), BatchAdded(1, [[1]], 1, resources="A")], 0.1)
    # task 7_0 skipped call 0 (not read yet), joined batch 1 and claimed its chunk
    joined = 1_000_000
    machine.step([StreamFound(1, joined),
                  Record(1, joined, "start", None,
                         {"host": "h", "pid": 1, "job_id": "7", "array_index": 0}),
                  Record(1, joined, "claim", 0, None)], 0.2)
    out = machine.step([CancelRequested(frozenset({0}))], 0.3)
    assert not of(out, CancelTasks)
    out = machine.step([Record(0, 0, "skip", 0, None)], 0.4)
    assert not of(out, CancelTasks) and [d.call_id for d in delivered(out)] == [0]


def test_a_refused_array_is_asked_for_in_halves_until_a_part_fits():
    """An array larger than a per-user submit limit never fits whole: each refusal
    halves what one sbatch asks for, and the rest follows as soon as a part goes out."""
    machine = core()
    machine.step([BatchAdded(0, [[c] for c in range(8)], 8, steal=False)], 0.0)
    refusal = SubmissionDeferred("QOSMaxSubmitJobPerUserLimit", kind="submit_limit")
    machine.step([SubmitDeferred(0, 0, 8, False, refusal)], 0.0)
    [ask] = of(machine.step([], 2.0), SubmitTasks)
    assert (ask.first, ask.count) == (0, 4)
    machine.step([SubmitDeferred(0, 0, 4, False, refusal)], 2.0)  # still too many
    [ask] = of(machine.step([], 5.0), SubmitTasks)
    assert (ask.first, ask.count) == (0, 2)
    out = machine.step([TasksSubmitted(0, "7", 0, 2)], 5.0)  # two fit: the rest at once,
    [ask] = of(out, SubmitTasks)  # in parts twice as large again
    assert (ask.first, ask.count) == (2, 4)
    # cut at MaxArraySize: the first array went out, the second was refused
    machine.step([TasksSubmitted(0, "8", 2, 1), SubmitDeferred(0, 3, 3, False, refusal)], 5.1)
    pending = machine.batches[0].pending  # the refused tasks and the rest: one record
    assert (pending.next, pending.end, pending.asked) == (3, 8, 0)
    assert not of(machine.step([], 5.2), Fail)
    [ask] = of(machine.step([], 20.0), SubmitTasks)
    assert (ask.first, ask.count) == (3, 1)


def test_a_joined_task_killed_before_its_start_record_does_not_hold_its_batch():
    machine = core(keep_alive=30.0)
    started_batch(machine, chunks=((0,),), planned=1, resources="A")
    machine.step([Record(0, 0, "claim", 0, None), Record(0, 0, "ok", 0, b"x"),
                  Record(0, 0, "idle", None, {"keep_alive": 30.0})], 0.1)
    assert not of(machine.step([BatchAdded(1, [[1]], 1, resources="A")], 0.2), SubmitTasks)
    joined = 1_000_000  # the warm task joined, and was killed before it said who it is
    machine.step([StreamFound(1, joined), Record(1, joined, "end", None, {"signal": 15})],
                 0.3)
    assert (1, joined) not in machine.tasks  # settled: nothing held, no Slurm id to ask
    assert of(machine.step([], 1.5), SubmitTasks)  # the batch gets its own array


def test_without_warm_tasks_unneeded_tasks_are_cancelled_at_once():
    machine = core()
    started_batch(machine, chunks=((0,),), planned=2)
    out = machine.step([Record(0, 0, "claim", 0, None), Record(0, 0, "ok", 0, b"x")], 0.2)
    assert of(out, CancelTasks) == [CancelTasks(("7_1",))]


def _held_kill(machine):
    """Batch 0 (resources A): task 7_0 runs call 0; batch 1 (A) has an unclaimed chunk.
    ex.cancel(call 0) is held."""
    started_batch(machine, chunks=((0,),), planned=1, resources="A")
    machine.step([Record(0, 0, "claim", 0, None)], 0.1)
    out = machine.step([BatchAdded(1, [[1]], 1, resources="A")], 0.2)
    assert of(out, SubmitTasks)
    out = machine.step([CancelRequested(frozenset({0}))], 0.3)
    assert not of(out, CancelTasks) and set(machine.kills_held) == {0}


def test_parts_grow_again_once_the_queue_has_room():
    """Six refusals of a 64-task array (a transiently full queue) shrink the parts to
    one task; once the queue has room they double again: few sbatch calls."""
    machine = core()
    machine.step([BatchAdded(0, [[c] for c in range(64)], 64, steal=False)], 0.0)
    refusal = SubmissionDeferred("QOSMaxSubmitJobPerUserLimit", kind="submit_limit")
    now = 0.0
    machine.step([SubmitDeferred(0, 0, 64, False, refusal)], now)
    for _ in range(6):
        now += 40
        [ask] = of(machine.step([], now), SubmitTasks)
        machine.step([SubmitDeferred(0, ask.first, ask.count, False, refusal)], now)
    asks = 0
    job = 100
    while True:
        now += 40
        out = of(machine.step([], now), SubmitTasks)
        if not out:
            break
        while out:
            [ask] = out
            asks += 1
            job += 1
            out = of(machine.step([TasksSubmitted(0, str(job), ask.first, ask.count)], now),
                     SubmitTasks)
    assert asks < 10, f"{asks} sbatch calls for 64 tasks once the queue had room"


def test_an_attached_batch_submits_the_tasks_its_client_never_did():
    """The journal lists only the parts that went out (deferred, halved): `attach`
    passes them as `arrays`, and the rest is asked for."""
    machine = core()
    out = machine.step([BatchAdded(0, [[0], [1], [2], [3]], 4, steal=False,
                                   arrays=(("7", 0, 2),))], 0.0)
    asks = of(out, SubmitTasks)
    for t in range(1, 30):
        asks += of(machine.step([], float(t)), SubmitTasks)
    assert asks, "tasks 2..3 are never submitted"




def test_a_batchs_open_calls_are_a_compact_set_that_behaves_as_one():
    """CallSet (one bit per call over the batch's span) against a plain set, for ranges
    (map chunks), lists (windows, retries), a subset (attach) and discards."""
    import random

    from slurmexecutor.core.ledger import CallSet

    for seed in range(200):
        rng = random.Random(seed)
        chunks: list = []
        start = rng.randrange(0, 50)
        for _ in range(rng.randint(0, 6)):
            if rng.random() < 0.5:
                size = rng.randint(1, 40)
                chunks.append(range(start, start + size))
                start += size + rng.randint(0, 5)
            else:
                chunks.append([start + k * rng.randint(1, 3) for k in range(rng.randint(1, 5))])
                start = chunks[-1][-1] + 1
        only = None if rng.random() < 0.5 else frozenset(rng.sample(range(start + 20), 20))
        expected = {c for chunk in chunks for c in chunk} & (only if only is not None else {
            c for chunk in chunks for c in chunk})
        calls = CallSet(chunks, only)
        assert set(calls) == expected and len(calls) == len(expected)
        assert all((c in calls) == (c in expected) for c in range(-3, start + 12))
        for call_id in rng.sample(sorted(expected), len(expected) // 2):
            calls.discard(call_id)
            expected.discard(call_id)
        calls.discard(10**9)
        assert set(calls) == expected and bool(calls) == bool(expected)
        probe = frozenset(rng.sample(range(start + 10), 5))
        assert probe & calls == probe & expected == calls & probe
    assert len(CallSet([range(1_000_000)])._bits) == 125_000  # not a set of a million ints
