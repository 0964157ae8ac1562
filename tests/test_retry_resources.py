"""`retry_resources` (issue 20): with `max_retries`, a rule per resource grows what a
retry after OUT_OF_MEMORY asks for. Tested with plain values: the core's retry after an
OOM verdict, and the owner's settings for that retry (the test cluster has no memory
cgroup, so no real OUT_OF_MEMORY verdict can be produced here)."""

from __future__ import annotations

import pytest

from slurmexecutor import SlurmExecutor
from slurmexecutor.core.events import Record, Retry, SchedulerAnswer, StreamsRead
from slurmexecutor.folder import warm
from slurmexecutor.owner.batches import Settings, grown
from slurmexecutor.schedulers import TaskState
from tests.test_state import core, failed, of, started_batch

MEM = ["1G", "4G", "16G"]


def settings(**rules) -> Settings:
    return Settings(resources={"mem": "1G", "time": "1:00:00"}, python="python3", setup=[],
                    sbatch_extra=[], chunksize=None, submit_window=0.05, max_window=1.0,
                    max_batch=100, slots=4, retry_resources=rules)


def test_an_oom_retry_gets_the_grown_resources_and_others_do_not():
    base = settings(mem=lambda mem, attempt: MEM[MEM.index(mem) + 1])
    second = grown(base, "OUT_OF_MEMORY", 2)
    assert second.resources == {"mem": "4G", "time": "1:00:00"}
    assert grown(second, "OUT_OF_MEMORY", 3).resources["mem"] == "16G"  # compounds
    assert grown(base, "NODE_FAIL", 2) is base  # only after OUT_OF_MEMORY
    assert base.resources["mem"] == "1G"  # the executor's own are untouched
    # a warm task of the old resources never joins the retry (another resources key)
    assert second.resources_key() != base.resources_key()
    assert warm.resources_key(second.resources, "python3", [], []) == second.resources_key()


def test_the_rule_gets_the_attempt_and_none_removes_an_option():
    seen = []
    base = settings(mem=lambda mem, attempt: seen.append((mem, attempt)),
                    time=lambda time, attempt: f"{attempt}:00:00")
    second = grown(base, "OUT_OF_MEMORY", 2)
    assert seen == [("1G", 2)] and second.resources == {"time": "2:00:00"}


def test_a_failing_or_bad_rule_is_named():
    with pytest.raises(ValueError, match=r"retry_resources\['mem'\] raised"):
        grown(settings(mem=lambda mem, attempt: 1 / 0), "OUT_OF_MEMORY", 2)
    with pytest.raises(ValueError, match="retry_resources gave a bad value"):
        grown(settings(time=lambda time, attempt: "soon"), "OUT_OF_MEMORY", 2)


def test_the_core_retries_an_oom_with_the_next_attempt_number():
    machine = core(retry_on=frozenset({"OUT_OF_MEMORY"}), max_retries=2)
    started_batch(machine, chunks=((0, 1),), planned=1)
    machine.step([Record(0, 0, "claim", 0, None), Record(0, 0, "ok", 0, b"")], 0)
    oom = SchedulerAnswer({("7", 0): TaskState("OUT_OF_MEMORY")})
    machine.step([oom], 1)
    out = machine.step([oom, StreamsRead(2)], 3)
    [retry] = of(out, Retry)
    assert (retry.state, retry.attempt, dict(retry.calls)) == ("OUT_OF_MEMORY", 2, {0: (1,)})
    assert not failed(out)


def test_the_executor_checks_its_retry_resources(tmp_path):
    with pytest.raises(ValueError, match="max_retries >= 1"):
        SlurmExecutor(tmp_path, backend="local", retry_resources={"mem": str})
    with pytest.raises(ValueError, match="memory"):
        SlurmExecutor(tmp_path, backend="local", max_retries=1, retry_resources={"memory": str})
    with SlurmExecutor(tmp_path, backend="local", max_retries=1,
                       retry_resources={"mem": lambda mem, attempt: "2G"}) as ex:
        assert "OUT_OF_MEMORY" in ex._engine.core.config.retry_on
