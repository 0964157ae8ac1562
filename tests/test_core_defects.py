"""Regression tests of the pure core for futures that never ended (issue 18's review).

Each feeds `Core` the events of the scenario the review found and checks that every
call gets exactly one verdict, at the right time."""

from __future__ import annotations

from slurmexecutor.core.events import (
    AnnounceBatch,
    BatchAdded,
    CancelRequested,
    ClaimChunks,
    ClaimsWon,
    Deliver,
    Fail,
    Record,
    Retry,
    SchedulerAnswer,
    StreamFound,
    StreamsRead,
    SubmitFailed,
    SubmitTasks,
    TasksSubmitted,
)
from slurmexecutor.core.ledger import Config
from slurmexecutor.core.state import Core
from slurmexecutor.errors import CallLostError, JobCancelledError, SubmissionError
from slurmexecutor.schedulers import TaskState


def core(**options) -> Core:
    return Core(Config(**{"poll_interval": 1.0, "result_grace": 0.0, **options}))


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def delivered(actions) -> list:
    """The calls' results the actions deliver, one `Delivery` each."""
    return [d for a in of(actions, Deliver) for d in a.each()]


def failed_calls(actions) -> set[int]:
    return {c for a in of(actions, Fail) for c in a.call_ids}


def test_leftover_chunks_fail_only_once_the_client_won_their_claims():
    machine = core()
    machine.step([BatchAdded(0, [[0], [1]], 1)], 0)
    machine.step([TasksSubmitted(0, "7", 0, 1), Record(0, 0, "start", None,
                                                        {"host": "h", "pid": 1}),
                  Record(0, 0, "claim", 0, None), Record(0, 0, "ok", 0, b"")], 0)
    machine.step([SchedulerAnswer({("7", 0): TaskState("FAILED", 1)})], 1)
    out = machine.step([StreamsRead(1.5)], 2)
    [claim] = of(out, ClaimChunks)
    assert claim.chunks == (1,)
    assert 1 not in failed_calls(out)  # not before the claim is known to be the client's
    # lost: someone holds claims/1, but the only task is gone without a claim record
    # for it; once a read after the loss found no claimant, the call fails as that
    # task's, where it used to wait forever
    out = machine.step([ClaimsWon(0, (), asked=(1,))], 2.1)
    assert not failed_calls(out)
    out = machine.step([StreamsRead(2.2)], 2.3)
    assert failed_calls(out) == {1}
    # ... and with the claim won, the call fails
    machine2 = core()
    machine2.step([BatchAdded(0, [[0], [1]], 1)], 0)
    machine2.step([TasksSubmitted(0, "7", 0, 1)], 0)
    machine2.step([SchedulerAnswer({("7", 0): TaskState("FAILED", 1)})], 1)
    machine2.step([StreamsRead(1.5)], 2)
    out = machine2.step([ClaimsWon(0, (0, 1), asked=(0, 1))], 2.1)
    assert failed_calls(out) == {0, 1}


def test_a_chunk_whose_claim_the_client_lost_belongs_to_a_live_task_until_it_is_gone():
    """A lost claim is a task's: while a task of the batch lives, its `claim` record may
    yet come; once none is left and none reported it (it died between its claim file
    and its record, e.g. on a full disk), the calls fail instead of waiting forever."""
    machine = core()
    machine.step([BatchAdded(0, [[0], [1], [2]], 2)], 0)
    machine.step([TasksSubmitted(0, "7", 0, 2)], 0)
    for index in (0, 1):
        machine.step([Record(0, index, "start", None, {"host": "h", "pid": 1 + index})], 0)
    machine.step([Record(0, 0, "claim", 0, None), Record(0, 0, "ok", 0, b""),
                  Record(0, 1, "claim", 1, None), Record(0, 1, "ok", 1, b"")], 0.5)
    # task 0 ends with a full disk, task 1 runs on: chunk 2 is still the tasks'
    machine.step([Record(0, 0, "end", None, {"exit": 75})], 1)
    machine.step([SchedulerAnswer({("7", 0): TaskState("FAILED", 75),
                                   ("7", 1): TaskState("RUNNING")})], 1.5)
    out = machine.step([StreamsRead(1.6)], 2)
    assert not of(out, ClaimChunks) and not failed_calls(out)
    # task 1 claims chunk 2 (the claim file) and is killed before its record
    machine.step([SchedulerAnswer({("7", 0): TaskState("FAILED", 75),
                                   ("7", 1): TaskState("FAILED", 75)})], 3)
    out = machine.step([StreamsRead(3.1)], 4)
    [claim] = of(out, ClaimChunks)
    assert claim.chunks == (2,) and not failed_calls(out)
    out = machine.step([ClaimsWon(0, (), asked=(2,))], 4.1)  # lost: claims/2 exists
    assert not failed_calls(out) and machine.to_read().folders == (0,)  # listed: a
    out = machine.step([StreamsRead(4.2)], 4.3)  # joiner's new stream would show
    assert failed_calls(out) == {2}
    machine.step([], 5)
    assert machine.idle


def test_a_lost_claim_waits_for_a_warm_task_that_may_have_joined_unseen():
    """Batch 1's own task ends; chunk 1's claim is lost to a warm task whose join (the
    `end` record of the stream it left) a lagging view has not shown yet: its calls wait
    for it (up to result_grace, the lag bound), and its result is delivered, not failed."""
    machine = core(keep_alive=30.0, result_grace=5.0)
    machine.step([BatchAdded(0, [[0]], 1, resources="A")], 0)
    machine.step([TasksSubmitted(0, "7", 0, 1), Record(0, 0, "start", None,
                                                        {"host": "h", "pid": 1}),
                  Record(0, 0, "claim", 0, None), Record(0, 0, "ok", 0, b""),
                  Record(0, 0, "idle", None, {"keep_alive": 30.0})], 0.1)
    machine.step([BatchAdded(1, [[1], [2]], 1, resources="A")], 0.2)
    out = machine.step([TasksSubmitted(1, "8", 0, 1),
                        Record(1, 0, "start", None, {"host": "h", "pid": 2}),
                        Record(1, 0, "claim", 0, None), Record(1, 0, "ok", 1, b""),
                        Record(1, 0, "end", None, {})], 0.5)
    out += machine.step([StreamsRead(0.6)], 1)
    [claim] = of(out, ClaimChunks)
    assert claim.chunks == (1,)
    out = machine.step([ClaimsWon(1, (), asked=(1,))], 1.1)
    out += machine.step([StreamsRead(1.2)], 2)
    out += machine.step([StreamsRead(4.9)], 5)
    assert not failed_calls(out)
    out = machine.step([Record(0, 0, "end", None, {"joined": 1, "as": 1_000_000})], 6)
    out += machine.step([Record(1, 1_000_000, "start", None, {
        "host": "h", "pid": 1, "job_id": "7", "array_index": 0}),
        Record(1, 1_000_000, "claim", 1, None), Record(1, 1_000_000, "ok", 2, b"")], 6.1)
    assert not failed_calls(out) and [d.call_id for d in delivered(out)] == [2]


def test_a_call_cancelled_after_its_retry_is_never_retried_again():
    machine = core(retry_on=frozenset({"NODE_FAIL"}), max_retries=3)
    machine.step([BatchAdded(0, [[0, 1]], 1)], 0)
    machine.step([TasksSubmitted(0, "7", 0, 1), Record(0, 0, "start", None,
                                                        {"host": "h", "pid": 1}),
                  Record(0, 0, "claim", 0, None)], 0)
    machine.step([SchedulerAnswer({("7", 0): TaskState("NODE_FAIL")})], 1)
    out = machine.step([SchedulerAnswer({("7", 0): TaskState("NODE_FAIL")}),
                        StreamsRead(2)], 3)
    assert len(of(out, Retry)) == 1
    # the retry is batch 1; the user cancels call 0 there; the original batch ends
    machine.step([BatchAdded(1, [[0, 1]], 1, attempt=2)], 3.1)
    machine.step([CancelRequested(frozenset({0}))], 3.2)
    assert 0 not in machine.batches or not machine.batches[0].open_calls
    machine.step([TasksSubmitted(1, "8", 0, 1), Record(1, 0, "start", None,
                                                        {"host": "h", "pid": 2}),
                  Record(1, 0, "claim", 0, None)], 4)
    assert 0 in machine.doomed  # the first batch's end did not forget the cancel
    machine.step([SchedulerAnswer({("8", 0): TaskState("NODE_FAIL")})], 5)
    out = machine.step([SchedulerAnswer({("8", 0): TaskState("NODE_FAIL")}),
                        StreamsRead(6)], 7)
    assert all(0 not in calls for r in of(out, Retry) for calls in r.calls.values())
    [fail] = [f for f in of(out, Fail) if 0 in f.call_ids]
    assert fail.failure.error_type is JobCancelledError


def _warm_task_joins(machine: Core) -> None:
    """Batch 0 ran on job 7 task 0, which goes warm and joins batch 1 as task 1000000."""
    machine.step([BatchAdded(0, [[0]], 1, resources="A")], 0)
    machine.step([TasksSubmitted(0, "7", 0, 1), Record(0, 0, "start", None,
                                                        {"host": "h", "pid": 1}),
                  Record(0, 0, "claim", 0, None), Record(0, 0, "ok", 0, b""),
                  Record(0, 0, "idle", None, {"keep_alive": 30.0})], 0.1)
    assert not of(machine.step([BatchAdded(1, [[1], [2]], 2, resources="A")], 0.2),
                  SubmitTasks)  # it waits for the warm task
    machine.step([Record(0, 0, "end", None, {"joined": 1, "as": 1_000_000})], 0.3)


def _joiner_started_on_chunk_0():
    """A warm task (Slurm 7_0) joined batch 1 as index 1,000,000, started, claimed chunk 0."""
    machine = core(keep_alive=30.0)
    _warm_task_joins(machine)
    machine.step([Record(1, 1_000_000, "start", None, {"host": "h", "pid": 1,
                                                        "job_id": "7", "array_index": 0}),
                  Record(1, 1_000_000, "claim", 0, None)], 0.4)
    return machine


def test_a_join_is_announced_in_the_old_stream_and_followed_by_its_slurm_id():
    machine = core(keep_alive=30.0)
    _warm_task_joins(machine)
    joined = machine.tasks[(1, 1_000_000)]
    assert (joined.job_id, joined.array_index) == ("7", 0)  # watched from the start


def test_a_settled_joiner_never_comes_back_and_its_batch_does_not_wait_forever():
    machine = _joiner_started_on_chunk_0()
    # the Slurm task is scancelled: the joiner settles, its call fails
    out = machine.step([SchedulerAnswer({("7", 0): TaskState("CANCELLED")})], 2)
    out += machine.step([StreamsRead(2.5)], 3)
    assert 1 in failed_calls(out)
    assert (1, 1_000_000) not in machine.tasks
    # chunk 1 is left to nobody else: the batch has asked for its own array
    assert of(out, SubmitTasks)
    # its stream is still in the folder: found again, it is not a new live task
    machine.step([StreamFound(1, 1_000_000)], 3.1)
    assert (1, 1_000_000) not in machine.tasks


def test_a_refused_batch_whose_joiner_left_fails_its_unclaimed_calls():
    machine = _joiner_started_on_chunk_0()
    error = SubmissionError("sbatch: error: QOSMaxSubmitJobPerUserLimit")
    out = machine.step([Record(1, 1_000_000, "ok", 1, b"")], 2)
    out += machine.step([SubmitTasks(1, 0, 2, False) and SubmitFailed(1, error)], 2.1)
    # the joiner ends (keep_alive over) without claiming chunk 1
    out += machine.step([Record(1, 1_000_000, "end", None, {})], 3)
    out += machine.step([], 4)
    claims = of(out, ClaimChunks)
    assert claims and 1 in claims[-1].chunks
    out = machine.step([ClaimsWon(1, (1,), asked=(1,))], 4.1)
    [fail] = of(out, Fail)
    assert fail.call_ids == (2,) and fail.failure.error is error
    assert machine.idle


def test_delivered_results_are_not_failed_again():
    machine = core()
    machine.step([BatchAdded(0, [[0]], 1)], 0)
    machine.step([TasksSubmitted(0, "7", 0, 1), Record(0, 0, "start", None,
                                                        {"host": "h", "pid": 1}),
                  Record(0, 0, "claim", 0, None)], 0)
    out = machine.step([Record(0, 0, "ok", 0, b"x")], 0.5)
    assert of(out, Deliver)
    out = machine.step([SchedulerAnswer({("7", 0): TaskState("CANCELLED")}),
                        StreamsRead(1)], 2)
    assert not failed_calls(out) and not of(out, Deliver)
    assert CallLostError  # (imported for the reader: what an unrun call would get)


def test_preempted_calls_run_again_without_using_up_a_retry():
    """PREEMPTED is not the calls' fault: they run again (the same attempt) even with
    max_retries=0, up to MAX_FREE_RERUNS times; other states still need a retry."""
    from slurmexecutor.core.policies import MAX_FREE_RERUNS

    def preempted_once(reruns: int, state: str = "PREEMPTED"):
        machine = core(retry_on=frozenset({"PREEMPTED", "NODE_FAIL"}), max_retries=0)
        machine.step([BatchAdded(0, [[0, 1]], 1, reruns=reruns)], 0)
        machine.step([TasksSubmitted(0, "7", 0, 1), Record(0, 0, "start", None,
                                                            {"host": "h", "pid": 1}),
                      Record(0, 0, "claim", 0, None)], 0)
        machine.step([SchedulerAnswer({("7", 0): TaskState(state)})], 1)
        return machine.step([SchedulerAnswer({("7", 0): TaskState(state)}),
                             StreamsRead(2)], 3)

    [retry] = of(preempted_once(0), Retry)
    assert retry.attempt == 1 and retry.reruns == 1 and dict(retry.calls) == {0: (0, 1)}
    out = preempted_once(MAX_FREE_RERUNS)  # preempted too often: failed as such
    assert not of(out, Retry) and failed_calls(out) == {0, 1}
    out = preempted_once(0, "NODE_FAIL")  # a node failure uses up a retry: none left
    assert not of(out, Retry) and failed_calls(out) == {0, 1}


def test_calls_never_started_are_handed_back_not_failed():
    """A task that ran (and died) leaves chunks nobody started: they run again in a batch
    of their own without using up a retry; only what it held fails."""
    machine = core()  # no retries at all
    machine.step([BatchAdded(0, [[0], [1, 2]], 1)], 0)
    machine.step([TasksSubmitted(0, "7", 0, 1), Record(0, 0, "start", None,
                                                        {"host": "h", "pid": 1}),
                  Record(0, 0, "claim", 0, None)], 0)
    machine.step([SchedulerAnswer({("7", 0): TaskState("FAILED", 1)})], 1)
    out = machine.step([StreamsRead(1.5)], 2)
    assert failed_calls(out) == {0}  # the call it held
    out = machine.step([ClaimsWon(0, (1,), asked=(1,))], 2.1)
    [retry] = of(out, Retry)
    assert dict(retry.calls) == {1: (1, 2)} and retry.attempt == 1 and retry.reruns == 1
    assert not failed_calls(out)


def test_a_task_that_never_started_uses_up_retries_as_before():
    """A missing interpreter (the task never ran): no free re-runs, no endless loop."""
    machine = core()
    machine.step([BatchAdded(0, [[0]], 1)], 0)
    machine.step([TasksSubmitted(0, "7", 0, 1)], 0)
    machine.step([SchedulerAnswer({("7", 0): TaskState("FAILED", 127)})], 1)
    machine.step([StreamsRead(1.5)], 2)
    out = machine.step([ClaimsWon(0, (0,), asked=(0,))], 2.1)
    assert not of(out, Retry) and failed_calls(out) == {0}


def test_idle_warm_tasks_are_asked_for_an_earlier_batch_whose_tasks_wait():
    machine = core(keep_alive=30.0)
    _warm_task_joins(machine)  # job 7 task 0 went warm and joined batch 1
    machine.step([Record(1, 1_000_000, "start", None, {"host": "h", "pid": 1,
                                                        "job_id": "7", "array_index": 0}),
                  Record(1, 1_000_000, "claim", 0, None), Record(1, 1_000_000, "ok", 1, b""),
                  Record(1, 1_000_000, "end", None, {}),
                  Record(1, 1_000_000, "idle", None, {"keep_alive": 30.0})], 0.4)
    # batch 2 (same resources) gets its array; its task waits for a CPU, unstarted
    machine.step([BatchAdded(2, [[3]], 1, resources="A")], 0.5)
    machine.step([TasksSubmitted(2, "9", 0, 1)], 0.6)
    machine.warm[("8", 0)] = 100.0  # another warm task, idle, of the same resources
    machine.warm_for[("8", 0)] = "A"
    out = machine.step([], 2.0)
    assert of(out, AnnounceBatch) == [AnnounceBatch(2)]
    assert not of(machine.step([], 3.0), AnnounceBatch)  # once


def _requeued_joiner(answers: list[dict]) -> list:
    """The joiner of batch 1 (Slurm 7_0, on call 1) is preempted and its job requeued:
    the scheduler's `answers` in turn, each followed by a read of the streams."""
    machine = _joiner_started_on_chunk_0()
    out = machine.step([Record(1, 1_000_000, "end", None, {"signal": 15})], 1)
    for step, answer in enumerate(answers):
        now = 2.0 + step
        out += machine.step([SchedulerAnswer(answer)], now)
        out += machine.step([StreamsRead(now + 0.1)], now + 0.2)
    assert (1, 1_000_000) not in machine.tasks
    return out


def test_a_requeued_joiners_calls_run_again_free_instead_of_waiting_for_its_job():
    """A requeued job restarts as a task of its own batch (0), never of the batch it had
    joined: the joiner is settled at once and its unfinished call reruns without using
    up a retry (it used to wait for the job's end: hours)."""
    out = _requeued_joiner([{("7", 0): TaskState("PENDING")}])
    [retry] = of(out, Retry)
    assert (retry.batch, dict(retry.calls), retry.attempt, retry.reruns) == (1, {0: (1,)}, 1, 1)
    assert not failed_calls(out)


def test_a_joiner_seen_preempted_then_running_again_is_settled_too():
    out = _requeued_joiner([{("7", 0): TaskState("PREEMPTED")},
                            {("7", 0): TaskState("RUNNING")}])
    assert [dict(r.calls) for r in of(out, Retry)] == [{0: (1,)}] and not failed_calls(out)


def test_a_task_of_its_own_batch_killed_then_pending_still_waits_for_its_next_attempt():
    machine = core()
    machine.step([BatchAdded(0, [[0]], 1), TasksSubmitted(0, "8", 0, 1)], 0)
    machine.step([Record(0, 0, "start", None, {"host": "h", "pid": 1}),
                  Record(0, 0, "claim", 0, None),
                  Record(0, 0, "end", None, {"signal": 15})], 1)
    out = machine.step([SchedulerAnswer({("8", 0): TaskState("PENDING")})], 2)
    out += machine.step([StreamsRead(2.1)], 2.2)
    assert (0, 0) in machine.tasks and not of(out, Retry) and not failed_calls(out)


def test_an_earlier_clients_batch_is_listed_for_joiners_also_without_keep_alive():
    """After attach a warm task of the earlier client may join one of its batches: the
    batch's folder is listed for new streams even if this client keeps no warm tasks."""
    machine = core(keep_alive=0.0)
    machine.step([BatchAdded(0, [[0], [1]], 1, arrays=(("7", 0, 1),), attached=True),
                  BatchAdded(1, [[2], [3]], 1)], 0)
    assert machine.to_read().folders == (0,)
    machine.step([StreamFound(0, 1_000_000)], 0.1)
    assert (0, 1_000_000) in machine.tasks


def test_a_lingering_tasks_late_backup_record_is_not_a_result():
    """A `backup` record names a chunk where results name a call: late, from a task
    settled without its `end`, it must not pass for call 0's result."""
    machine = core(result_grace=5.0)
    machine.step([BatchAdded(0, [[0], [1]], 1)], 0)
    machine.step([TasksSubmitted(0, "7", 0, 1), Record(0, 0, "start", None,
                                                        {"host": "h", "pid": 1}),
                  Record(0, 0, "claim", 0, None), Record(0, 0, "claim", 1, None)], 0)
    machine.step([SchedulerAnswer({("7", 0): TaskState("FAILED", 1)})], 1)
    out = machine.step([StreamsRead(7)], 7)  # settled after result_grace: lingering
    assert failed_calls(out) == {0, 1} and (0, 0) in machine.lingering
    out = machine.step([Record(0, 0, "backup", 0, None)], 8)
    assert not of(out, Deliver)
    out = machine.step([Record(0, 0, "ok", 1, b"late")], 9)
    assert [d.call_id for d in delivered(out)] == [1]
