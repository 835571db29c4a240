"""Starting or joining Ray, and what the cluster looks like."""

from __future__ import annotations

import logging

import ray

from msif_ray.config import Config
from msif_ray.errors import UserError


class ClusterUnreachableError(UserError, ConnectionError):
    """``ray.address`` names a cluster this machine cannot reach."""


def init_ray(config: Config) -> None:
    """Join the configured cluster, or start an embedded local Ray (no dashboard)."""
    if ray.is_initialized():
        return
    try:
        ray.init(address=config.ray.address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=True, configure_logging=False)
    except ConnectionError as err:
        if config.ray.address is None:
            raise
        raise ClusterUnreachableError(f"ray.address: cannot reach the Ray cluster at {config.ray.address} ({err}); "
                                      "check that it is up and reachable from here, or leave ray.address "
                                      "unset for an embedded local Ray") from err


def alive_nodes() -> int:
    """Nodes of the cluster that are up now."""
    return sum(1 for node in ray.nodes() if node.get("Alive"))
