"""A model-based test of the core: `Core` driven with the real `StreamReader` over a real
run folder, where scripted array tasks claim chunks (the real O_EXCL claims), honour
cancel files, write records with the real `RecordWriter`, go warm and join other batches
(as the worker does: `end {"joined": B, "as": I}`, then a stream of their own in B), die,
are requeued (a new attempt runs again what the earlier ones claimed), are scancelled,
or are refused by sbatch. After every step: no cancelled call ran, and no call was failed while
a task still runs it; at the end every call has exactly one verdict (every future ends).
Seeds are fixed, so a failure replays."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from slurmexecutor.core import events as ev
from slurmexecutor.core.ledger import Config
from slurmexecutor.core.state import Core
from slurmexecutor.errors import SubmissionError
from slurmexecutor.folder import cancels, claims, spool, warm
from slurmexecutor.owner.streams import StreamReader
from slurmexecutor.schedulers import TaskState


@dataclass
class ScriptedTask:
    """One array task of batch `batch`, as the worker would behave."""

    batch: int
    index: int
    job: str
    array_index: int
    writer: spool.RecordWriter | None = None
    moved: bool = False  # it joined another batch: its process lives on there
    attempt: int = 0  # Slurm requeued it this many times
    claimed: list[int] = field(default_factory=list)  # chunks it claimed (all attempts)
    alive: bool = True  # the process runs (Slurm says RUNNING)
    finished: bool = False  # wrote its end record
    chunk: list[int] = field(default_factory=list)  # calls of its claimed chunk to run


class Model:
    def __init__(self, run_dir: Path, rng: random.Random) -> None:
        self.run_dir, self.rng = run_dir, rng
        self.key = spool.load_key(run_dir.parent, create=True)
        self.warm = rng.random() < 0.5
        self.core = Core(Config(poll_interval=1.0, result_grace=0.0, vanish_grace=0.0,
                                keep_alive=30.0 if self.warm else 0.0))
        self.reader = StreamReader(run_dir, self.key, listing=0.0)  # the model's clock
        # is its steps, not seconds: folders are listed at each
        self.tasks: list[ScriptedTask] = []
        self.chunks: dict[int, list[list[int]]] = {}
        self.verdicts: dict[int, list[str]] = {}
        self.cancelled: set[int] = set()
        self.ran: set[int] = set()  # calls a task started
        self.now = 0.0
        self.next_job = 100
        self.pending: list[ev.Event] = []

    # -- the engine's part: actions -> I/O and events -------------------------------------

    def step(self) -> None:
        self.now += 0.5
        wanted = self.core.to_read()
        read = self.reader.read(wanted.streams, wanted.ended, wanted.folders) if wanted else []
        events = self.pending + read
        self.pending = []
        while True:
            actions = self.core.step(events, self.now)
            events = []
            for action in actions:
                events += self.do(action)
            self.check()
            if not events:
                return

    def do(self, action: ev.Action) -> list[ev.Event]:
        if isinstance(action, ev.SubmitTasks):
            if self.rng.random() < 0.15:  # sbatch refuses for good
                return [ev.SubmitFailed(action.batch, SubmissionError("refused"))]
            job = str(self.next_job)
            self.next_job += 1
            for index in range(action.first, action.first + action.count):
                self.tasks.append(ScriptedTask(action.batch, index, job,
                                               index - action.first))
            return [ev.TasksSubmitted(action.batch, job, action.first, action.count)]
        if isinstance(action, ev.QueryScheduler):
            states = {(t.job, t.array_index): TaskState("RUNNING" if t.alive else "CANCELLED")
                      for t in self.tasks if not t.moved}
            return [ev.SchedulerAnswer(states)]
        if isinstance(action, ev.QueryFinal):
            return [ev.FinalAnswer(action.tasks, {}, frozenset())]
        if isinstance(action, ev.ClaimChunks):
            folder = spool.claims_dir(self.run_dir, action.batch)
            won = tuple(c for c in action.chunks if claims.try_claim(folder / str(c), "client"))
            return [ev.ClaimsWon(action.batch, won, action.chunks)]
        if isinstance(action, ev.WriteCancel):
            cancels.append_cancelled(cancels.cancel_path(self.run_dir, action.batch, action.chunk),
                                     self.key, list(action.call_ids))
        elif isinstance(action, ev.CancelTasks):
            for task in self.tasks:  # pending only: a started task is never ended
                if f"{task.job}_{task.array_index}" in action.refs and task.writer is None:
                    task.alive = False
        elif isinstance(action, ev.Deliver):
            for delivery in action.each():
                self.verdicts.setdefault(delivery.call_id, []).append(delivery.kind)
        elif isinstance(action, ev.Fail):
            for call_id in action.call_ids:
                self.verdicts.setdefault(call_id, []).append("fail")
        elif isinstance(action, ev.Retry):  # as the owner does: a batch of their own
            number = max(self.chunks) + 1
            chunks = [list(calls) for calls in action.calls.values()]
            self.chunks[number] = chunks
            spool.claims_dir(self.run_dir, number).mkdir(parents=True)
            return [ev.BatchAdded(number, chunks, min(2, len(chunks)), attempt=action.attempt,
                                  reruns=action.reruns)]
        return []

    # -- the tasks' part ------------------------------------------------------------------

    def add_batch(self, number: int, calls: list[int]) -> None:
        size = self.rng.randint(1, 3)
        chunks = [calls[i:i + size] for i in range(0, len(calls), size)]
        self.chunks[number] = chunks
        spool.claims_dir(self.run_dir, number).mkdir(parents=True)
        self.pending.append(ev.BatchAdded(number, chunks, min(2, len(chunks))))

    def act(self, task: ScriptedTask) -> None:
        """One move of a live task: start, run a call, claim a chunk, or end."""
        if task.writer is None:
            task.writer = spool.RecordWriter(
                spool.stream_path(self.run_dir, task.batch, task.index, task.attempt), self.key)
            task.writer.write(("start", None, {"host": "h", "pid": 1, "job_id": task.job,
                                               "array_index": task.array_index,
                                               "attempt": task.attempt}))
            for chunk in task.claimed:  # requeued: first what earlier attempts claimed
                task.writer.write(("claim", chunk, None))
                task.chunk += self.chunks[task.batch][chunk]
            return
        if task.chunk:
            call_id = task.chunk.pop(0)
            chunk = next(i for i, c in enumerate(self.chunks[task.batch]) if call_id in c)
            cancelled = cancels.read_cancelled(
                cancels.cancel_path(self.run_dir, task.batch, chunk), self.key)
            if call_id in cancelled:
                task.writer.write(("skip", call_id, None))
            else:
                self.ran.add(call_id)
                task.writer.write(("ok", call_id, b"\x80\x04K\x01."))
            return
        folder = spool.claims_dir(self.run_dir, task.batch)
        for index, chunk in enumerate(self.chunks[task.batch]):
            if claims.try_claim(folder / str(index), str(task.index)):
                task.writer.write(("claim", index, None))
                task.chunk = list(chunk)
                task.claimed.append(index)
                return
        if self.warm and self.join(task):
            return
        task.writer.write(("end", None, {}))
        task.finished = task.alive = False

    def join(self, task: ScriptedTask) -> bool:
        """Warm: join a later batch with an unclaimed chunk, as the worker does."""
        for number in sorted(self.chunks):
            folder = spool.claims_dir(self.run_dir, number)
            taken = {int(n) for n in os.listdir(folder) if n.isdigit()}
            if number <= task.batch or len(taken) >= len(self.chunks[number]):
                continue
            assert task.writer is not None
            task.writer.write(("idle", None, {"keep_alive": 30.0}))
            start = ("start", None, {"host": "h", "pid": 1, "job_id": task.job,
                                     "array_index": task.array_index, "warm": True})
            index = warm.join_stream(self.run_dir, self.key, number, start)
            task.writer.write(("end", None, {"joined": number, "as": index}))
            task.moved, task.alive = True, False
            joiner = ScriptedTask(number, index, task.job, task.array_index)
            joiner.writer = spool.RecordWriter(
                spool.stream_path(self.run_dir, number, index, 0), self.key)
            self.tasks.append(joiner)
            return True
        return False

    # -- invariants -----------------------------------------------------------------------

    def check(self) -> None:
        assert not (self.ran & self.cancelled_before_handed_over()), "a cancelled call ran"
        for call_id, kinds in self.verdicts.items():
            if "fail" in kinds:
                holders = [t for t in self.tasks if t.alive and call_id in t.chunk]
                assert not holders, f"call {call_id} failed while a task still runs it"

    def cancelled_before_handed_over(self) -> set[int]:
        return set()  # (every call here is handed over: cancels are skips or kills)


@pytest.mark.parametrize("seed", range(60))
def test_every_future_ends_under_random_task_behaviour(tmp_path, seed):
    rng = random.Random(seed)
    run_dir = tmp_path / "spool" / "run"
    run_dir.mkdir(parents=True)
    model = Model(run_dir, rng)
    calls = 0
    for number in range(3):
        model.add_batch(number, list(range(calls, calls + rng.randint(1, 7))))
        calls = max(c for chunks in model.chunks.values() for chunk in chunks for c in chunk) + 1
    all_calls = set(range(calls))
    for _ in range(400):
        model.step()
        live = [t for t in model.tasks if t.alive]
        roll = rng.random()
        if live and roll < 0.75:
            model.act(rng.choice(live))
        elif live and roll < 0.82:  # scancel or a crash: no end record
            victim = rng.choice(live)
            if victim.writer is not None and not victim.moved and rng.random() < 0.3:
                victim.writer, victim.chunk = None, []  # requeued by Slurm: it runs again
                victim.attempt += 1  # as a new attempt (SLURM_RESTART_COUNT)
            else:
                victim.alive = False
        elif roll < 0.9:  # the user cancels a call
            call = rng.randrange(calls)
            model.cancelled.add(call)
            model.pending.append(ev.CancelRequested(frozenset({call})))
        if model.core.idle:
            break
    for task in model.tasks:  # the rest of the tasks run to their end
        while task.alive:
            model.act(task)
            model.step()
    for _ in range(50):
        if model.core.idle:
            break
        model.step()
    assert model.core.idle, "the core still waits for something"
    missing = all_calls - set(model.verdicts)
    assert not missing, f"calls without a verdict (futures that never end): {missing}"
    twice = {c: k for c, k in model.verdicts.items() if len(k) > 1}
    assert not twice, f"calls with more than one verdict: {twice}"
