"""Writing batches to the run folder and submitting their arrays (the owner's I/O).

A batch is C chunks of calls that up to `planned` array tasks claim:

    bNNNN/fn        the functions, pickled once per batch (retries reuse the original's)
    bNNNN/manifest  what every task reads: functions file, C, planned tasks
    bNNNN/cJJJJ.in  the chunks: call ids and pickled arguments, signed
    bNNNN/claims/   empty: tasks claim chunk J by creating claims/J (O_EXCL)
    bNNNN/aOFF.sh   the batch script of the array that starts at task OFF
    bNNNN.json      the journal: calls per chunk, the arrays submitted (for `attach`)
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cloudpickle

from slurmexecutor._log import log
from slurmexecutor.errors import SerializationError, SubmissionError
from slurmexecutor.folder import formats, sharing, spool, warm
from slurmexecutor.folder.diskio import create_exclusive, named
from slurmexecutor.folder.folders import writable_by_others
from slurmexecutor.folder.sharing import SharedArguments, SharedObjects
from slurmexecutor.schedulers import Backend
from slurmexecutor.schedulers.script import (
    ScriptSpec,
    render_script,
    time_limit_seconds,
    validate_resources,
    warning_seconds,
)


@dataclass
class Settings:
    """How an executor launches its batches."""

    resources: dict
    python: str
    setup: list[str]
    sbatch_extra: list[str]
    chunksize: int | None
    submit_window: float
    max_window: float
    max_batch: int
    slots: int
    backups: bool = False  # idle tasks run straggling chunks a second time
    keep_alive: float = 0.0  # idle tasks wait this long for the next batch (warm.py)
    #: resource -> rule(value of the failed attempt, number of the new attempt) -> value,
    #: applied to a retry after OUT_OF_MEMORY (`SlurmExecutor(retry_resources=...)`)
    retry_resources: Mapping[str, Callable[[Any, int], Any]] = field(default_factory=dict)

    def resources_key(self) -> str:
        return warm.resources_key(self.resources, self.python, self.setup, self.sbatch_extra)

    @property
    def time_limit(self) -> Any:
        return self.resources.get("time")


def grown(settings: Settings, state: str, attempt: int) -> Settings:
    """The settings a retry after `state` runs with: after OUT_OF_MEMORY, each rule of
    `retry_resources` applied to the failed attempt's value (None: not set; a rule that
    returns None removes the option); `attempt` is the new attempt's number (the first
    run is 1). Raises ValueError naming the rule if it fails or gives a bad value."""
    if state != "OUT_OF_MEMORY" or not settings.retry_resources:
        return settings
    resources = dict(settings.resources)
    for name, rule in settings.retry_resources.items():
        try:
            value = rule(resources.get(name), attempt)
        except Exception as error:
            raise ValueError(f"retry_resources[{name!r}] raised {error!r}") from error
        if value is None:
            resources.pop(name, None)
        else:
            resources[name] = value
    try:
        resources = validate_resources(resources)
    except ValueError as error:
        raise ValueError(f"retry_resources gave a bad value: {error}") from error
    log.warning("retry_resources after %s, attempt %d: %s", state, attempt, resources)
    return replace(settings, resources=resources)


@dataclass
class Chunk:
    """Calls that run together: (function index, pickled calls, count) per part, the
    calls as `formats.stored_calls`."""

    call_ids: Sequence[int]
    parts: list[tuple[int, bytes, int]]


@dataclass
class BatchSpec:
    """What the owner writes for a batch."""

    kind: str  # submit, map, fractions, retry
    functions: list[bytes] | str  # pickled table, or an earlier batch's functions file
    names: list[str]
    chunks: list[Chunk]
    planned: int
    steal: bool = True
    attempt: int = 1
    #: arguments many calls share (sharing.py): pickles to write, an earlier batch's
    #: shared file (a retry), or none
    shared: list[bytes] | str | None = None
    #: the batch's resources etc. when not the executor's (`SlurmExecutor.options`)
    settings: Settings | None = None
    reruns: int = 0  # a retry's calls ran again this often without using up a retry


def dumps(obj: Any, what: str, shared: SharedArguments | None = None) -> bytes:
    """cloudpickle `obj` (shared arguments by reference), or raise SerializationError
    naming `what` could not be."""
    try:
        return shared.dumps(obj) if shared is not None else sharing.dumps(obj)
    except Exception as exc:
        raise SerializationError(f"{what} cannot be pickled: {exc!r}") from exc


def shipped_sys_path() -> list[str]:
    """The client's sys.path for the workers, so modules next to the user import there:
    only entries that exist and that no other user can change (a path missing on a node
    could be created there by anyone), and never the implicit working directory (`''`,
    `.`; put `os.getcwd()` on sys.path to ship it). Entries left out are logged once."""
    shipped, left_out = [], []
    for entry in sys.path:
        if entry in ("", "."):
            continue
        path = os.path.abspath(entry)
        why = writable_by_others(path)
        if why is None:
            shipped.append(path)
        elif why != "does not exist here":
            left_out.append(f"{path} ({why})")
    if left_out and tuple(left_out) not in _LEFT_OUT:
        _LEFT_OUT.add(tuple(left_out))
        log.warning("not shipped to the workers' sys.path, since another user could put "
                    "modules there: %s", "; ".join(left_out))
    return shipped


_LEFT_OUT: set[tuple[str, ...]] = set()


def client_environment() -> dict[str, str]:
    """What a worker must match to unpickle what this client pickles."""
    return {"python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "cloudpickle": cloudpickle.__version__, "executable": sys.executable}


def job_name(names: list[str]) -> str:
    """slurmexecutor-<function>, with only characters safe on an #SBATCH line."""
    short = names[0].rsplit(".", 1)[-1] if names else ""
    return "slurmexecutor" + ("-" + re.sub(r"[^A-Za-z0-9_.-]", "_", short) if short else "")


def write_batch(run_dir: Path, key: bytes, number: int, spec: BatchSpec,
                throttled: bool, settings: Settings | None = None,
                announce: Callable[[int], None] | None = None) -> dict:
    """Write functions, manifest, chunks and journal; return the journal. `announce`
    (warm.Signal.written) tells warm tasks of the batch before its journal is written
    (they need only the rest: the journal is off their path). If a write
    fails (a full disk: the error names ENOSPC or EDQUOT), the batch's files are removed
    again, so a failed batch does not keep filling the disk."""
    try:
        return _write_batch(run_dir, key, number, spec, throttled, settings, announce)
    except BaseException as error:
        shutil.rmtree(spool.batch_dir(run_dir, number), ignore_errors=True)
        spool.journal_path(run_dir, number).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise named(error, spool.batch_dir(run_dir, number)) from None
        raise


def _write_batch(run_dir: Path, key: bytes, number: int, spec: BatchSpec,
                 throttled: bool, settings: Settings | None,
                 announce: Callable[[int], None] | None) -> dict:
    spool.make_batch_dir(run_dir, number)
    if isinstance(spec.functions, str):
        functions_file = spec.functions
    else:
        functions_file = str(spool.functions_path(run_dir, number).relative_to(run_dir))
        spool.write_blob(run_dir / functions_file, key, {
            "functions": spec.functions, "names": spec.names,
            "sys_path": shipped_sys_path(), "env": client_environment()})
    shared_file = spec.shared if isinstance(spec.shared, str) else None
    if isinstance(spec.shared, list) and spec.shared:
        path = spool.shared_path(run_dir, number)
        spool.write_blob(path, key, {"objects": spec.shared})
        shared_file = str(path.relative_to(run_dir))
    spool.write_blob(spool.manifest_path(run_dir, number), key, {
        "functions": functions_file, "chunks": len(spec.chunks), "tasks": spec.planned,
        "steal": spec.steal, "shared": shared_file,
        "backups": bool(settings and settings.backups and spec.steal),
        "keep_alive": settings.keep_alive if settings and spec.steal else 0,
        "resources": settings.resources_key() if settings else None,
        "chunk_calls": max((len(chunk.call_ids) for chunk in spec.chunks), default=0),
        "names": " ".join(spec.names),  # what a task's clock measures (walltime.py)
        "warning": warning_seconds(time_limit_seconds(settings.time_limit)) if (
            settings and settings.time_limit) else 0})
    for index, chunk in enumerate(spec.chunks):
        spool.write_blob(spool.chunk_path(run_dir, number, index), key, {
            "calls": chunk.call_ids, "parts": chunk.parts})
    if announce is not None:
        announce(number)
    journal = {
        "batch": number, "kind": spec.kind, "created": time.time(), "functions": spec.names,
        "functions_file": functions_file, "shared_file": shared_file,
        "attempt": spec.attempt, "reruns": spec.reruns, "planned": spec.planned,
        "steal": spec.steal, "throttled": throttled,
        "chunks": [formats.compress_ids(chunk.call_ids) for chunk in spec.chunks],
        "arrays": [],
    }
    spool.write_journal(run_dir, journal, key)
    return journal


def submit_arrays(backend: Backend, settings: Settings, run_dir: Path, key: bytes,
                  journal: dict, first: int, count: int, throttled: bool,
                  width: int = 1) -> Iterator[tuple[str, int, int]]:
    """Submit tasks first..first+count-1 as arrays cut at MaxArraySize, each recorded in
    the journal as it goes out (scripts and journals signed with `key`); yield (job id,
    offset, size). Raises SubmissionError."""
    number, offset, end = journal["batch"], first, first + count
    throttle = max(1, width) if throttled else settings.resources.get("array_parallelism")
    while offset < end:
        try:
            size = min(backend.max_array_size(), end - offset)
            spec = ScriptSpec(run_dir=run_dir, batch=number, size=size, offset=offset,
                              job_name=job_name(journal["functions"]), python=settings.python,
                              throttle=throttle, setup=settings.setup,
                              sbatch_extra=settings.sbatch_extra)
            for index in range(offset, offset + size):  # streams the client has seen from
                create_exclusive(spool.stream_path(run_dir, number, index, 0), b"")
            script = spool.script_path(run_dir, number, offset)  # the start (fast verdicts)
            text = render_script(settings.resources, spec)
            spool.write_atomic(script, spool.sign_script(script, key, text).encode())
            job_id = backend.submit_array(script, size, run_dir / "logs", throttle)
        except SubmissionError:
            raise
        except Exception as error:  # disk full, ...: the calls fail, they do not hang
            raise SubmissionError(f"could not submit the batch: {error!r}") from error
        journal["arrays"].append({"job_id": job_id, "offset": offset, "size": size,
                                  "time": time.time()})  # queue wait from here
        try:
            spool.write_journal(run_dir, journal, key)
        except OSError as error:  # the job runs; only reattaching would miss it
            log.warning("batch %d: could not update its journal: %s", number, error)
        yield job_id, offset, size
        offset += size


def lift_throttle(backend: Backend, settings: Settings, run_dir: Path, journal: dict,
                  to: int) -> None:
    """Let `to` tasks of the batch run at once (0: all it planned, or array_parallelism)."""
    journal["throttled"] = to > 0
    spool.write_journal(run_dir, journal)
    limit = settings.resources.get("array_parallelism") or 0
    share = -(-to // max(1, len(journal["arrays"])))  # split over arrays cut at MaxArraySize
    throttle = min(share, limit) if to and limit else (share if to else limit)
    for array in journal["arrays"]:
        try:
            backend.set_throttle(array["job_id"], throttle)
        except SubmissionError as error:  # the array may have ended meanwhile
            log.info("batch %d: could not lift the throttle: %s", journal["batch"], error)


def retry_chunks(run_dir: Path, key: bytes, number: int, calls: dict[int, tuple[int, ...]],
                 shared_file: str | None) -> list[Chunk]:
    """The calls to run again, one new chunk per original chunk (arguments re-pickled
    only for chunks some of whose calls are not retried; shared arguments stay shared,
    in the original batch's file)."""
    objects = SharedObjects(lambda: spool.read_blob(run_dir / shared_file, key)["objects"]
                            ) if shared_file else None
    chunks = []
    for index, wanted_ids in sorted(calls.items()):
        stored = spool.read_blob(spool.chunk_path(run_dir, number, index), key)
        wanted = set(wanted_ids)
        if wanted >= set(stored["calls"]):
            chunks.append(Chunk(list(stored["calls"]), list(stored["parts"])))
            continue
        ids: list[int] = []
        parts: list[tuple[int, bytes, int]] = []
        position = 0
        for fn_index, blob, count in stored["parts"]:
            arguments = objects.loads(blob) if objects else cloudpickle.loads(blob)
            shared = objects.as_shared() if objects else None
            for offset in range(count):
                call_id = stored["calls"][position + offset]
                if call_id in wanted:
                    ids.append(call_id)
                    args, kwargs = formats.call_at(arguments, offset)
                    parts.append((fn_index, dumps(formats.stored_calls([args], [kwargs]),
                                                  "an argument", shared), 1))
            position += count
        chunks.append(Chunk(ids, parts))
    return chunks


def without_calls(spec: BatchSpec, keep: set[int]) -> BatchSpec:
    """The batch with only the calls in `keep` (a part is kept or dropped whole)."""
    chunks = []
    for chunk in spec.chunks:
        ids: list[int] = []
        parts = []
        position = 0
        for part in chunk.parts:
            part_ids = chunk.call_ids[position:position + part[2]]
            position += part[2]
            if any(c in keep for c in part_ids):
                ids += part_ids
                parts.append(part)
        if ids:
            chunks.append(Chunk(ids, parts))
    return BatchSpec(spec.kind, spec.functions, spec.names, chunks,
                     min(spec.planned, len(chunks)), spec.steal, spec.attempt, spec.shared,
                     spec.settings)


#: at most this many chunks (so files) per batch, whatever the cluster's size
MAX_CHUNKS = 1024
#: a chunk of calls measured cheap holds at least this much work (seconds)
MIN_CHUNK_SECONDS = 0.2


def auto_chunksize(calls: int, slots: int, seconds_per_call: float | None = None,
                   chunks_per_slot: int = 4) -> int:
    """Calls per chunk: `chunks_per_slot` chunks per slot for balance, but never more
    than MAX_CHUNKS chunks, so a big cluster does not turn a map into a file per call;
    and when earlier batches of the same functions measured their calls, at least
    MIN_CHUNK_SECONDS of work per chunk, so cheap calls do not cost a file each."""
    chunks = max(1, min(chunks_per_slot * slots, MAX_CHUNKS))
    size = -(-calls // chunks)
    if seconds_per_call is not None:
        size = max(size, math.ceil(MIN_CHUNK_SECONDS / max(seconds_per_call, 1e-6)))
    return max(1, min(size, calls))
