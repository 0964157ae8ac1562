"""A call's own error reaches the client, even when the error itself misbehaves."""

from __future__ import annotations

import pytest

from slurmexecutor import WorkerCrashedError


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


class ExitOnPickle:
    def __reduce__(self):
        raise SystemExit(3)


class ExitOnPickleError(Exception):
    def __reduce__(self):
        raise SystemExit(4)


def raise_bad_str():
    raise BadStr("x")


def return_exit_on_pickle():
    return ExitOnPickle()


def raise_exit_on_pickle():
    raise ExitOnPickleError("the real error")


@pytest.mark.parametrize("fn, expected", [
    (raise_bad_str, "BadStr"),
    (return_exit_on_pickle, "SystemExit"),  # the stdlib pools give it as itself
    (raise_exit_on_pickle, "the real error"),
])
def test_the_real_error_is_reported(make_executor, fn, expected):
    ex = make_executor()
    error = ex.submit(fn).exception(timeout=120)
    assert not isinstance(error, WorkerCrashedError), repr(error)
    try:
        text = f"{type(error).__name__}: {error}"
    except RuntimeError:  # BadStr itself came back: its str() raises here too
        text = type(error).__name__
    assert expected in text, text
    assert ex.submit(abs, -1).result(timeout=120) == 1  # the worker's next calls run


def test_an_exception_with_a_bad_str_keeps_its_type(make_executor):
    error = make_executor().submit(raise_bad_str).exception(timeout=120)
    assert type(error).__name__ == "BadStr" and error.args == ("x",)
