"""A pool of long-lived Ray actors that map a method over shards, surviving worker crashes and hangs.

Each actor loads its model once and streams shards; every shard's result is written to storage
by the worker itself (atomically, keyed by the shard id), so the driver only sees small stats.
A worker that dies mid-shard (its process killed, its node lost) is restarted by Ray
(``max_restarts``) on any node with room, waited for, and the shard is handed out again: since the
output is keyed by shard id and overwritten whole, a redone shard is counted once. A job that runs
past its ``Deadline`` (a stuck read, a GPU hang) has its worker killed and restarted, and is
handed out again the same way.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, OutOfMemoryError, RayActorError

from msif_ray.errors import UserError

log = logging.getLogger(__name__)
MAX_ATTEMPTS_PER_ITEM = 4
RESTART_WAIT_SECONDS = 1800.0  # a lost node's actors wait this long for room (an autoscaler starting a node)


@dataclass(frozen=True)
class Deadline:
    """How long one job may run before its worker is taken for hung.

    ``fixed`` seconds when set (``ray.task_timeout_s``); else ``auto``: the largest of ``floor``,
    ``factor`` x the plan's estimate of one job (``estimate``, a FLOP bound: optimistic, hence the
    factor) and ``factor`` x the longest job of the pass finished so far, so a deadline follows
    the speed the pass shows rather than trusting the estimate alone.
    """

    fixed: float | None = None
    estimate: float = 0.0
    floor: float = 900.0
    factor: float = 10.0

    def seconds(self, finished: Sequence[float]) -> float:
        if self.fixed is not None:
            return self.fixed
        return max(self.floor, self.factor * self.estimate, self.factor * max(finished, default=0.0))


class WorkerStartError(UserError, RuntimeError):
    """A worker's start raised (its model would not load, its node cannot see the run directory): it
    would on every restart, so the run stops at once, with the error's last line."""


def raise_if_start_failed(err: RayActorError) -> None:
    """Raise ``WorkerStartError`` when ``err`` says the actor's ``__init__`` raised (Ray then keeps it dead)."""
    if getattr(err, "actor_init_failed", False):
        lines = str(err).strip().splitlines()
        raise WorkerStartError(f"a worker could not start: {lines[-1] if lines else err!r}") from err


def wait_until_alive(actor, timeout: float = RESTART_WAIT_SECONDS) -> None:
    """Block until a restarted actor answers ``ready()``: its __init__ has run again (on a new node, if
    its node was lost and one had to start)."""
    start = last_said = time.monotonic()
    while True:
        try:
            ray.get(actor.ready.remote(), timeout=30)
            return
        except (RayActorError, ActorUnavailableError, GetTimeoutError) as err:
            if isinstance(err, RayActorError):
                raise_if_start_failed(err)
            now = time.monotonic()
            if now - start > timeout:
                raise RuntimeError(f"a worker did not come back within {timeout:.0f} s of its crash: no node with room "
                                   "for it (ray.num_cpus_per_worker, num_gpus_per_worker) joined the cluster") from err
            if now - last_said > 60:
                log.warning("still waiting for a worker to restart (%.0f s): is there a node with room for it?",
                            now - start)
                last_said = now
            time.sleep(0.5)


class WorkerCrashError(RuntimeError):
    """A work item killed (or hung) its worker on every attempt; ``out_of_memory`` when Ray's memory
    monitor killed it (an actor's death cause is text only: Ray says "... killed due to the node
    running low on memory"). The message names the item and the last error."""

    def __init__(self, item: Any, attempts: int, cause: BaseException, where: str = ""):
        self.item, self.attempts = item, attempts
        self.out_of_memory = isinstance(cause, OutOfMemoryError) or "running low on memory" in str(cause)
        reason = "was killed for using too much memory" if self.out_of_memory else "died or hung"
        last = str(cause).strip().splitlines()
        super().__init__(f"{where}the worker {reason} on {attempts} attempts in a row at {getattr(item, 'job_id', item)}"
                         + (f"; the last error: {last[0][:300]}" if last else ""))


class WorkerPool:
    """``size`` actors of ``actor_cls`` (a ``@ray.remote`` class) built with the same arguments."""

    def __init__(self, actor_cls, size: int, num_cpus: float, num_gpus: float, *args: Any):
        options = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=0)
        self.actors = [actor_cls.options(**options).remote(*args) for _ in range(size)]

    def map(
        self, method: str, items: Sequence[Any], *args: Any, on_crash: Callable[[Any, int], None] | None = None,
        deadline: Deadline = Deadline(),
    ) -> Iterator[tuple[Any, Any]]:
        """Yield (item, result) as ``actor.method(item, *args)`` calls finish, in completion order.

        Work is handed out one item per idle actor (dynamic load balancing). An item whose actor
        crashed, or ran past ``deadline`` (then its actor is killed and restarted), is retried, up to
        MAX_ATTEMPTS_PER_ITEM times; any other exception propagates.
        """
        pending = deque(items)
        attempts: dict[int, int] = {}
        in_flight: dict[ray.ObjectRef, tuple[Any, Any]] = {}
        started: dict[ray.ObjectRef, float] = {}
        overdue: set[ray.ObjectRef] = set()
        durations: list[float] = []
        idle = list(self.actors)

        def submit() -> None:
            while idle and pending:
                actor, item = idle.pop(), pending.popleft()
                ref = getattr(actor, method).remote(item, *args)
                in_flight[ref], started[ref] = (actor, item), time.monotonic()

        submit()
        while in_flight:
            limit = deadline.seconds(durations)
            running = [started[r] for r in in_flight if r not in overdue]
            wait = max(0.0, min(running) + limit - time.monotonic()) + 0.1 if running else None
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=wait)
            if not ready:
                overdue |= self._kill_overdue(method, in_flight, started, overdue, limit)
                continue
            ready = ready[0]
            actor, item = in_flight.pop(ready)
            seconds = time.monotonic() - started.pop(ready)
            try:
                result = ray.get(ready)
            except (RayActorError, ActorDiedError, ActorUnavailableError) as err:
                raise_if_start_failed(err)
                attempts[id(item)] = attempts.get(id(item), 0) + 1
                if attempts[id(item)] >= MAX_ATTEMPTS_PER_ITEM:
                    raise WorkerCrashError(item, attempts[id(item)], err) from err
                if ready not in overdue:
                    log.warning("a worker died running %s of %s (%s); handing it out again", method,
                                getattr(item, "job_id", item), str(err).strip().splitlines()[0][:200])
                overdue.discard(ready)
                if on_crash is not None:
                    on_crash(item, attempts[id(item)])
                pending.appendleft(item)
                wait_until_alive(actor)  # Ray restarts it; a call made while it restarts would fail too
                idle.append(actor)
                submit()
                continue
            durations.append(seconds)
            idle.append(actor)
            submit()
            yield item, result

    @staticmethod
    def _kill_overdue(method: str, in_flight: dict, started: dict, overdue: set, limit: float) -> set:
        """Kill (for Ray to restart) the actors whose job has run longer than ``limit``; their refs."""
        now, killed = time.monotonic(), set()
        for ref, (actor, item) in in_flight.items():
            if ref not in overdue and now - started[ref] > limit:
                log.warning("%s of %s ran past its deadline of %.0f s (a hung worker?): restarting the worker and "
                            "handing it out again (ray.task_timeout_s sets the deadline)",
                            method, getattr(item, "job_id", item), limit)
                ray.kill(actor, no_restart=False)
                killed.add(ref)
        return killed

    def call_all(self, method: str, *args: Any) -> list[Any]:
        """``actor.method(*args)`` on every actor; None for an actor that died (its state is lost anyway)."""
        refs = [getattr(actor, method).remote(*args) for actor in self.actors]
        results = []
        for actor, ref in zip(self.actors, refs):
            try:
                results.append(ray.get(ref))
            except (RayActorError, ActorDiedError, ActorUnavailableError):
                wait_until_alive(actor)
                results.append(None)
        return results

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
