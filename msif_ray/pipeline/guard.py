"""The lock and the early checks of every run: ``guarded``, shared by ``msif run`` and ``Pipeline.run()``.

``locked.run_locked`` (the CLI's way in) and ``Pipeline.run()`` (Python's) both call ``guarded``;
this module sits below ``run`` so that ``Pipeline`` can, and never imports it: the pipeline's own
checks come in as the ``validate`` callable.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import ray

from msif_ray.config import Config
from msif_ray.distributed.runtime import alive_nodes, init_ray
from msif_ray.store.lock import RunDirLock
from msif_ray.store.storage import RunDir, check_run_dir_shared, check_storage

P = TypeVar("P")  # a Pipeline
I = TypeVar("I")  # noqa: E741 - its validated Inputs
R = TypeVar("R")


def guarded(config: Config, command: str, validate: Callable[[], tuple[P, I]], work: Callable[[P, I], R],
            log: Callable[[str], None] = print) -> R:
    """``work(pipeline, inputs)`` under the run directory's lock, after every early check; its result.

    Order: the run directory is reachable and writable; the lock is taken (a second run stops
    here; ``command`` names this one in ``lock.json``); Ray starts (or joins ``ray.address``) while,
    beside it, ``validate()`` imports the engine, validates the inputs and checks the plan against
    the memory budget (seconds each on a laptop; a bad input or plan stops the run before any pass,
    and a Ray started for it is stopped); a local run directory (or index) is refused on a
    multi-node cluster. A node that joins later (an autoscaler's) is caught by its workers: each
    checks on start that it sees the driver's run directory (``Passes.workers``).
    """
    check_storage(config.run_dir, "run_dir")
    with RunDirLock(RunDir(config.run_dir), command, log=log):
        ray_was_up = ray.is_initialized()
        with ThreadPoolExecutor(1, thread_name_prefix="validate") as beside:
            checked = beside.submit(validate)
            init_ray(config)  # in this thread: Ray's processes die with the thread that started them
        if checked.exception() is not None and not ray_was_up:
            ray.shutdown()
        pipeline, inputs = checked.result()
        nodes = alive_nodes()
        check_run_dir_shared(config.run_dir, "run_dir", nodes)
        if config.scoring.mode == "index":
            from msif_ray.pipeline.keys import index_store  # imported by validate() by now

            check_run_dir_shared(index_store(config, RunDir(config.run_dir)).url(), "index.path", nodes)
        return work(pipeline, inputs)
