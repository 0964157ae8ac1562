#!/usr/bin/env python3
"""lagfs: a FUSE view of a folder that shows what others write there only after a lag.

It plays the login node of a cluster whose shared filesystem is cached like an NFS client
with attribute caching: the compute nodes write the shared folder REAL directly, the client
reads it through MNT and sees their changes late. ``scripts/slurm_cluster.py up ... --shared
REAL --mount MNT --lag L`` starts it for a test cluster; by hand::

    python3 scripts/lagfs.py REAL MNT [--lag L] [--pid-file FILE] [--debug]

mounts the view of REAL at MNT in the foreground until SIGTERM, Ctrl-C or
``fusermount3 -u MNT`` (MNT must be an existing folder). What MNT shows:

* A change that others make in REAL (a new or removed entry, appended bytes, a new mode or
  owner), seen at time t, shows through MNT from t+L on; until then listings, stat and reads
  show the state before it. Reads of a file stop at the size MNT shows for it.
* A change made through MNT (by the client itself) is written through to REAL at once and
  shows through MNT at once, together with the current state of the paths it touched (the
  post-operation attributes an NFS server returns).
* Close-to-open, as NFS keeps it (the default; ``--strict`` turns it off): opening a file
  that its writer has closed since (its last change at REAL was a close after writing,
  seen by inotify) shows its data and attributes as of that close at once, as an NFS
  client's open revalidates them with the server. Listings, lookups of new names and
  the files still open for writing keep lagging.
* Everything else passes through: modes, owners, inode numbers, O_EXCL (decided at REAL,
  so a create fails with EEXIST when another writer made the name even if MNT does not
  show it yet), O_APPEND (appends at REAL's end), rename/replace, link, unlink, mkdir,
  chmod, chown, utime, symlinks.

Deterministic: others' changes are seen with inotify on REAL (every folder is watched,
which also catches writers in other mount namespaces that bind-mount REAL: same inodes).
Each path keeps a short history of (time seen, time shown, stat); MNT shows the state seen
last among those whose time to show has come. The kernel's own caches are off (attr,
entry and negative timeouts 0, direct_io), so the lag is this program's alone.

Limits: the bytes of a file that others replaced or truncated within the lag come from the
new file (only its size and attributes lag); a file that others deleted within the lag still
shows, but opening it fails with ENOENT (NFS would say ESTALE); mmap of files is not
supported (direct_io); RENAME_NOREPLACE/EXCHANGE flags are not honoured by the binding;
single-threaded, so one slow client request delays the others.

Needs /dev/fuse, libfuse 3 (Debian ``fuse3``) or 2, and the ``mfusepy`` binding from PyPI
(in the project's ``test`` extra; ``scripts/bootstrap.sh test`` installs all of it).
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import errno
import logging
import os
import shutil
import signal
import stat
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

try:
    import mfusepy  # type: ignore[import-untyped,unused-ignore]
except (ImportError, OSError) as exc:  # OSError: libfuse itself is missing
    mfusepy = None
    IMPORT_ERROR: Exception | None = exc
else:
    IMPORT_ERROR = None

log = logging.getLogger("lagfs")

# inotify(7)
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000
IN_CLOEXEC = 0o2000000
WATCH_MASK = (
    IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
    | IN_DELETE | IN_ONLYDIR | IN_DONT_FOLLOW
)
ENTRY_EVENTS = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name

NEVER = float("-inf")  # "seen" and "shown" of what REAL held when the view was mounted


def parent_of(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def join(folder: str, name: str) -> str:
    return f"/{name}" if folder == "/" else f"{folder}/{name}"


def state_key(st: os.stat_result | None) -> tuple[int, ...] | None:
    """What a change is: entry, type and mode, inode, size, owner, links, mtime."""
    if st is None:
        return None
    return (st.st_mode, st.st_ino, st.st_size, st.st_uid, st.st_gid, st.st_nlink, st.st_mtime_ns)


class Snapshot:
    __slots__ = ("seen", "shown", "st")

    def __init__(self, seen: float, shown: float, st: os.stat_result | None) -> None:
        self.seen = seen  # when the state was read from REAL
        self.shown = shown  # from when MNT shows it
        self.st = st  # None: no such entry


class View:
    """Per-path histories of REAL and what MNT shows of them at a given time.

    Paths are the filesystem's own ("/" is REAL). Every method is called with ``lock`` held.
    """

    def __init__(self, real: str, lag: float, close_to_open: bool = True) -> None:
        self.real = real
        self.lag = lag
        self.close_to_open = close_to_open
        #: files whose last change at REAL was a close after writing (close-to-open)
        self.closed: set[str] = set()
        self.lock = threading.RLock()
        self.history: dict[str, list[Snapshot]] = {}
        self.children: dict[str, set[str]] = {}  # folder -> names with a history

    def real_path(self, path: str) -> str:
        return self.real if path == "/" else self.real + path

    def lstat(self, path: str) -> os.stat_result | None:
        try:
            return os.lstat(self.real_path(path))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def record(self, path: str, st: os.stat_result | None, seen: float, shown: float) -> None:
        """Note that ``path`` was in state ``st`` at ``seen``, to be shown from ``shown``."""
        snaps = self.history.get(path)
        if snaps is None:
            if st is None:
                return  # nothing known, nothing there: no history needed
            snaps = self.history[path] = []
            if path != "/":
                self.children.setdefault(parent_of(path), set()).add(path.rsplit("/", 1)[1])
        if snaps and state_key(snaps[-1].st) == state_key(st):
            # The same state again; if the client itself touched it, show it now.
            snaps[-1].shown = min(snaps[-1].shown, shown)
            return
        snaps.append(Snapshot(seen, shown, st))
        self.prune(snaps, time.monotonic())

    def prune(self, snaps: list[Snapshot], now: float) -> None:
        """Drop states that a later one, already shown, hides for good."""
        # Every state seen at least a lag ago is shown (an own change shows even sooner).
        old = bisect.bisect_right(snaps, now - self.lag, key=lambda snap: snap.seen)
        if old > 1:
            del snaps[: old - 1]

    def observe(self, path: str, now: float) -> None:
        """A change by others: read the state now, show it after the lag."""
        self.record(path, self.lstat(path), now, now + self.lag)

    def touch(self, path: str | None) -> None:
        """A change by the client: read the state now and show it at once."""
        if path is not None:
            now = time.monotonic()
            self.record(path, self.lstat(path), now, now)

    def shown(self, path: str) -> os.stat_result | None:
        """The state of ``path`` that MNT shows now (None: no such entry)."""
        now = time.monotonic()
        snaps = self.history.get(path)
        if snaps is None:
            # Never seen (an event not read yet): treat it as created now.
            st = self.lstat(path)
            if st is None:
                return None
            self.record(path, st, now, now + self.lag)
            snaps = self.history[path]
        self.prune(snaps, now)
        best = len(snaps) - 1  # the last state seen whose time to show has come
        while best >= 0 and snaps[best].shown > now:
            best -= 1
        if best < 0:
            return None  # only changes still to come: before them, there was no entry
        del snaps[:best]  # older states can never be shown again
        current = snaps[0].st
        if current is None and len(snaps) == 1:
            self.forget(path)
        return current

    def forget(self, path: str) -> None:
        self.history.pop(path, None)
        if path != "/":
            names = self.children.get(parent_of(path))
            if names is not None:
                names.discard(path.rsplit("/", 1)[1])
                if not names:
                    del self.children[parent_of(path)]

    def known_below(self, folder: str) -> list[str]:
        prefix = folder.rstrip("/") + "/"
        return [path for path in self.history if path.startswith(prefix)]

    def names(self, folder: str) -> list[str]:
        """Names that MNT shows now in ``folder``."""
        candidates = set(self.children.get(folder, ()))
        try:
            candidates.update(os.listdir(self.real_path(folder)))
        except OSError:
            pass
        return sorted(name for name in candidates if self.shown(join(folder, name)) is not None)


class Watcher(threading.Thread):
    """Reads inotify events of every folder of REAL and records what others changed."""

    def __init__(self, view: View) -> None:
        super().__init__(name="lagfs-inotify", daemon=True)
        self.view = view
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.watches: dict[int, str] = {}  # watch descriptor -> folder

    def add_tree(self, top: str, seen: float, shown: float) -> None:
        """Watch ``top`` and every folder below it; record all their entries."""
        view = self.view
        todo = [top]
        while todo:
            folder = todo.pop()
            real = view.real_path(folder).encode()
            wd = self.libc.inotify_add_watch(self.fd, real, WATCH_MASK)
            if wd < 0:
                err = ctypes.get_errno()
                if err not in (errno.ENOENT, errno.ENOTDIR):
                    log.warning("cannot watch %s: %s", folder, os.strerror(err))
                continue
            self.watches[wd] = folder  # watching first, so nothing created now is missed
            view.record(folder, view.lstat(folder), seen, shown)
            try:
                entries = list(os.scandir(view.real_path(folder)))
            except OSError:
                continue
            for entry in entries:
                path = join(folder, entry.name)
                st = view.lstat(path)
                view.record(path, st, seen, shown)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    todo.append(path)

    def drop_tree(self, top: str) -> None:
        """Stop watching ``top`` and the folders below it (they moved away)."""
        prefix = top + "/"
        for wd, folder in list(self.watches.items()):
            if folder == top or folder.startswith(prefix):
                self.libc.inotify_rm_watch(self.fd, wd)
                del self.watches[wd]

    def run(self) -> None:
        # Signals go to the FUSE loop in the main thread, which then unmounts.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except InterruptedError:
                continue
            except OSError as exc:
                log.error("inotify read failed: %s", exc)
                return
            with self.view.lock:
                now = time.monotonic()
                offset = 0
                while offset + EVENT_HEADER.size <= len(data):
                    wd, mask, _cookie, length = EVENT_HEADER.unpack_from(data, offset)
                    offset += EVENT_HEADER.size
                    name = data[offset : offset + length].split(b"\0", 1)[0]
                    offset += length
                    try:
                        self.handle(wd, mask, os.fsdecode(name), now)
                    except Exception:  # keep watching whatever one event did
                        log.exception("while handling an inotify event")

    def handle(self, wd: int, mask: int, name: str, now: float) -> None:
        view = self.view
        if mask & IN_Q_OVERFLOW:
            log.warning("inotify queue overflow: rescanning %s", view.real)
            for path in list(view.history):
                view.observe(path, now)
            self.add_tree("/", now, now + view.lag)
            return
        if mask & IN_IGNORED:
            self.watches.pop(wd, None)
            return
        folder = self.watches.get(wd)
        if folder is None:
            return
        path = join(folder, name) if name else folder
        if mask & IN_CLOSE_WRITE:
            view.closed.add(path)
        elif mask & (IN_MODIFY | IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM):
            view.closed.discard(path)
        if mask & (IN_MOVED_FROM | IN_DELETE) and mask & IN_ISDIR:
            if mask & IN_MOVED_FROM:
                self.drop_tree(path)
            for below in view.known_below(path):
                view.observe(below, now)
        view.observe(path, now)
        if name and mask & ENTRY_EVENTS:
            view.observe(folder, now)  # its mtime and link count changed
        if mask & (IN_CREATE | IN_MOVED_TO) and mask & IN_ISDIR:
            self.add_tree(path, now, now + view.lag)


def attrs(st: os.stat_result) -> dict[str, Any]:
    return {
        "st_mode": st.st_mode,
        "st_ino": st.st_ino,
        "st_nlink": st.st_nlink,
        "st_uid": st.st_uid,
        "st_gid": st.st_gid,
        "st_size": st.st_size,
        "st_blocks": st.st_blocks,
        "st_blksize": st.st_blksize,
        "st_rdev": st.st_rdev,
        "st_atime": st.st_atime_ns,
        "st_mtime": st.st_mtime_ns,
        "st_ctime": st.st_ctime_ns,
    }


def fuse_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


BaseOperations: Any = mfusepy.Operations if mfusepy is not None else object


class LagFS(BaseOperations):
    """The FUSE operations: REAL written through, others' changes shown after the lag."""

    use_ns = True  # times in nanoseconds

    def __init__(self, view: View) -> None:
        self.view = view
        self.mutex = view.lock
        self.paths: dict[int, str] = {}  # open file handle (our fd on REAL) -> path
        self.serving = False  # set once mounted: a later error of the loop is a stop

    def init(self, path: str) -> None:
        self.serving = True

    # ----------------------------------------------------------------------- helpers

    def _shown(self, path: str) -> os.stat_result:
        st = self.view.shown(path)
        if st is None:
            raise fuse_error(errno.ENOENT)
        return st

    def _real(self, path: str) -> str:
        return self.view.real_path(path)

    def _own(self, path: str) -> None:
        """Give a new entry the caller's uid/gid (we run as root for everyone)."""
        uid, gid, _pid = mfusepy.fuse_get_context()
        if (uid, gid) != (os.geteuid(), os.getegid()):
            os.lchown(self._real(path), uid, gid)

    def _touch(self, *paths: str | None) -> None:
        for path in paths:
            self.view.touch(path)

    # ------------------------------------------------------------------- attributes

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        with self.mutex:
            if path is None:  # an open file that was unlinked
                if fh is None:
                    raise fuse_error(errno.ENOENT)
                return attrs(os.fstat(fh))
            return attrs(self._shown(path))

    def access(self, path: str, amode: int) -> int:
        with self.mutex:
            self._shown(path)
            if not os.access(self._real(path), amode, follow_symlinks=False):
                raise fuse_error(errno.EACCES)
            return 0

    def readlink(self, path: str) -> str:
        with self.mutex:
            self._shown(path)
            return os.readlink(self._real(path))

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self.view.real)
        return {key: getattr(sv, key) for key in (
            "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
            "f_favail", "f_flag", "f_namemax")}

    def chmod(self, path: str | None, mode: int) -> int:
        with self.mutex:
            if path is None:
                raise fuse_error(errno.ENOENT)
            os.chmod(self._real(path), stat.S_IMODE(mode))  # the kernel resolved symlinks
            self._touch(path)
            return 0

    def chown(self, path: str | None, uid: int, gid: int) -> int:
        with self.mutex:
            if path is None:
                raise fuse_error(errno.ENOENT)
            os.lchown(self._real(path), uid, gid)
            self._touch(path)
            return 0

    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        with self.mutex:
            if path is None:
                raise fuse_error(errno.ENOENT)
            if times is None:
                os.utime(self._real(path), follow_symlinks=False)
            else:
                os.utime(self._real(path), ns=(int(times[0]), int(times[1])),
                         follow_symlinks=False)
            self._touch(path)
            return 0

    # ---------------------------------------------------------------------- folders

    def opendir(self, path: str) -> int:
        with self.mutex:
            if not stat.S_ISDIR(self._shown(path).st_mode):
                raise fuse_error(errno.ENOTDIR)
            return 0

    def readdir(self, path: str, fh: int) -> list[Any]:
        with self.mutex:
            entries: list[Any] = [".", ".."]
            for name in self.view.names(path):
                st = self.view.shown(join(path, name))
                if st is not None:
                    entries.append((name, {"st_mode": st.st_mode, "st_ino": st.st_ino}, 0))
            return entries

    def releasedir(self, path: str | None, fh: int) -> int:
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        with self.mutex:
            os.mkdir(self._real(path), mode)
            self._own(path)
            self._touch(path, parent_of(path))
            return 0

    def rmdir(self, path: str) -> int:
        with self.mutex:
            os.rmdir(self._real(path))
            self._touch(path, parent_of(path))
            return 0

    # ------------------------------------------------------------------------ names

    def unlink(self, path: str) -> int:
        with self.mutex:
            os.unlink(self._real(path))
            self._touch(path, parent_of(path))
            return 0

    def rename(self, old: str, new: str) -> int:
        with self.mutex:
            os.rename(self._real(old), self._real(new))
            view = self.view
            for below in view.known_below(old) + view.known_below(new):
                view.touch(below)
            self._touch(old, new, parent_of(old), parent_of(new))
            st = view.lstat(new)
            if st is not None and stat.S_ISDIR(st.st_mode):
                for folder, dirs, files in os.walk(self._real(new)):
                    base = new + folder[len(self._real(new)):]
                    for name in dirs + files:
                        view.touch(join(base, name))
            return 0

    def link(self, target: str, source: str) -> int:
        """Hard link: the new name ``target`` for the existing ``source``."""
        with self.mutex:
            os.link(self._real(source), self._real(target), follow_symlinks=False)
            self._touch(target, source, parent_of(target))
            return 0

    def symlink(self, target: str, source: str) -> int:
        """Symbolic link: the new name ``target`` pointing at ``source``."""
        with self.mutex:
            os.symlink(source, self._real(target))
            self._own(target)
            self._touch(target, parent_of(target))
            return 0

    # ------------------------------------------------------------------------ files

    def create(self, path: str, mode: int, flags: int = os.O_WRONLY) -> int:
        with self.mutex:
            fd = os.open(self._real(path), flags | os.O_CREAT | os.O_CLOEXEC, stat.S_IMODE(mode))
            try:
                self._own(path)
            except OSError:
                os.close(fd)
                raise
            self.paths[fd] = path
            self._touch(path, parent_of(path))
            return fd

    def open(self, path: str, flags: int) -> int:
        with self.mutex:
            self._shown(path)  # a name not shown yet is not found: lookups lag
            with self.view.lock:
                if self.view.close_to_open and path in self.view.closed:
                    self.view.touch(path)  # its writer closed it: fresh on open
            fd = os.open(self._real(path), (flags & ~(os.O_CREAT | os.O_EXCL)) | os.O_CLOEXEC)
            self.paths[fd] = path
            if flags & os.O_TRUNC:
                self._touch(path)
            return fd

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        with self.mutex:
            st = self.view.shown(path) if path is not None else None
            limit = st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None
            if limit is not None:
                size = max(0, min(size, limit - offset))
            return os.pread(fh, size, offset) if size else b""

    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        with self.mutex:
            written = os.pwrite(fh, data, offset)  # an O_APPEND fd appends whatever offset
            self._touch(path)
            return written

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        with self.mutex:
            if fh is not None:
                os.ftruncate(fh, length)
            elif path is not None:
                os.truncate(self._real(path), length)
            else:
                raise fuse_error(errno.ENOENT)
            self._touch(path)
            return 0

    def flush(self, path: str | None, fh: int) -> int:
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    def release(self, path: str | None, fh: int) -> int:
        with self.mutex:
            self.paths.pop(fh, None)
            os.close(fh)
            return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Mount a view of REAL at MNT that shows others' changes only after a lag.")
    parser.add_argument("real", type=Path, metavar="REAL", help="the shared folder itself")
    parser.add_argument("mount", type=Path, metavar="MNT", help="where to mount the view")
    parser.add_argument("--lag", type=float, default=2.0,
                        help="seconds before others' changes show (default 2)")
    parser.add_argument("--strict", action="store_true",
                        help="no close-to-open: reads of a file lag too after its writer "
                             "closed it (stricter than NFS)")
    parser.add_argument("--pid-file", type=Path, help="write this process's pid here")
    parser.add_argument("--debug", action="store_true", help="log every FUSE request")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="lagfs: %(levelname)s %(message)s")
    if mfusepy is None:
        print(f"lagfs: the FUSE binding is missing ({IMPORT_ERROR}); "
              "pip install mfusepy and apt-get install fuse3", file=sys.stderr)
        return 2
    real = os.path.realpath(args.real)
    mount = os.path.realpath(args.mount)
    if args.lag < 0:
        print("lagfs: --lag must be >= 0", file=sys.stderr)
        return 2
    for name, folder in (("REAL", real), ("MNT", mount)):
        if not os.path.isdir(folder):
            print(f"lagfs: {name} is not a folder: {folder}", file=sys.stderr)
            return 2
    if os.path.commonpath([real, mount]) in (real, mount):
        print("lagfs: REAL and MNT must not contain each other", file=sys.stderr)
        return 2

    os.umask(0)  # the kernel has applied the caller's umask to the modes it sends
    view = View(real, args.lag, close_to_open=not args.strict)
    watcher = Watcher(view)
    with view.lock:
        watcher.add_tree("/", NEVER, NEVER)
    watcher.start()
    if args.pid_file:
        args.pid_file.write_text(f"{os.getpid()}\n")
    options: dict[str, Any] = {
        "fsname": "lagfs",
        "subtype": "lagfs",
        "default_permissions": True,
        "use_ino": True,
        "hard_remove": True,  # no .fuse_hidden files in REAL
        "direct_io": True,  # no page cache: every read comes here
        "attr_timeout": 0,
        "entry_timeout": 0,
        "negative_timeout": 0,
    }
    if shutil.which("fusermount3") or shutil.which("fusermount"):
        options["auto_unmount"] = True  # unmounted even if this process is killed
    log.info("mounting %s at %s with a lag of %s s", real, mount, args.lag)
    operations = LagFS(view)
    try:
        mfusepy.FUSE(operations, mount, foreground=True, nothreads=True, **options)
    except RuntimeError as exc:
        # libfuse ends its loop with an error code when a signal (SIGTERM) stops it.
        if not operations.serving:
            print(f"lagfs: could not mount {mount} (libfuse error {exc})", file=sys.stderr)
            return 1
    finally:
        if args.pid_file:
            try:
                if args.pid_file.read_text().split() == [str(os.getpid())]:
                    args.pid_file.unlink()
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
