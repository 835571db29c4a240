import os
import sys
from pathlib import Path

# tests/ holds shared helpers (tiny.py) imported as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session: 2 CPUs, no dashboard."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    from world import build_world

    return build_world(tmp_path_factory.mktemp("world"))
