"""A call's outcome as the record the child appends: its result pickled, or the
exception it raised; and whether this interpreter can run the client's calls at all."""

from __future__ import annotations

import pickle
import sys
import traceback
from typing import Any


def dump_result(value: Any) -> bytes:
    """A result pickled: by plain pickle when it can (a tenth of cloudpickle's cost for
    small values), else by cloudpickle (functions, classes defined in a call)."""
    import cloudpickle

    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001  (what pickle cannot do by reference)
        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def loads(blob: bytes):
    return pickle.loads(blob)


def raised_record(call_id: int, exc: BaseException) -> tuple:
    import cloudpickle

    try:
        text = "".join(traceback.format_exception(exc))
    except BaseException:  # noqa: BLE001
        text = f"{type(exc).__name__} (its traceback could not be formatted)\n"
    try:
        blob = cloudpickle.dumps(exc)
        loads(blob)  # an exception that pickles but cannot be rebuilt is no use
    except BaseException:  # noqa: BLE001  (its __reduce__ may raise anything, SystemExit too)
        blob = None
    kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return ("raised", call_id, {"blob": blob, "type": kind, "message": exception_text(exc),
                                "tb": text})


def exception_text(exc: BaseException) -> str:
    """str(exc), or what its failing __str__ raised: never an error of its own."""
    try:
        return str(exc)
    except BaseException as error:  # noqa: BLE001
        return f"<str() of {type(exc).__name__} raised {type(error).__name__}>"


def environment_mismatch(client: dict | None) -> str | None:
    """Why this interpreter cannot unpickle what the client pickled (another Python
    major.minor, another cloudpickle), or None; checked before anything is unpickled."""
    if not client:
        return None
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    problems = []
    if client.get("python") != here:
        problems.append(f"Python {here} here, {client.get('python')} on the client")
    try:
        import cloudpickle

        version: str | None = cloudpickle.__version__
    except ImportError:
        version = None
    if version is None:
        problems.append(f"cloudpickle is not installed here ({client.get('cloudpickle')} "
                        "on the client)")
    elif client.get("cloudpickle") != version:
        problems.append(f"cloudpickle {version} here, {client.get('cloudpickle')} on the "
                        "client")
    if not problems:
        return None
    return (f"the worker's environment does not match the client's: {'; '.join(problems)} "
            f"(worker interpreter {sys.executable}, client interpreter "
            f"{client.get('executable')}); pass python= (and setup=) an interpreter with "
            "the client's Python and cloudpickle versions")
