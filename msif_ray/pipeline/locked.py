"""A run under its run directory's lock, after every early check (``msif run`` and ``msif nightly``)."""

from __future__ import annotations

from typing import Callable

from msif_ray.config import Config
from msif_ray.distributed.runtime import alive_nodes, init_ray
from msif_ray.pipeline.run import Inputs, Pipeline
from msif_ray.store.layout import read_manifest
from msif_ray.store.lock import RunDirLock
from msif_ray.store.storage import RunDir, check_run_dir_shared, check_storage


def stages_now(run_dir: str) -> dict:
    """The manifest's stage records as they are now (to tell, at the end, which stages were reused)."""
    return read_manifest(RunDir(run_dir))["stages"]


def run_locked(config: Config, command: str, work: Callable[[Pipeline, Inputs], None]) -> None:
    """``work(pipeline, inputs)`` under the run directory's lock, after every early check.

    Order: the run directory is reachable and writable; the lock is taken (a second run stops
    here); the inputs are validated and the plan checked against the memory budget (before Ray
    starts); Ray starts; a local run directory is refused on a multi-node cluster.
    """
    check_storage(config.run_dir, "run_dir")
    with RunDirLock(RunDir(config.run_dir), command):
        pipeline = Pipeline(config)
        inputs = pipeline.validate()  # fail before starting Ray when the input is bad
        pipeline.plan = pipeline.resource_plan(inputs)
        pipeline.plan.check()  # ... or when it cannot fit the memory budget
        init_ray(config)
        check_run_dir_shared(config.run_dir, "run_dir", alive_nodes())
        work(pipeline, inputs)
