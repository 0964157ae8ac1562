"""A model-based test of the core: `Core` driven with the real `StreamReader` over a real
run folder, where scripted array tasks claim chunks (the real O_EXCL claims), honour
cancel files, write records with the real `RecordWriter`, die, are scancelled, or are
refused by sbatch. After every step: no cancelled call ran, and no call was failed while
a task still runs it; at the end every call has exactly one verdict (every future ends).
Seeds are fixed, so a failure replays."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from slurmexecutor.core import events as ev
from slurmexecutor.core.state import Config, Core
from slurmexecutor.errors import SubmissionError
from slurmexecutor.folder import claims, spool
from slurmexecutor.owner.streams import StreamReader
from slurmexecutor.schedulers import TaskState


@dataclass
class ScriptedTask:
    """One array task of batch `batch`, as the worker would behave."""

    batch: int
    index: int
    job: str
    writer: spool.RecordWriter | None = None
    alive: bool = True  # the process runs (Slurm says RUNNING)
    finished: bool = False  # wrote its end record
    chunk: list[int] = field(default_factory=list)  # calls of its claimed chunk to run


class Model:
    def __init__(self, run_dir: Path, rng: random.Random) -> None:
        self.run_dir, self.rng = run_dir, rng
        self.key = spool.load_key(run_dir.parent, create=True)
        self.core = Core(Config(poll_interval=1.0, result_grace=0.0, vanish_grace=0.0))
        self.reader = StreamReader(run_dir, self.key)
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
                self.tasks.append(ScriptedTask(action.batch, index, job))
            return [ev.TasksSubmitted(action.batch, job, action.first, action.count)]
        if isinstance(action, ev.QueryScheduler):
            states = {(t.job, t.index): TaskState("RUNNING" if t.alive else "CANCELLED")
                      for t in self.tasks}
            return [ev.SchedulerAnswer(states)]
        if isinstance(action, ev.QueryFinal):
            return [ev.FinalAnswer(action.tasks, {}, frozenset())]
        if isinstance(action, ev.ClaimChunks):
            folder = spool.claims_dir(self.run_dir, action.batch)
            won = tuple(c for c in action.chunks if claims.try_claim(folder / str(c), "client"))
            return [ev.ClaimsWon(action.batch, won, action.chunks)]
        if isinstance(action, ev.WriteCancel):
            spool.append_cancelled(spool.cancel_path(self.run_dir, action.batch, action.chunk),
                                   list(action.call_ids))
        elif isinstance(action, ev.CancelTasks):
            for task in self.tasks:
                if f"{task.job}_{task.index}" in action.refs:
                    task.alive = False
        elif isinstance(action, ev.Deliver):
            self.verdicts.setdefault(action.call_id, []).append(action.kind)
        elif isinstance(action, ev.Fail):
            for call_id in action.call_ids:
                self.verdicts.setdefault(call_id, []).append("fail")
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
                spool.stream_path(self.run_dir, task.batch, task.index, 0), self.key)
            task.writer.write(("start", None, {"host": "h", "pid": 1}))
            return
        if task.chunk:
            call_id = task.chunk.pop(0)
            chunk = next(i for i, c in enumerate(self.chunks[task.batch]) if call_id in c)
            cancelled = spool.read_cancelled(spool.cancel_path(self.run_dir, task.batch, chunk))
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
                return
        task.writer.write(("end", None, {}))
        task.finished = task.alive = False

    # -- invariants -----------------------------------------------------------------------

    def check(self) -> None:
        assert not (self.ran & self.cancelled_before_handed_over()), "a cancelled call ran"
        for call_id, kinds in self.verdicts.items():
            if "fail" in kinds:
                holders = [t for t in self.tasks if t.alive and call_id in t.chunk]
                assert not holders, f"call {call_id} failed while a task still runs it"

    def cancelled_before_handed_over(self) -> set[int]:
        return set()  # (every call here is handed over: cancels are skips or kills)


@pytest.mark.parametrize("seed", range(12))
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
            rng.choice(live).alive = False
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
