"""A run under its run directory's lock, after every early check (``msif run`` and ``msif nightly``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable

import ray

from msif_ray.config import Config
from msif_ray.distributed.runtime import alive_nodes, init_ray
from msif_ray.store.layout import read_manifest
from msif_ray.store.lock import RunDirLock
from msif_ray.store.storage import RunDir, check_run_dir_shared, check_storage

if TYPE_CHECKING:
    from msif_ray.pipeline.run import Inputs, Pipeline


def stages_now(run_dir: str) -> dict:
    """The manifest's stage records as they are now (to tell, at the end, which stages were reused)."""
    return read_manifest(RunDir(run_dir))["stages"]


def run_locked(config: Config, command: str, work: Callable[["Pipeline", "Inputs"], None]) -> None:
    """``work(pipeline, inputs)`` under the run directory's lock, after every early check.

    Order: the run directory is reachable and writable; the lock is taken (a second run stops
    here); Ray starts while, beside it, the engine is imported, the inputs are validated and the
    plan is checked against the memory budget (seconds each on a laptop; a bad input or plan stops
    the run before any pass, and a Ray started for it is stopped); a local run directory (or index)
    is refused on a multi-node cluster. A node that joins later (an autoscaler's) is caught by its
    workers: each checks on start that it sees the driver's run directory (``Passes.workers``).
    """
    check_storage(config.run_dir, "run_dir")
    with RunDirLock(RunDir(config.run_dir), command):
        ray_was_up = ray.is_initialized()
        with ThreadPoolExecutor(1, thread_name_prefix="validate") as beside:
            checked = beside.submit(validated, config)
            init_ray(config)  # in this thread: Ray's processes die with the thread that started them
        if checked.exception() is not None and not ray_was_up:
            ray.shutdown()
        pipeline, inputs = checked.result()
        nodes = alive_nodes()
        check_run_dir_shared(config.run_dir, "run_dir", nodes)
        if config.scoring.mode == "index":
            from msif_ray.pipeline.keys import index_store  # imported by validated() by now

            check_run_dir_shared(index_store(config, RunDir(config.run_dir)).url(), "index.path", nodes)
        work(pipeline, inputs)


def validated(config: Config) -> tuple["Pipeline", "Inputs"]:
    """A pipeline whose inputs are validated and whose plan fits (else a ``UserError`` naming the culprit)."""
    from msif_ray.pipeline.run import Pipeline  # torch and transformers: seconds, spent while Ray starts

    pipeline = Pipeline(config)
    inputs = pipeline.validate()
    pipeline.plan = pipeline.resource_plan(inputs)
    pipeline.plan.check()
    return pipeline, inputs
