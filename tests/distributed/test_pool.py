"""The worker pool on local Ray: jobs handed out again when their worker dies or hangs past its deadline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray

from msif_ray.distributed.pool import MAX_ATTEMPTS_PER_ITEM, Deadline, WorkerCrashError, WorkerPool


@ray.remote
class Sleeper:
    """``square(n)`` hangs the first time it sees ``n`` in ``hang_once`` (a marker file says it did), and
    always for ``n`` in ``hang_always``."""

    def __init__(self, markers: str, hang_once: tuple[int, ...], hang_always: tuple[int, ...]):
        self.markers, self.hang_once, self.hang_always = Path(markers), hang_once, hang_always

    def ready(self) -> bool:
        return True

    def square(self, n: int) -> int:
        marker = self.markers / str(n)
        if n in self.hang_always or (n in self.hang_once and not marker.exists()):
            marker.touch()
            time.sleep(3600)
        return n * n


def test_deadline_auto_follows_the_estimate_and_the_pass():
    auto = Deadline(estimate=200.0)
    assert auto.seconds([]) == 2000.0  # 10 x the plan's estimate, above the floor
    assert auto.seconds([1.0, 300.0]) == 3000.0  # 10 x the longest job finished so far
    assert Deadline().seconds([5.0]) == 900.0  # the floor
    assert Deadline(fixed=7.0, estimate=1e6).seconds([1e6]) == 7.0  # ray.task_timeout_s wins


def test_a_hung_job_is_handed_out_again_and_counted_once(ray_session, tmp_path, caplog):
    pool = WorkerPool(Sleeper, 2, 0.5, 0, str(tmp_path), (3,), ())
    try:
        with caplog.at_level("WARNING", logger="msif_ray.distributed.pool"):
            results = dict(pool.map("square", list(range(6)), deadline=Deadline(fixed=3.0)))
    finally:
        pool.shutdown()
    assert results == {n: n * n for n in range(6)}
    assert (tmp_path / "3").exists()
    assert [r.getMessage() for r in caplog.records if "deadline" in r.getMessage()] == [
        "square of 3 ran past its deadline of 3 s (a hung worker?): restarting the worker and handing it out again "
        "(ray.task_timeout_s sets the deadline)"]


def test_a_job_that_always_hangs_stops_the_pass_naming_it(ray_session, tmp_path):
    pool = WorkerPool(Sleeper, 1, 0.5, 0, str(tmp_path), (), (2,))
    try:
        with pytest.raises(WorkerCrashError, match=f"hung on {MAX_ATTEMPTS_PER_ITEM} attempts in a row at 2; "
                                                   "the last error: .*") as caught:
            list(pool.map("square", [1, 2], deadline=Deadline(fixed=1.0)))
    finally:
        pool.shutdown()
    assert caught.value.item == 2 and not caught.value.out_of_memory


def test_a_worker_killed_by_rays_memory_monitor_is_told_apart():
    """An actor's death cause reaches the driver as text only; Ray's memory monitor says "killed due to
    the node running low on memory" (its raylet's message), which alone marks the crash out_of_memory."""
    from ray.exceptions import OutOfMemoryError

    text = "The actor died unexpectedly. 1 worker(s) were killed due to the node running low on memory."
    assert WorkerCrashError("shard-1", 4, RuntimeError(text)).out_of_memory
    assert WorkerCrashError("shard-1", 4, OutOfMemoryError("task evicted")).out_of_memory
    died = WorkerCrashError("shard-1", 4, RuntimeError("worker exited: SIGSEGV, out of luck with memory mapping"))
    assert not died.out_of_memory
    assert str(died) == ("the worker died or hung on 4 attempts in a row at shard-1; the last error: worker exited: "
                         "SIGSEGV, out of luck with memory mapping")
