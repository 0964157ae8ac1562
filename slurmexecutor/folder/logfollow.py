"""Following a call's printed output while it runs: its part of its task's log (the
worker marks where each call begins), read as the log grows. No file per call."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

MARKER = "--- slurmexecutor call "


def follow_call(log_path: Callable[[], Path | None], call_id: int, done: Callable[[], bool],
                poll: float = 0.5) -> Iterator[str]:
    """Yield the lines call `call_id` prints, as they are printed, until the next call's
    marker appears or, once `done()`, the log has been read to its end. `log_path` is asked
    again at each poll (a retried call moves to another task's log)."""
    mine = f"{MARKER}{call_id} ---"
    path, offset, inside, pending = None, 0, False, ""
    while True:
        finished = done()  # asked before reading: what it printed is in the log by then
        now_path = log_path()
        if now_path != path:  # claimed (or retried) by another task: start over there
            path, offset, inside, pending = now_path, 0, False, ""
        text = ""
        if path is not None:
            try:
                with open(path, "rb") as handle:
                    handle.seek(offset)
                    data = handle.read()
            except OSError:
                data = b""
            offset += len(data)
            text = data.decode(errors="replace")
        lines = (pending + text).split("\n")
        pending = lines.pop()  # an unfinished line waits for its end
        for line in lines:
            if line == mine:
                inside = True
            elif line.startswith(MARKER) and inside:
                return
            elif inside:
                yield line + "\n"
        if finished:
            if inside and pending and not pending.startswith(MARKER):
                yield pending
            return
        time.sleep(poll)


def follow_files(folder: Path, alive: Callable[[], bool], poll: float = 1.0) -> Iterator[str]:
    """Yield new lines of every log in `folder` (prefixed by its name) while `alive()`."""
    offsets: dict[Path, int] = {}
    pending: dict[Path, str] = {}
    while True:
        running = alive()
        for path in sorted(folder.glob("*.log")):
            try:
                with open(path, "rb") as handle:
                    handle.seek(offsets.get(path, 0))
                    data = handle.read()
            except OSError:
                continue
            offsets[path] = offsets.get(path, 0) + len(data)
            lines = (pending.get(path, "") + data.decode(errors="replace")).split("\n")
            pending[path] = lines.pop()
            yield from (f"[{path.stem}] {line}\n" for line in lines)
        if not running:
            return
        time.sleep(poll)
