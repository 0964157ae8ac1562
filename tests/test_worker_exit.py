"""The worker alone (no executor, no scheduler): a run folder built by hand, one array
task run as `python -m slurmexecutor.worker.supervisor`, its result stream read back.

A call that ends its process (`os._exit`, with any exit code, 0 included) fails that one
call with a `crash` record; the other calls of its chunk, and later chunks, still run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest

from slurmexecutor.folder import formats, spool

REPO = Path(__file__).resolve().parent.parent
HERE = str(Path(__file__).resolve().parent)


def exit_at(x, bad, code=0):
    """Return x, or end the process with `code` when x == bad."""
    if x == bad:
        os._exit(code)
    return x * 10


class ExitsWhenUnpickled:
    """An argument whose unpickling ends the process (before its call runs)."""

    def __reduce__(self):
        return (os._exit, (0,))


def make_run(tmp_path: Path, chunks: list[list[tuple[int, list[tuple]]]]) -> tuple[Path, bytes]:
    """A run folder with one batch (0) of one task: `chunks` is, per chunk, its parts as
    (first call id, [args of each call]); every call is `exit_at(*args)`."""
    folder = tmp_path / "runs"
    key = spool.load_key(folder, create=True)
    run_dir = spool.ensure_private_dir(folder / "run")
    spool.make_batch_dir(run_dir, 0)
    functions = spool.functions_path(run_dir, 0)
    spool.write_blob(functions, key, {"functions": [cloudpickle.dumps(exit_at)],
                                      "names": [f"{__name__}.exit_at"], "sys_path": [HERE]})
    spool.write_blob(spool.manifest_path(run_dir, 0), key, {
        "functions": str(functions.relative_to(run_dir)), "chunks": len(chunks), "tasks": 1, "steal": True})
    for index, parts in enumerate(chunks):
        calls, blobs = [], []
        for first, arguments in parts:
            calls += range(first, first + len(arguments))
            blobs.append((0, cloudpickle.dumps(formats.stored_calls(list(arguments))),
                          len(arguments)))
        spool.write_blob(spool.chunk_path(run_dir, 0, index), key,
                         {"calls": calls, "parts": blobs})
    return run_dir, key


def run_worker(run_dir: Path, key: bytes) -> list[tuple]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SLURMEXECUTOR_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "slurmexecutor.worker.supervisor", str(run_dir), "0", "0"],
                          env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stderr
    cursor = spool.StreamCursor(spool.stream_path(run_dir, 0, 0, 0))
    records = spool.read_records(cursor, key)
    assert cursor.error is None and cursor.pending_bytes == 0
    return records


def outcomes(records: list[tuple]) -> dict[int, tuple]:
    """call id -> (kind, body) of its result record; a call must have exactly one."""
    found: dict[int, tuple] = {}
    for kind, call_id, body in records:
        if kind in ("ok", "raised", "crash", "skip", "unpicklable"):
            assert call_id not in found, f"call {call_id} has two results"
            found[call_id] = (kind, body)
    return found


def test_normal_calls_all_succeed(tmp_path):
    run_dir, key = make_run(tmp_path, [[(0, [(0, None), (1, None), (2, None)])],
                                       [(3, [(3, None)])]])
    records = run_worker(run_dir, key)
    assert records[0][0] == "start" and records[-1][0] == "end"
    assert not records[-1][2]["stopped"]
    assert [r[1] for r in records if r[0] == "claim"] == [0, 1]
    results = outcomes(records)
    assert {call_id: kind for call_id, (kind, _) in results.items()} == dict.fromkeys(
        range(4), "ok")
    assert {call_id: cloudpickle.loads(body) for call_id, (_, body) in results.items()} == {
        0: 0, 1: 10, 2: 20, 3: 30}


@pytest.mark.parametrize("code", [0, 3])
def test_exit_in_a_call_fails_that_call_only(tmp_path, code):
    # chunk 0: calls 0..3, call 1 ends the process; chunk 1 (call 4) comes after
    run_dir, key = make_run(tmp_path, [
        [(0, [(0, 1, code), (1, 1, code), (2, 1, code), (3, 1, code)])],
        [(4, [(4, 1, code)])]])
    records = run_worker(run_dir, key)
    assert records[0][0] == "start" and records[-1][0] == "end"
    assert [r[1] for r in records if r[0] == "claim"] == [0, 1]  # chunk 0 claimed once
    results = outcomes(records)
    assert set(results) == {0, 1, 2, 3, 4}
    kind, body = results[1]
    assert kind == "crash"
    assert body["exit_code"] == code and body["signal"] is None
    assert f"code {code}" in body["text"]
    for call_id in (0, 2, 3, 4):
        kind, body = results[call_id]
        assert kind == "ok", (call_id, kind, body)
        assert cloudpickle.loads(body) == call_id * 10


def test_exit_while_unpickling_arguments_fails_their_call(tmp_path):
    # the part holding call 2 cannot be unpickled without ending the process: that is
    # call 2's crash, not call 1's (finished) nor the end of the chunk
    run_dir, key = make_run(tmp_path, [[(0, [(0, None), (1, None)]),
                                        (2, [(ExitsWhenUnpickled(), None)]),
                                        (3, [(3, None)])]])
    results = outcomes(run_worker(run_dir, key))
    assert {call_id: kind for call_id, (kind, _) in results.items()} == {
        0: "ok", 1: "ok", 2: "crash", 3: "ok"}
    assert results[2][1]["exit_code"] == 0
    assert cloudpickle.loads(results[3][1]) == 30
