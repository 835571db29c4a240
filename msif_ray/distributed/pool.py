"""A pool of long-lived Ray actors that map a method over shards, surviving worker crashes.

Each actor loads its model once and streams shards; every shard's result is written to storage
by the worker itself (atomically, keyed by the shard id), so the driver only sees small stats.
A worker that dies mid-shard is restarted by Ray (``max_restarts``), waited for, and the shard is
handed out again: since the output is keyed by shard id and overwritten whole, a redone shard is counted once.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable, Iterator, Sequence

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, OutOfMemoryError, RayActorError

log = logging.getLogger(__name__)
MAX_ATTEMPTS_PER_ITEM = 4


def wait_until_alive(actor, timeout: float = 300.0) -> None:
    """Block until a restarted actor answers ``ready()``: its __init__ has run again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.get(actor.ready.remote(), timeout=30)
            return
        except (RayActorError, ActorUnavailableError, GetTimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class WorkerCrashError(RuntimeError):
    """A work item killed its worker on every attempt; ``out_of_memory`` when Ray's memory monitor did it."""

    def __init__(self, item: Any, attempts: int, cause: BaseException):
        self.item, self.attempts = item, attempts
        text = str(cause)
        self.out_of_memory = isinstance(cause, OutOfMemoryError) or "memory" in text.lower() or "OOM" in text
        reason = "killed for using too much memory" if self.out_of_memory else "died"
        super().__init__(f"the worker {reason} on {attempts} attempts in a row at {getattr(item, 'job_id', item)}")


class WorkerPool:
    """``size`` actors of ``actor_cls`` (a ``@ray.remote`` class) built with the same arguments."""

    def __init__(self, actor_cls, size: int, num_cpus: float, num_gpus: float, *args: Any):
        options = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=0)
        self.actors = [actor_cls.options(**options).remote(*args) for _ in range(size)]

    def map(
        self, method: str, items: Sequence[Any], *args: Any, on_crash: Callable[[Any, int], None] | None = None
    ) -> Iterator[tuple[Any, Any]]:
        """Yield (item, result) as ``actor.method(item, *args)`` calls finish, in completion order.

        Work is handed out one item per idle actor (dynamic load balancing). An item whose actor
        crashed is retried, up to MAX_ATTEMPTS_PER_ITEM times; any other exception propagates.
        """
        pending = deque(items)
        attempts: dict[int, int] = {}
        in_flight: dict[ray.ObjectRef, tuple[Any, Any]] = {}
        idle = list(self.actors)

        def submit() -> None:
            while idle and pending:
                actor, item = idle.pop(), pending.popleft()
                in_flight[getattr(actor, method).remote(item, *args)] = (actor, item)

        submit()
        while in_flight:
            [ready], _ = ray.wait(list(in_flight), num_returns=1)
            actor, item = in_flight.pop(ready)
            try:
                result = ray.get(ready)
            except (RayActorError, ActorDiedError, ActorUnavailableError) as err:
                attempts[id(item)] = attempts.get(id(item), 0) + 1
                if attempts[id(item)] >= MAX_ATTEMPTS_PER_ITEM:
                    raise WorkerCrashError(item, attempts[id(item)], err) from err
                log.warning("worker died while running %s; handing it out again", item)
                if on_crash is not None:
                    on_crash(item, attempts[id(item)])
                pending.appendleft(item)
                wait_until_alive(actor)  # Ray restarts it; a call made while it restarts would fail too
                idle.append(actor)
                submit()
                continue
            idle.append(actor)
            submit()
            yield item, result

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
