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
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

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
                    raise RuntimeError(f"{item} failed on {attempts[id(item)]} workers in a row") from err
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

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
