"""A run under its run directory's lock, after every early check (``msif run``, ``nightly``, ``tune``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from msif_ray.config import Config
from msif_ray.pipeline.guard import guarded
from msif_ray.store.layout import read_manifest
from msif_ray.store.storage import RunDir

if TYPE_CHECKING:
    from msif_ray.pipeline.run import Inputs, Pipeline


def stages_now(run_dir: str) -> dict:
    """The manifest's stage records as they are now (to tell, at the end, which stages were reused)."""
    return read_manifest(RunDir(run_dir))["stages"]


def run_locked(config: Config, command: str, work: Callable[["Pipeline", "Inputs"], None]) -> None:
    """``work(pipeline, inputs)`` under the run directory's lock, after every early check (``guard.guarded``).

    The pipeline is made and validated beside Ray's start, so that importing it (torch and
    transformers: seconds) overlaps too. ``Pipeline.run()`` called from ``work`` runs in the lock
    this thread holds (it only counts) without checking again.
    """
    guarded(config, command, lambda: validated(config), work)


def validated(config: Config) -> tuple["Pipeline", "Inputs"]:
    """A pipeline whose inputs are validated and whose plan fits (else a ``UserError`` naming the culprit)."""
    from msif_ray.pipeline.run import Pipeline  # torch and transformers: seconds, spent while Ray starts

    pipeline = Pipeline(config)
    return pipeline, pipeline.checked()
