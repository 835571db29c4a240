"""Starting or joining Ray, and what the cluster looks like."""

from __future__ import annotations

import logging

import ray

from msif_ray.config import Config


def init_ray(config: Config) -> None:
    """Join the configured cluster, or start an embedded local Ray (no dashboard)."""
    if ray.is_initialized():
        return
    ray.init(address=config.ray.address, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=True, configure_logging=False)


def alive_nodes() -> int:
    """Nodes of the cluster that are up now."""
    return sum(1 for node in ray.nodes() if node.get("Alive"))
