"""What every stage works with: the config, the run directory, the plan, the records and the passes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from msif_ray.config import Config
from msif_ray.pipeline.passes import Passes
from msif_ray.pipeline.plan import ResourcePlan
from msif_ray.pipeline.records import StageRecords
from msif_ray.store.storage import RunDir


@dataclass
class RunContext:
    config: Config
    store: RunDir
    plan: ResourcePlan
    records: StageRecords
    passes: Passes
    log: Callable[[str], None]
