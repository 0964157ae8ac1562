"""Is a worker process still the one we started? (A pid may be reused once it exits.)"""

from __future__ import annotations

import os
import socket


def process_start(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (/proc/PID/stat field 22), or None
    where /proc cannot tell (no such process, or not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) "
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def process_alive(host: str, pid: int, started: int | None = None) -> bool:
    """True when `pid` runs on this host (False for another host: we cannot tell) and,
    when `started` (its `process_start`) is given, is still that process, not a later one
    that got the same pid."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if started is not None:
        now = process_start(pid)
        return now is None or now == started
    return True
