"""The decision core's state: batches, tasks, calls and the actions decided so far.

`CoreState` holds what `Core` (state.py) owns; the policies (policies.py, joins.py,
answers.py) are functions of it, so they need no import of `Core` itself.
"""

from __future__ import annotations

from slurmexecutor.core import events as ev
from slurmexecutor.core.events import Action, Failure
from slurmexecutor.core.ledger import Batch, Config, Task


class CoreState:
    """Batches, tasks and calls; the helpers every policy uses to close or fail calls."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.batches: dict[int, Batch] = {}
        self.tasks: dict[tuple[int, int], Task] = {}  # live tasks only
        self.doomed: set[int] = set()  # calls the user cancelled after launch
        self.now = 0.0  # the current step's time
        self.cancelling = False  # shutdown(cancel_futures=True): no more retries
        self.next_poll = 0.0
        #: settled tasks that had no end record: read on for another result_grace, so a
        #: result that comes after all still wins where its future is unresolved
        self.lingering: dict[tuple[int, int], Task] = {}
        #: when the latest complete read of the streams began: a task the scheduler
        #: calls ended is judged only on a read that began after we learned it
        self.scanned = float("-inf")
        #: warm tasks seen idle: (job id, array index) -> until when they wait, and the
        #: resources key of the batches they may join
        self.warm: dict[tuple[str, int], float] = {}
        self.warm_for: dict[tuple[str, int], str] = {}
        #: warm tasks whose batch finished: their streams are read on until their `end`
        #: record, which names the batch (and index) they joined, if any
        self.following: dict[tuple[int, int], Task] = {}
        #: joins registered so far: the owner reads again at once after one (the joiner's
        #: new stream may hold its first call's result already)
        self.joins = 0
        #: chunks the client claims for want of tasks: what their calls get if it wins
        self.claim_then: dict[tuple[int, int], Task | Failure] = {}
        self.out: list[Action] = []

    # -- helpers shared by the policies -------------------------------------------------------------------------

    def watched_tasks(self) -> list[Task]:
        return [t for t in self.tasks.values()
                if t.job_id is not None and (not t.ended or t.killed)]

    def live_tasks(self, batch: Batch) -> list[Task]:
        return [t for t in batch.tasks if t.key in self.tasks]

    def close_call(self, batch: Batch, call_id: int) -> None:
        batch.open_calls.discard(call_id)
        task = batch.owner.pop(call_id, None)
        if task is not None:
            task.unresolved.discard(call_id)
        if batch.backup:
            copy = batch.backup.pop(call_id, None)
            if copy is not None:
                copy.unresolved.discard(call_id)

    def fail_calls(self, batch: Batch, call_ids: list[int], failure: Failure) -> None:
        call_ids = [c for c in call_ids if c in batch.open_calls]
        for call_id in call_ids:
            self.close_call(batch, call_id)
        if call_ids:
            self.out.append(ev.Fail(tuple(call_ids), failure))
