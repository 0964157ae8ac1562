"""Reducers: how `map_reduce` folds results.

A reducer must be ASSOCIATIVE: `r(r(a, b), c) == r(a, r(b, c))`. Each array task folds
its own fraction (the combiner step) and the client folds the partials, in fraction
order, so any grouping gives the same answer as folding everything in order. It need not
be commutative: order is kept.

What `reducer=` accepts (see `as_reducer`):

| you pass                         | it means                                                   |
|----------------------------------|------------------------------------------------------------|
| `sum` (the default)              | add everything with `+`: numbers, lists, NumPy arrays;     |
|                                  | Counters are merged keeping zero counts (no `0 + Counter`) |
| `min`, `max`                     | the smallest / largest result                              |
| any binary function              | `operator.or_`, `lambda a, b: ...`                         |
| an object from this module       | `add`, `counter_merge`, `concat`, `set_union`,             |
|                                  | `dict_merge(on_conflict=...)`                              |
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from functools import reduce
from typing import Any

_MISSING = object()


class Reducer:
    """An associative binary operation with a name."""

    def __init__(self, name: str, combine: Callable[[Any, Any], Any],
                 start: Callable[[Any], Any] = lambda value: value) -> None:
        self.name = name
        self.combine = combine
        self.start = start  # turns the first value into an accumulator we may update

    def fold(self, values: Iterable, initial: Any = _MISSING) -> Any:
        """Fold `values` left to right; raise ValueError when there is nothing to fold."""
        iterator = iter(values)
        if initial is _MISSING:
            try:
                initial = next(iterator)
            except StopIteration:
                raise ValueError(f"{self.name}: nothing to reduce (empty input and no "
                                 "initial= value)") from None
        return reduce(self.combine, iterator, self.start(initial))

    def __repr__(self) -> str:
        return f"<reducer {self.name}>"


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, Counter):  # a is our own copy (see start): update it in place
        a.update(b)
        return a
    return a + b


def _own_counter(value: Any) -> Any:
    return Counter(value) if isinstance(value, Counter) else value


def _merge_counters(a: Counter, b: Any) -> Counter:
    a.update(b)
    return a


def _concat(a: list, b: Iterable) -> list:
    a.extend(b)
    return a


def _union(a: set, b: Iterable) -> set:
    a.update(b)
    return a


#: `+` for everything; Counters merged with update (keeps zero and negative counts).
add = Reducer("add", _add, _own_counter)
#: Counter merge: counts of equal keys are added, zero counts kept.
counter_merge = Reducer("counter_merge", _merge_counters, lambda value: Counter(value))
#: List concatenation, in order.
concat = Reducer("concat", _concat, lambda value: list(value))
#: Set union.
set_union = Reducer("set_union", _union, lambda value: set(value))
minimum = Reducer("min", min)
maximum = Reducer("max", max)


def dict_merge(on_conflict: str | Callable[[Any, Any, Any], Any] = "error") -> Reducer:
    """Merge dicts. `on_conflict` for a key in both: "error" (raise), "first", "last",
    or a function `(key, old, new) -> value` (e.g. to add the two values)."""
    if isinstance(on_conflict, str) and on_conflict not in ("error", "first", "last"):
        raise ValueError(f"on_conflict must be 'error', 'first', 'last' or a function, "
                         f"not {on_conflict!r}")

    def merge(a: dict, b: dict) -> dict:
        for key, value in b.items():
            if key not in a or on_conflict == "last":
                a[key] = value
            elif on_conflict == "error":
                raise KeyError(f"dict_merge: key {key!r} is in two results "
                               "(pass on_conflict='first', 'last' or a function)")
            elif callable(on_conflict):
                a[key] = on_conflict(key, a[key], value)
        return a

    return Reducer(f"dict_merge({on_conflict!r})", merge, lambda value: dict(value))


def as_reducer(reducer: Any) -> Reducer:
    """Turn what users pass as `reducer=` into a Reducer (see the module docstring)."""
    if isinstance(reducer, Reducer):
        return reducer
    if reducer is sum:
        return add
    if reducer is min:
        return minimum
    if reducer is max:
        return maximum
    if callable(reducer):
        name = getattr(reducer, "__name__", repr(reducer))
        return Reducer(name, reducer)
    raise TypeError(f"reducer must be sum, min, max, a binary function or a "
                    f"slurmexecutor.reducers object, not {reducer!r}")


__all__ = ["Reducer", "add", "as_reducer", "concat", "counter_merge", "dict_merge",
           "maximum", "minimum", "set_union"]
