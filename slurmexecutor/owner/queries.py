"""Part of the owner (engine.py): the scheduler's queue asked on a thread of its own.

An `squeue` takes 10-100 ms (more on a busy controller); asked on the owner's thread it
would hold up every result read meanwhile (a warm task farm's round trips). The answer
becomes a `SchedulerAnswer` event at the owner's next round, as a slow answer would; one
query at a time (the core asks once per `poll_interval`; one still running is not asked
again).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection

from slurmexecutor._log import log
from slurmexecutor.core import events as ev
from slurmexecutor.schedulers import Backend


class SchedulerQueries:
    def __init__(self, backend: Backend, wake: Callable[[], None]) -> None:
        self.backend, self._wake = backend, wake
        self._lock = threading.Lock()
        self._answers: list[ev.Event] = []
        self._busy = False

    def ask(self, job_ids: Collection[str]) -> None:
        """Ask for these arrays' states; the answer comes through `take` (at once from
        a backend whose states cost no command: the local one)."""
        if self.backend.cheap_states:
            self._run(frozenset(job_ids))
            return
        with self._lock:
            if self._busy:
                return
            self._busy = True
        threading.Thread(target=self._run, args=(frozenset(job_ids),), daemon=True,
                         name="slurmexecutor-squeue").start()

    def _run(self, job_ids: frozenset[str]) -> None:
        answer: list[ev.Event] = []
        try:
            answer.append(ev.SchedulerAnswer(self.backend.states(job_ids)))
        except Exception as error:  # noqa: BLE001  (results still come in)
            log.warning("slurmexecutor: asking the scheduler failed: %s", error)
        with self._lock:
            self._answers += answer
            self._busy = False
        if not self.backend.cheap_states:
            self._wake()

    def take(self) -> list[ev.Event]:
        """The answers that came since the last call."""
        with self._lock:
            answers, self._answers = self._answers, []
        return answers
