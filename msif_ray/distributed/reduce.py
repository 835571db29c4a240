"""Reduce steps, as Ray tasks that read and write the run directory (never the object store).

They run between map passes, while the workers sit idle, so they reserve no CPU of their own;
``run_bounded`` keeps as many in flight as the cluster has CPUs free (at least one).
"""

from __future__ import annotations

from typing import Sequence

import ray
import torch

from msif_ray.curvature import Eigenbasis, check_finite, symmetric_eigh
from msif_ray.storage import RunDir

COUNT_KEYS = ("num_tokens", "num_windows")


def _sum_files(store: RunDir, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Key-wise sum of safetensors files, one file in memory at a time (plus the running sum)."""
    total: dict[str, torch.Tensor] = {}
    for name in names:
        for key, value in store.load_tensors(name)[0].items():
            total[key] = total[key] + value if key in total else value
    return total


@ray.remote(num_cpus=0)
def reduce_covariances(run_dir: str, names: list[str], output_prefix: str) -> list[str]:
    """Sum the per-shard covariance partials; write one file per layer (A, S and the counts).

    One file per layer lets each eigendecomposition task read only its own layer.
    Returns the layer names.
    """
    store = RunDir(run_dir)
    total = _sum_files(store, names)
    counts = {k: total[k] for k in COUNT_KEYS}
    layers = sorted({k.rsplit("/", 1)[0] for k in total if k not in COUNT_KEYS})
    for layer in layers:
        store.save_tensors(f"{output_prefix}/{layer}.safetensors",
                           {"A": total[f"{layer}/A"], "S": total[f"{layer}/S"], **counts}, {"partials": str(len(names))})
    return layers


@ray.remote(num_cpus=0)
def reduce_lambdas(run_dir: str, names: list[str], output: str) -> None:
    """Sum the per-shard Λ partials into one file."""
    store = RunDir(run_dir)
    store.save_tensors(output, _sum_files(store, names), {"partials": str(len(names))})


@ray.remote(num_cpus=0)
def eigendecompose(run_dir: str, layer_file: str, layer: str, which: str, output: str) -> None:
    """Float64 eigendecomposition of one factor (``which`` = "A" or "S") of one layer."""
    store = RunDir(run_dir)
    tensors, _ = store.load_tensors(layer_file)
    check_finite(layer, tensors[which], f"{which} covariance")
    values, vectors = symmetric_eigh(tensors[which], int(tensors["num_tokens"]))
    store.save_tensors(output, {f"{layer}/Q_{which}": vectors, f"{layer}/d_{which}": values}, {"layer": layer})


def run_bounded(calls: list[tuple], limit: int | None = None) -> list:
    """Run ``(remote_function, *args)`` calls with at most ``limit`` in flight; results in order.

    The default limit is the number of CPUs free in the cluster (at least one), so a laptop
    does not start a Python process per task while a cluster fans out fully.
    """
    limit = limit or max(1, int(ray.available_resources().get("CPU", 0)))
    refs: list[ray.ObjectRef] = []
    in_flight: list[ray.ObjectRef] = []
    for function, *args in calls:
        if len(in_flight) >= limit:
            _, in_flight = ray.wait(in_flight, num_returns=1)
        refs.append(function.remote(*args))
        in_flight.append(refs[-1])
    return ray.get(refs)


def load_bases(store: RunDir, names: Sequence[str]) -> dict[str, Eigenbasis]:
    """Eigenbases per layer from the per-factor files the eigendecomposition tasks wrote."""
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        tensors |= store.load_tensors(name)[0]
    layers = sorted({k.rsplit("/", 1)[0] for k in tensors})
    return {n: Eigenbasis(tensors[f"{n}/Q_A"], tensors[f"{n}/Q_S"], tensors[f"{n}/d_A"], tensors[f"{n}/d_S"]) for n in layers}
