"""Private folders: created 0700, or refused when someone else could change them.

Another user who can write the run folder (or any folder above it) can put code on the
workers' PYTHONPATH, so every component is checked with `lstat` (symbolic links are not
followed blindly), and nothing we did not create is ever chmodded.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

TRUSTED_OWNERS = (0,)  # besides the user: root owns /, /home, /tmp ...


class UnsafeFolderError(PermissionError):
    """A folder (or a folder above it) that another user could change."""


def _refuse(path: str, why: str, fix: str) -> UnsafeFolderError:
    return UnsafeFolderError(f"{path} {why}, so another user could run code as you "
                             f"through it; {fix}")


def _check_ancestor(path: str, info: os.stat_result) -> None:
    """A folder above ours: owned by root or us, and writable only by its owner unless
    it is sticky (/tmp: others cannot rename what is ours in it)."""
    if info.st_uid not in (os.getuid(), *TRUSTED_OWNERS):
        raise _refuse(path, f"belongs to another user (uid {info.st_uid})",
                      "choose a folder under one that only you (or root) own")
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        raise _refuse(path, "is writable by group or others (not sticky)",
                      f"choose a folder elsewhere, or run `chmod go-w {path}`")


def _check_own(path: str, info: os.stat_result) -> None:
    """The folder itself (or one we would use as ours): a real folder, ours, and not
    writable by anyone else."""
    if stat.S_ISLNK(info.st_mode):
        raise _refuse(path, "is a symbolic link",
                      f"pass the folder it points to ({os.path.realpath(path)}) if it is yours")
    if not stat.S_ISDIR(info.st_mode):
        raise _refuse(path, "is not a folder", "choose another path")
    if info.st_uid != os.getuid():
        raise _refuse(path, f"belongs to another user (uid {info.st_uid})",
                      "choose a folder of yours")
    if info.st_mode & 0o022:
        raise _refuse(path, "is writable by group or others",
                      f"run `chmod go-w {path}` (check what is inside first) or choose "
                      "a new folder")


def _walk(path: str) -> list[str]:
    """`/a/b/c` -> ['/', '/a', '/a/b', '/a/b/c']."""
    parts, current = [], path
    while True:
        parts.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            return parts[::-1]
        current = parent


def _check_above(path: str) -> str:
    """Check every folder above `path`: those of the path as given, and for each
    symbolic link on it, those of the folder that really holds it (that folder decides
    who may replace the link: the path stays in use as given), and those of the path
    resolved; return the real path of its parent."""
    parent = os.path.dirname(path)
    real = os.path.realpath(parent)
    folders = {real}
    for component in _walk(parent):
        info = os.lstat(component)
        if not stat.S_ISLNK(info.st_mode):
            _check_ancestor(component, info)
            continue
        if info.st_uid not in (os.getuid(), *TRUSTED_OWNERS):
            raise _refuse(component, f"is a symbolic link of another user (uid {info.st_uid})",
                          "choose a folder under one that only you (or root) own")
        folders.add(os.path.realpath(os.path.dirname(component)))
    for folder in sorted(folders):
        for component in _walk(folder):
            _check_ancestor(component, os.lstat(component))
    return real


def ensure_private_dir(path: Path, *, ancestors: bool = True) -> Path:
    """Create `path` (and missing parents) with mode 0700 and return it.

    A folder that already exists must be a real folder (not a symbolic link), belong to
    the user, and not be writable by group or others; the folders above it must belong to
    the user or root and not be writable by others (unless sticky). Anything else raises
    `UnsafeFolderError` naming the folder and the fix; no existing folder is chmodded.
    `ancestors=False` skips the folders above (for a folder inside one already checked).
    """
    absolute = os.path.abspath(os.fspath(path))
    try:
        info: os.stat_result | None = os.lstat(absolute)
    except FileNotFoundError:
        info = None
    if info is not None:
        _check_own(absolute, info)
        if ancestors:
            _check_above(absolute)
        return path
    missing = []
    current = absolute
    while not os.path.lexists(current):
        missing.append(current)
        current = os.path.dirname(current)
    if ancestors:
        _check_above(missing[-1])
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:  # another process made it: check it like any other
            _check_own(folder, os.lstat(folder))
            continue
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            if os.fstat(fd).st_uid != os.getuid():
                raise _refuse(folder, "changed while it was being created", "try again")
            os.fchmod(fd, 0o700)  # ours: undo a umask or default ACL that opened it
        finally:
            os.close(fd)
    return path


def writable_by_others(path: str, *, any_owner: bool = False) -> str | None:
    """Why another user could change what `path` (a sys.path entry) holds, or None. A
    sticky folder does not help here: anyone may add a module to it. `any_owner`: a
    folder of another account that only it can write passes (cluster software)."""
    try:
        info = os.stat(path)
    except OSError:
        return "does not exist here"
    if not any_owner and info.st_uid not in (os.getuid(), *TRUSTED_OWNERS):
        return f"belongs to another user (uid {info.st_uid})"
    if info.st_mode & 0o022:
        return "is writable by group or others"
    return None


#: filesystems that live on one node: a folder there is not seen by the others
NODE_LOCAL_TYPES = {"tmpfs", "ramfs", "devtmpfs"}
LOCAL_DISK_TYPES = {"ext2", "ext3", "ext4", "xfs", "btrfs", "overlay"}
SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")


def node_local_fs(path: Path, mounts: str = "/proc/self/mounts") -> str | None:
    """The filesystem type of `path` when it is likely node-local (tmpfs anywhere, a
    local disk under /tmp), else None (also where /proc cannot tell)."""
    real = os.path.realpath(path)
    try:
        with open(mounts) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    best, kind = "", ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(
                best):
            best, kind = point, fields[2]
    under_scratch = any(real == top or real.startswith(top + "/") for top in SCRATCH)
    if kind in NODE_LOCAL_TYPES or (kind in LOCAL_DISK_TYPES and under_scratch):
        return kind
    return None


def default_folder() -> Path:
    """$SLURMEXECUTOR_FOLDER, else ~/.slurmexecutor (home is shared on most clusters)."""
    return Path(os.environ.get("SLURMEXECUTOR_FOLDER") or "~/.slurmexecutor").expanduser()
