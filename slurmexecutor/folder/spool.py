"""The folder protocol: layout, authenticated serialisation and atomic writes.

Everything the client and the workers exchange goes through one folder on a filesystem
both can see. The folder is the journal: a new client can find every run in it again.

    <folder>/                        mode 0700 (folders.py: refused if others may write it)
      key                            32 random bytes (0600): the HMAC key of this folder
      <run>/                         one executor session
        run.json                     when, where, which backend (plain JSON)
        lease                        the driving client's heartbeat: host, pid, token, ttl,
                                     last renewal (JSON; see lease.py)
        b0003.json                   batch journal: calls per chunk, array job ids
        b0003/                       everything else of batch 3 (a finished batch's
                                     folder is never listed again)
          fn                         the batch's functions, pickled once (signed blob)
          manifest                   for its tasks: functions file, chunk and task counts
          shared                     arguments shared by many calls, pickled once (signed)
          c0005.in                   call ids and arguments of chunk 5 (signed blob)
          c0005.cancel               call ids of chunk 5 the client cancelled, signed lines (cancels.py)
          claims/5                   created (O_EXCL) by the task that runs chunk 5
          t0007.r0.out               records array task 7 appended (attempt 0)
          a0.sh                      the batch script of the array starting at task 0
        logs/JOB_INDEX.log           an array task's stdout and stderr

Signed blobs and records carry an HMAC-SHA256 of their payload AND of the file's own
name (`run/batch/file`); nothing is unpickled before its signature checks, so a truncated,
corrupted, forged, or swapped file (one moved to another name or run) is rejected. The
key and the folders must belong to the user and be private, or they are refused.
A result stream is a sequence of records, each `length | hmac | payload` (framing.py:
lengths of 4 GiB or more take 8 more bytes), appended by
one process per attempt: a task that dies half-way keeps every record it completed.

This module must stay light: the worker imports it, and a task's start-up time matters.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import io
import json
import os
import pickle
import signal
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from slurmexecutor.errors import IntegrityError
from slurmexecutor.folder.diskio import append_whole, write_atomic
from slurmexecutor.folder.folders import ensure_private_dir
from slurmexecutor.folder.formats import RESULTS, unpack_results
from slurmexecutor.folder.framing import pack_header, read_header

KEY_FILE = "key"
BLOB_MAGIC = b"SLXB1"


def load_key(folder: Path, *, create: bool = False) -> bytes:
    """Read the folder's HMAC key, creating it (0600) on first use when `create`."""
    path = folder / KEY_FILE
    if create and not path.exists():
        ensure_private_dir(folder)
        tmp = folder / f".{KEY_FILE}.{os.getpid()}.{os.urandom(4).hex()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(os.urandom(32))
        try:
            os.link(tmp, path)  # appears whole, or not at all (another client won)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        key = handle.read()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise IntegrityError(f"{path} must belong to you and be private (mode 0600)")
    if len(key) != 32:
        raise IntegrityError(f"{path} is not a valid key file ({len(key)} bytes)")
    return key


def _digest(key: bytes, path: Path, payload: bytes | memoryview) -> bytes:
    """HMAC of the payload bound to its place: `run/batch/file`, so a file moved or
    copied to another name (or batch, or run) does not authenticate there."""
    mac = _keyed(key, "/".join(path.parts[-3:])).copy()
    mac.update(payload)
    return mac.digest()


@functools.lru_cache(maxsize=1024)
def _keyed(key: bytes, place: str) -> hmac.HMAC:
    """The HMAC state after the key and the place (copied per record: 3 us -> 1 us)."""
    return hmac.new(key, f"{place}\0".encode(), hashlib.sha256)


def write_blob(path: Path, key: bytes, obj: Any) -> None:
    """Pickle `obj` (plain pickle: callers cloudpickle user objects first) and sign it."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    digest = _digest(key, path, payload)
    write_atomic(path, BLOB_MAGIC + pack_header(len(payload), digest) + payload)


def read_blob(path: Path, key: bytes) -> Any:
    """Read a blob written by `write_blob`, refusing it unless its signature checks."""
    data = path.read_bytes()
    header = read_header(io.BytesIO(data[len(BLOB_MAGIC):]), len(data) - len(BLOB_MAGIC))
    if not data.startswith(BLOB_MAGIC) or header is None:
        raise IntegrityError(f"{path} is not a slurmexecutor file or is truncated")
    length, digest, size = header
    payload = memoryview(data)[len(BLOB_MAGIC) + size:]
    if len(payload) != length:
        raise IntegrityError(f"{path} is truncated ({len(payload)} of {length} bytes)")
    if not hmac.compare_digest(digest, _digest(key, path, payload)):
        raise IntegrityError(f"{path} failed authentication (corrupted, moved, or not ours)")
    return pickle.loads(payload)


def encode_record(key: bytes, path: Path, record: tuple) -> bytes:
    """One signed record as it is appended to the stream at `path`."""
    payload = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
    return pack_header(len(payload), _digest(key, path, payload)) + payload


class RecordWriter:
    """Appends signed records to a result stream, each whole or not at all (a write
    that fails half-way, e.g. on ENOSPC, is cut off again: diskio.append_whole). The
    signals in `hold` wait while a record is written: their handlers append records
    too, which must not land between the short writes of one."""

    def __init__(self, path: Path, key: bytes, hold: Collection[int] = ()) -> None:
        self._key, self.path, self._hold = key, path, frozenset(hold)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def write(self, record: tuple) -> None:
        data = encode_record(self._key, self.path, record)
        if not self._hold:
            append_whole(self.fd, data, self.path)
            return
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, self._hold)
        try:
            append_whole(self.fd, data, self.path)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def close(self) -> None:
        os.close(self.fd)


class StreamCursor:
    """How far the client has read one result stream."""

    __slots__ = ("error", "more", "offset", "opened", "path", "pending_bytes")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.pending_bytes = 0  # bytes after the last complete record
        self.more = False  # the last read stopped at its limit: whole records are left
        self.error: str | None = None  # set once a record failed authentication
        self.opened = False  # the stream was opened once: it exists (empty, maybe)


def read_records(cursor: StreamCursor, key: bytes, most: int | None = None) -> list[tuple]:
    """Return the complete records appended to a stream since the cursor, advancing it
    (`iter_records`, all at once)."""
    return list(iter_records(cursor, key, most))


def iter_records(cursor: StreamCursor, key: bytes, most: int | None = None
                 ) -> Iterator[tuple]:
    """The complete records appended to a stream since the cursor, one at a time (one
    payload in memory), advancing the cursor past each; at most `most` of them
    (`cursor.more` then says whole records are left for the next read).

    An incomplete record at the end is left for the next read (its writer may still be
    writing it); only its header is read until it is complete. A record whose signature
    fails stops the stream: `cursor.error` says where, and nothing after it is trusted.
    """
    if cursor.error:
        return
    try:
        handle = open(cursor.path, "rb")  # noqa: SIM115  (closed below; a generator)
    except FileNotFoundError:
        return
    cursor.opened, cursor.more, count = True, False, 0
    with handle:
        size = os.fstat(handle.fileno()).st_size
        handle.seek(cursor.offset)
        while (header := read_header(handle, size - cursor.offset)) is not None:
            length, digest, header_size = header
            end = cursor.offset + header_size + length
            if end > size:
                break
            payload = handle.read(length)
            if not hmac.compare_digest(digest, _digest(key, cursor.path, payload)):
                cursor.error = (
                    f"{cursor.path}: record at byte {cursor.offset} failed "
                    "authentication (the file was corrupted or written by someone else)")
                break
            cursor.offset = end
            record = pickle.loads(payload)
            if record[0] == RESULTS:  # several calls' records in one (worker/outbox.py)
                subrecords = unpack_results(record[2])
                yield from subrecords
                count += len(subrecords)
            else:
                yield record
                count += 1
            if most is not None and count >= most and cursor.offset < size:
                cursor.more = True
                break
        cursor.pending_bytes = 0 if cursor.more else size - cursor.offset


# -- names ---------------------------------------------------------------------------


def batch_name(batch: int) -> str:
    return f"b{batch:04d}"


def task_name(batch: int, task: int) -> str:
    return f"{batch_name(batch)}.t{task:04d}"


def chunk_name(batch: int, chunk: int) -> str:
    return f"{batch_name(batch)}.c{chunk:04d}"


def batch_dir(run_dir: Path, batch: int) -> Path:
    return run_dir / batch_name(batch)


def manifest_path(run_dir: Path, batch: int) -> Path:
    """What every task of a batch needs: its functions file, chunk and task counts."""
    return batch_dir(run_dir, batch) / "manifest"


def functions_path(run_dir: Path, batch: int) -> Path:
    return batch_dir(run_dir, batch) / "fn"


def shared_path(run_dir: Path, batch: int) -> Path:
    return batch_dir(run_dir, batch) / "shared"


def journal_path(run_dir: Path, batch: int) -> Path:
    return run_dir / f"{batch_name(batch)}.json"


def chunk_path(run_dir: Path, batch: int, chunk: int) -> Path:
    return batch_dir(run_dir, batch) / f"c{chunk:04d}.in"


def claims_dir(run_dir: Path, batch: int) -> Path:
    return batch_dir(run_dir, batch) / "claims"


def claim_path(run_dir: Path, batch: int, chunk: int) -> Path:
    return claims_dir(run_dir, batch) / str(chunk)


def stream_path(run_dir: Path, batch: int, task: int, attempt: int) -> Path:
    return batch_dir(run_dir, batch) / f"t{task:04d}.r{attempt}.out"


def script_path(run_dir: Path, batch: int, offset: int) -> Path:
    return batch_dir(run_dir, batch) / f"a{offset}.sh"


def reserve_batch_dir(run_dir: Path, batch: int) -> bool:
    """Create a batch's folder if no client has (False if one has: a client that took
    the run over and the one it took it from may both be writing batches for a while)."""
    try:
        batch_dir(run_dir, batch).mkdir(mode=0o700)
    except FileExistsError:
        return False
    return True


def make_batch_dir(run_dir: Path, batch: int) -> Path:
    """Create a batch's folder and its claims folder (private, like the run)."""
    path = batch_dir(run_dir, batch)
    path.mkdir(mode=0o700, exist_ok=True)
    claims_dir(run_dir, batch).mkdir(mode=0o700, exist_ok=True)
    return path


def parse_stream_name(name: str) -> tuple[int, int] | None:
    """`t0007.r1.out` (in a batch's folder) -> (7, 1): task and attempt; None for any
    other file name."""
    parts = name.split(".")
    if len(parts) != 3 or parts[2] != "out" or not parts[0].startswith("t") or (
            not parts[1].startswith("r")):
        return None
    try:
        return int(parts[0][1:]), int(parts[1][1:])
    except ValueError:
        return None


def parse_batch_name(name: str) -> int | None:
    """`b0003` -> 3; None for any other name (journals end in .json)."""
    if not name.startswith("b") or not name[1:].isdigit():
        return None
    return int(name[1:])


def iter_streams(run_dir: Path) -> Iterator[tuple[int, int, Path]]:
    """Every result stream of a run: (batch, task, path), in batch and task order."""
    try:
        batches = sorted((number, entry.path) for entry in os.scandir(run_dir)
                         if (number := parse_batch_name(entry.name)) is not None)
    except FileNotFoundError:
        return
    for number, path in batches:
        streams = []
        for entry in os.scandir(path):
            parsed = parse_stream_name(entry.name)
            if parsed is not None:
                streams.append((parsed, Path(entry.path)))
        for (task, _attempt), stream in sorted(streams):
            yield number, task, stream


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1).encode())


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


SIGNATURE = "hmac"  # the field of a signed JSON file (run.json, journals)


def _json_digest(key: bytes, path: Path, obj: dict) -> str:
    """HMAC of a JSON object's canonical text, bound to `run/file` (not to the folder's
    name: a folder may be moved)."""
    text = json.dumps(obj, sort_keys=True).encode()
    return _digest(key, Path(*path.parts[-2:]), text).hex()


def write_signed_json(path: Path, key: bytes, obj: dict) -> None:
    """`obj` as JSON (readable as before), with its signature as field `hmac`."""
    plain = json.loads(json.dumps(obj))  # tuples -> lists: what a reader will see
    plain.pop(SIGNATURE, None)
    write_json(path, {**plain, SIGNATURE: _json_digest(key, path, plain)})


def read_signed_json(path: Path, key: bytes) -> dict:
    """A file of `write_signed_json`; IntegrityError unless its signature checks."""
    obj = read_json(path)
    digest = obj.pop(SIGNATURE, None) if isinstance(obj, dict) else None
    if not isinstance(digest, str):
        raise IntegrityError(f"{path} is not signed (damaged, written by someone else, or "
                             "by a slurmexecutor before signatures)")
    if not hmac.compare_digest(digest, _json_digest(key, path, obj)):
        raise IntegrityError(f"{path} failed authentication (changed, moved, or not ours)")
    return obj


def read_journals(run_dir: Path, key: bytes | None = None) -> list[dict]:
    """A run's batch journals, in batch order (by number: b10000 comes after b9999),
    each checked against the folder's key."""
    key = key if key is not None else load_key(run_dir.parent)
    journals = [read_signed_json(path, key) for path in run_dir.glob("b*.json")]
    return sorted(journals, key=lambda journal: journal["batch"])


def write_journal(run_dir: Path, journal: dict, key: bytes | None = None) -> None:
    key = key if key is not None else load_key(run_dir.parent)
    write_signed_json(journal_path(run_dir, journal["batch"]), key, journal)


SCRIPT_SIGNATURE = "# slurmexecutor-hmac: "  # the last line of a signed batch script


def sign_script(path: Path, key: bytes, text: str) -> str:
    """`text` with a last line that signs it (a comment for bash and sbatch)."""
    return f"{text}{SCRIPT_SIGNATURE}{_digest(key, path, text.encode()).hex()}\n"


def verified_script(path: Path, key: bytes) -> str:
    """The text of a script `sign_script` wrote (its signature line removed), or
    IntegrityError: the local backend runs nothing else."""
    text = path.read_text()
    body, found, digest = text.rstrip("\n").rpartition("\n" + SCRIPT_SIGNATURE)
    body += "\n"
    if not found or not hmac.compare_digest(digest, _digest(key, path, body.encode()).hex()):
        raise IntegrityError(f"{path} is not a batch script signed with this folder's key")
    return body
