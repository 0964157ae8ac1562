"""The claim protocol (claims.py): each chunk exactly once, at O(C + K) metadata cost."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from claim_racer import claim_all

from slurmexecutor.folder import claims


def test_order_is_the_own_block_then_the_rest_from_the_top():
    # task 1 of 3: its block (4-6), then from the ends of task 2's and task 0's in turn
    assert claims.claim_order(10, 3, 1) == [4, 5, 6, 9, 3, 8, 2, 7, 1, 0]
    assert claims.claim_order(10, 3, 0)[:4] == [0, 1, 2, 3]
    # one task alone (a throttled batch's first) starts calls in submission order
    assert claims.claim_order(3, 2, 0) == [0, 1, 2]
    assert claims.claim_order(2, 5, 4) == [0, 1]  # more tasks than chunks: steal only
    for task in range(3):
        assert sorted(claims.claim_order(10, 3, task)) == list(range(10))


def run_tasks(folder: Path, chunks: int, tasks: int, seconds: float = 0.0,
              slow: dict[int, float] | None = None) -> list[tuple[int, list[int], dict]]:
    """Run `tasks` claimers at once (a barrier starts them together), each in a process
    of its own (forkserver: the test process has threads, which fork would copy)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["claim_racer"])
    out: multiprocessing.Queue = context.Queue()
    start = context.Barrier(tasks)
    workers = [context.Process(target=claim_all, args=(
        str(folder), chunks, tasks, task, (slow or {}).get(task, seconds), start, out))
        for task in range(tasks)]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(10)
    return results


@pytest.mark.parametrize("chunks,tasks", [(1024, 16), (200, 50), (30, 8)])
def test_each_chunk_is_claimed_once_at_linear_cost(tmp_path, chunks, tasks):
    results = run_tasks(tmp_path, chunks, tasks, seconds=0.001)
    won = sorted(c for _, chunks_won, _ in results for c in chunks_won)
    assert won == list(range(chunks))  # exactly once each, none lost
    attempts = sum(stats["attempts"] for _, _, stats in results)
    listings = sum(stats["listings"] for _, _, stats in results)
    lost = attempts - chunks
    # one create per chunk, one listing per task, one create + listing per lost race
    # (races need two tasks at the same chunk between a listing and a create; a race lost
    # on a task's last candidate needs no listing after it); blind creates in claim
    # order would cost up to chunks x tasks
    assert tasks <= listings <= tasks + lost
    assert attempts <= 2 * chunks + tasks, (attempts, listings)


def test_a_slow_task_has_its_stride_stolen(tmp_path):
    chunks, tasks = 40, 4
    results = run_tasks(tmp_path, chunks, tasks, seconds=0.005, slow={0: 0.5})
    by_task = {task: won for task, won, _ in results}
    assert len(by_task[0]) <= 2  # the others took what its stride still held
    assert sorted(c for won in by_task.values() for c in won) == list(range(chunks))


def test_a_stale_listing_only_costs_a_lost_race(tmp_path):
    claimer = claims.Claimer(tmp_path, [0, 1, 2], "a")
    first = claimer.claims()
    assert next(first) == 0
    assert claims.try_claim(tmp_path / "1", "b")  # another task, after our listing
    assert next(first) == 2
    assert claimer.stats() == {"attempts": 3, "won": 2, "listings": 2}
    assert (tmp_path / "1").read_text() == "b"
