"""Processes under /proc: pids, command lines, trees, and stopping them safely.

Never signals this process or its ancestors.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

STOP_GRACE_S = 5.0


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            env[key] = value
    return env


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after it.
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[1]) if len(fields) > 1 else None


def is_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X", "")


def all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def protected_pids() -> set[int]:
    """This process and its ancestors: never signalled."""
    pids = set()
    pid: int | None = os.getpid()
    while pid and pid not in pids:
        pids.add(pid)
        pid = parent_pid(pid)
    return pids


def descendants(roots: Iterable[int]) -> set[int]:
    """``roots`` plus every process below them in the process tree."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        ppid = parent_pid(pid)
        if ppid is not None:
            children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def send(pids: Iterable[int], sig: signal.Signals) -> None:
    protected = protected_pids()
    for pid in pids:
        if pid in protected:
            continue
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def wait_gone(pids: Iterable[int], timeout: float) -> set[int]:
    """Wait until none of ``pids`` is alive; return those still alive at the timeout."""
    remaining = set(pids)
    deadline = time.monotonic() + timeout
    while True:
        remaining = {pid for pid in remaining if is_alive(pid)}
        if not remaining or time.monotonic() >= deadline:
            return remaining
        time.sleep(0.05)


def terminate(pids: Iterable[int], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL whatever is left."""
    pids = set(pids) - protected_pids()
    if not pids:
        return
    send(pids, signal.SIGTERM)
    left = wait_gone(pids, grace)
    if left:
        send(left, signal.SIGKILL)
        wait_gone(left, 2.0)


def kill_trees(roots: Iterable[int]) -> set[int]:
    """Freeze ``roots``, then SIGKILL them and all their descendants at once."""
    roots = set(roots) - protected_pids()
    if not roots:
        return set()
    send(roots, signal.SIGSTOP)  # no new children while we collect the tree
    victims = descendants(roots) - protected_pids()
    send(victims, signal.SIGKILL)
    wait_gone(victims, 2.0)
    return victims
