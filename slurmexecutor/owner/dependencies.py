"""Futures as arguments: `ex.submit(g, ex.submit(f, 1))` runs `g` once `f` is done.

A call whose arguments hold futures (at the top level or nested in lists, tuples and dict
values) is a `Dependent`. It waits in the owner thread's state, not in a thread of its
own: each input future gets a done-callback that only puts `InputDone` on the owner's
queue (callbacks of this executor's futures run on the owner thread, others' on theirs).
The arguments are pickled at submit, each input future as a placeholder (so later
changes to them are not seen, as with any `submit`); when the last input is done, the
owner unpickles them with the results in the placeholders' places, pickles them again
and adds the call to the submission window like any `submit`. A failed or
cancelled input fails the call with `DependencyError`, chained to the input's exception.
"""

from __future__ import annotations

import io
import pickle
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from slurmexecutor.errors import DependencyError, SerializationError
from slurmexecutor.folder import formats
from slurmexecutor.folder.cache import CallKeys
from slurmexecutor.owner.batches import Settings, dumps
from slurmexecutor.owner.futures import SlurmFuture

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


def snapshot(args: tuple, kwargs: dict, inputs: dict[int, Future], what: str) -> bytes:
    """The arguments pickled now (later changes to them are not seen, and an argument
    that cannot be pickled fails at submit), each input future by its position."""
    buffer = io.BytesIO()
    positions = {key: index for index, key in enumerate(inputs)}
    try:
        _PlaceholderPickler(buffer, positions).dump((args, kwargs))
    except Exception as exc:
        raise SerializationError(f"{what} cannot be pickled: {exc!r}") from exc
    return buffer.getvalue()


class _PlaceholderPickler(cloudpickle.CloudPickler):
    def __init__(self, file: io.BytesIO, positions: dict[int, int]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._positions = positions

    def persistent_id(self, obj: Any) -> int | None:
        return self._positions.get(id(obj)) if isinstance(obj, Future) else None


class _ResultsLoader(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, results: list[Any]) -> None:
        super().__init__(file)
        self._results = results

    def persistent_load(self, pid: Any) -> Any:
        return self._results[pid]


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
    fn_blob: bytes
    fn_name: str
    snapshot: bytes  # the arguments pickled at submit, each input future a placeholder
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
        """The call's arguments as they were at submit, with the inputs' results in
        place."""
        results = [future.result(timeout=0) for future in self.inputs.values()]
        loader = _ResultsLoader(io.BytesIO(self.snapshot), results)
        args, kwargs = loader.load()
        return args, kwargs

    def pickled(self, args: tuple, kwargs: dict) -> bytes:
        """Raises SerializationError naming the function."""
        return dumps(formats.stored_calls([args], [kwargs]), f"an argument of {self.fn_name}")


@dataclass(eq=False)
class InputDone:
    """Put on the owner's queue by an input future's done-callback."""

    dependent: Dependent
