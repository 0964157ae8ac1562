"""The scheduler's answers, as functions of the core's state (state.py): which tasks run
again (requeued), which ended and how, and which vanished from the queue unseen (one
accounting query for them). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

from slurmexecutor.core import events as ev
from slurmexecutor.core.ledger import Task
from slurmexecutor.core.store import CoreState
from slurmexecutor.schedulers import TaskKey, TaskState, state_of


def on_states(core: CoreState, states: Mapping[TaskKey, TaskState], now: float) -> None:
    vanished: list[Task] = []
    states = dict(states)  # once, not per task
    for task in core.watched_tasks():
        state = state_of(states, task.job_id, task.array_index)
        if state is None:
            if now - task.registered > 2 * core.config.poll_interval + (
                    core.config.vanish_grace):
                vanished.append(task)
        elif state.final:
            if task.final is None:
                task.final, task.final_since = state, now
            task.final_polls += 1
        elif task.index in task.batch.joiners and (task.final is not None or (
                state.state == "PENDING" and (task.killed or task.started))):
            moved_on(task, now)  # a joiner's job requeued: it restarts in its own batch
        else:
            if task.final is not None:  # requeued: pending or running again
                task.final, task.final_polls = None, 0
                task.requeues += 1
                if task.killed:  # the end record was its killed attempt's
                    task.ended = task.killed = False
            elif task.killed and state.state == "PENDING":  # requeued before any final
                task.ended = task.killed = False  # state was seen: its next attempt counts
                task.requeues += 1
            task.started = task.started or state.running
    if vanished:
        core.out.append(ev.QueryFinal(
            tuple(t.key for t in vanished),
            tuple((t.job_id or "", t.array_index or 0) for t in vanished),
            {t.key: (*t.worker, t.worker_started) for t in vanished if t.worker is not None}))


def moved_on(task: Task, now: float) -> None:
    """A joiner whose Slurm job was requeued (seen running or pending again after its
    final state or its killed end, or pending after it had started): its next attempt
    runs as a task of its own batch and never comes back to this one, so it is settled
    now, as REQUEUED, and the calls it left run again without using up a retry."""
    if not task.moved:
        task.moved, task.final, task.final_since = True, TaskState("REQUEUED"), now
        task.final_polls, task.killed = 2, True


def on_finals(core: CoreState, event: ev.FinalAnswer, now: float) -> None:
    for key in event.tasks:
        task = core.tasks.get(key)
        if task is None or key in event.alive:
            continue  # settled meanwhile, or its worker still runs (local)
        if task.final is None:
            job_key = (task.job_id or "", task.array_index or 0)
            task.final = event.finals.get(job_key, TaskState("UNKNOWN"))
            task.final_since = now
        task.final_polls += 2  # gone from the queue: it will not come back
