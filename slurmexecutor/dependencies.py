"""Futures as arguments: `ex.submit(g, ex.submit(f, 1))` runs `g` once `f` is done.

A call whose arguments hold futures (at the top level or nested in lists, tuples and dict
values) is a `Dependent`. It waits in the owner thread's state, not in a thread of its
own: each input future gets a done-callback that only puts `InputDone` on the owner's
queue (callbacks of this executor's futures run on the owner thread, others' on theirs).
When the last input is done, the owner puts the results in place of the futures, pickles
the arguments and adds the call to the submission window like any `submit`. A failed or
cancelled input fails the call with `DependencyError`, chained to the input's exception.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any

from .batches import Settings, dumps
from .cache import CallKeys
from .errors import DependencyError
from .futures import SlurmFuture

#: containers searched for futures (and rebuilt with the results in their place)
_CONTAINERS = (list, tuple, dict)


def find_futures(obj: Any, found: dict[int, Future] | None = None) -> dict[int, Future]:
    """The futures in `obj`, by id, in the order met (lists, tuples, dict values)."""
    found = {} if found is None else found
    if isinstance(obj, Future):
        found.setdefault(id(obj), obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            if isinstance(value, (Future, *_CONTAINERS)):
                find_futures(value, found)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            if isinstance(item, (Future, *_CONTAINERS)):
                find_futures(item, found)
    return found


def substitute(obj: Any, results: dict[int, Any]) -> Any:
    """`obj` with every future replaced by its result (containers rebuilt, same types
    where they can be: namedtuples and dict subclasses included)."""
    if isinstance(obj, Future):
        return results[id(obj)]
    if isinstance(obj, dict):
        items = [(key, substitute(value, results)) for key, value in obj.items()]
        if type(obj) is dict:
            return dict(items)
        try:
            return type(obj)(items)
        except TypeError:  # e.g. defaultdict: keep its default factory
            rebuilt = obj.copy()
            rebuilt.update(items)
            return rebuilt
    if isinstance(obj, list):
        return [substitute(item, results) for item in obj]
    if isinstance(obj, tuple):
        items = [substitute(item, results) for item in obj]
        if type(obj) is tuple:
            return tuple(items)
        if hasattr(obj, "_fields"):  # a namedtuple
            return type(obj)(*items)
        return type(obj)(items)
    return obj


def describe(future: Future) -> str:
    """How an error names an input: its call id when it is one of ours."""
    if isinstance(future, SlurmFuture):
        return f"call {future.call_id} (run {future._engine.run_dir.name})"
    return repr(future)


@dataclass(eq=False)
class Dependent:
    """A submitted call waiting for its input futures (owned by the owner thread)."""

    future: SlurmFuture
    fn_key: Any
    fn: Callable
    fn_blob: bytes
    fn_name: str
    args: tuple
    kwargs: dict
    settings: Settings
    inputs: dict[int, Future] = field(default_factory=dict)
    remaining: int = 0
    call_keys: CallKeys | None = None  # its key maker, when the result cache is on

    def failed_input(self) -> DependencyError | None:
        """The error for the first input that failed or was cancelled, if any."""
        for future in self.inputs.values():
            if future.cancelled():
                error = DependencyError(
                    f"{self.fn_name}: its input {describe(future)} was cancelled")
                error.__cause__ = CancelledError()
                return error
            exc = future.exception(timeout=0)
            if exc is not None:
                error = DependencyError(
                    f"{self.fn_name}: its input {describe(future)} failed: "
                    f"{type(exc).__name__}: {exc}")
                error.__cause__ = exc
                return error
        return None

    def resolved(self) -> tuple[tuple, dict]:
        """The call's arguments with the inputs' results in place."""
        results = {key: future.result(timeout=0) for key, future in self.inputs.items()}
        return substitute(self.args, results), substitute(self.kwargs, results)

    def pickled(self, args: tuple, kwargs: dict) -> bytes:
        """Raises SerializationError naming the function."""
        return dumps([(args, kwargs)], f"an argument of {self.fn_name}")


@dataclass(eq=False)
class InputDone:
    """Put on the owner's queue by an input future's done-callback."""

    dependent: Dependent
