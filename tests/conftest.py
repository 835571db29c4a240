import os
import sys
from pathlib import Path

# tests/support/ holds shared helpers (tiny.py, world.py, s3_fixture.py, browser.py) imported as plain modules.
sys.path.insert(0, str(Path(__file__).parent / "support"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from s3_fixture import s3_bucket, s3_faults, s3_proxy, s3_server  # noqa: F401  (fixtures)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run the tests marked slow (long end-to-end, fault-injection and benchmark runs); "
                          "without it they are deselected. `--slow -m slow` runs only them.")


def pytest_collection_modifyitems(config, items):
    """Without --slow, deselect the tests marked slow (reported as "N deselected", not as skipped)."""
    if config.getoption("--slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray instance for the whole test session: 2 CPUs, no dashboard; a new one (``address="local"``),
    never a cluster that another process started on this machine (the fault matrix starts one).

    Started after the moto S3 server, so that Ray's workers inherit its endpoint and credentials.
    """
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    from world import build_world

    return build_world(tmp_path_factory.mktemp("world"))
