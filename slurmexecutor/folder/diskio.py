"""Writing files so that a full disk or quota loses nothing already written.

Every write loops until all bytes are out (a write may be short), an appended record
that fails half-way is cut off again (the stream stays a sequence of whole records), and
ENOSPC and EDQUOT are named in the error with what to do. The worker imports this.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

#: a worker's exit codes for what the client should name: a full disk or quota, and a
#: run folder the node does not see (ledger.task_failure turns them into advice)
EXIT_FULL, EXIT_NO_FOLDER = 75, 76
#: the batch script's own: the interpreter cannot be run (as bash's), a setup line failed
EXIT_NO_PYTHON, EXIT_SETUP = 127, 78

FULL = {errno.ENOSPC: "no space left on the device (ENOSPC)"}
if hasattr(errno, "EDQUOT"):
    FULL[errno.EDQUOT] = "disk quota exceeded (EDQUOT)"


def named(error: OSError, path: Path | str) -> OSError:
    """`error`, or for ENOSPC/EDQUOT one that names it, the file and what to do."""
    what = FULL.get(error.errno or 0)
    if what is None:
        return error
    return OSError(error.errno, f"{what} writing {path}: free some space (or quota), or "
                   "choose a folder on another filesystem", str(path))


def write_all(fd: int, data: bytes | memoryview, path: Path | str) -> None:
    """Write all of `data` to `fd`, looping over short writes."""
    view = memoryview(data)
    while view:
        try:
            done = os.write(fd, view)
        except OSError as error:
            raise named(error, path) from error
        if done == 0:  # never an answer of a working filesystem: do not spin
            raise named(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path)
        view = view[done:]


def append_whole(fd: int, data: bytes, path: Path | str) -> None:
    """Append `data` (an O_APPEND fd) as one unit: on an error, the file is cut back to
    where it began, so a half-written record never precedes the next one."""
    start = os.lseek(fd, 0, os.SEEK_END)
    try:
        write_all(fd, data, path)
    except OSError:
        try:
            if os.fstat(fd).st_size > start:
                os.ftruncate(fd, start)
        except OSError:
            pass
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either nothing or all of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            write_all(fd, data, path)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create `path` and write `data`; False if it exists (O_EXCL: atomic, NFS too). A
    write that fails (a full disk) removes the file again: no half-written one stays."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        write_all(fd, data, path)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    return True


def create_holding(path: Path, data: bytes) -> bool:
    """Create `path` already holding `data` (so it is never seen empty); False if it
    exists. Exclusive like O_EXCL: a hard link of a private file never replaces one
    (on NFS a retried LINK may answer EEXIST for its own link: the link count says)."""
    private = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    try:
        if not create_exclusive(private, data):
            raise FileExistsError(private)
        try:
            os.link(private, path)
            return True
        except FileExistsError:
            return os.stat(private).st_nlink == 2
        except OSError:  # no hard links here: create, then write (seen empty briefly)
            return create_exclusive(path, data)
    finally:
        private.unlink(missing_ok=True)
