"""What caller threads hand the owner thread (engine.py), and the submission window.

Callers build these in their own thread (pickling happens there, so a bad argument fails
at `submit`), put them on the owner's queue, and never touch them again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slurmexecutor.owner.batches import BatchSpec, Settings
from slurmexecutor.owner.futures import FutureSink, SlurmFuture


@dataclass
class Submit:
    future: SlurmFuture
    fn_key: Any  # the digest of fn_blob (and the cache's fingerprint)
    fn_blob: bytes  # the function, pickled at submit
    fn_name: str
    arguments: bytes  # pickled [(args, kwargs)]
    settings: Settings  # the executor's, or a view's (`SlurmExecutor.options`)
    cache_key: str | None = None  # its result is stored under this key (caching.py)


@dataclass
class Launch:
    spec: BatchSpec
    sinks: list[FutureSink]
    cache_keys: dict[int, str] | None = None  # call id -> key its result is stored under


@dataclass
class CachedResult:
    """A call the result cache answered: the owner completes its future."""

    future: SlurmFuture
    value: Any


@dataclass
class CancelCalls:
    call_ids: frozenset[int]


@dataclass
class NotifyCancelled:
    future: SlurmFuture


@dataclass
class Shutdown:
    cancel_futures: bool


@dataclass
class Window:
    """Calls submitted close together, waiting to go out as one batch."""

    opened: float
    touched: float
    settings: Settings
    functions: list[bytes] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    index: dict[Any, int] = field(default_factory=dict)
    calls: dict[int, Submit] = field(default_factory=dict)

    def add(self, request: Submit) -> int:
        position = self.index.get(request.fn_key)
        if position is None:
            position = self.index[request.fn_key] = len(self.functions)
            self.functions.append(request.fn_blob)
            self.names.append(request.fn_name)
        self.calls[request.future.call_id] = request
        return position
