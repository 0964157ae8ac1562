"""slurmexecutor: a Slurm cluster as a `concurrent.futures.Executor`.

    from slurmexecutor import SlurmExecutor, map_reduce

Names are imported lazily, so that `python -m slurmexecutor.worker.supervisor` (what every array
task runs) does not pay for the client side.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "SlurmExecutor": "executor",
    "SlurmFuture": "executor",
    "map_reduce": "mapreduce",
    "map_reduce_async": "mapreduce",
    "MapReduceResult": "mapreduce",
    "MapReduceTask": "mapreduce",
    "reducers": None,
    "errors": None,
    "progress": "owner.bars",
    "SlurmExecutorError": "errors",
    "SubmissionError": "errors",
    "SubmissionDeferred": "errors",
    "SerializationError": "errors",
    "DependencyError": "errors",
    "IntegrityError": "errors",
    "EnvironmentMismatchError": "errors",
    "RunNotFoundError": "errors",
    "RunInUseError": "errors",
    "RunFormatError": "errors",
    "RemoteError": "errors",
    "RemoteTraceback": "errors",
    "TaskFailedError": "errors",
    "JobTimeoutError": "errors",
    "OutOfMemoryError": "errors",
    "NodeFailureError": "errors",
    "PreemptedError": "errors",
    "JobCancelledError": "errors",
    "WorkerCrashedError": "errors",
    "CallLostError": "errors",
    "UnsafeFolderError": "folders",
}
__all__ = list(_EXPORTS)
importlib.import_module(".apps.joblib_backend", __name__).register_on_import()  # joblib: see there


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'slurmexecutor' has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name] or name}", __name__)
    return module if _EXPORTS[name] is None else getattr(module, name)
