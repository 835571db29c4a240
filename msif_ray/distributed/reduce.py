"""Reduce steps, as Ray tasks that read and write the run directory (never the object store).

One task per (layer, factor): it reads only that layer's tensors from each worker checkpoint (byte
ranges of the safetensors files), sums them and writes the result, so no process ever holds more
than one layer's factors and the reduce fans out over the cluster. Each task declares the memory
it needs (``reduce_memory_bytes``) and, on a multi-node cluster, runs on a worker node rather than
the head. They run between map passes, while the workers' actors sit idle, so they reserve no
CPU; ``run_bounded`` keeps as many in flight as the cluster has CPUs.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from msif_ray.engine.curvature import check_finite, symmetric_eigh
from msif_ray.distributed.memory import peak_rss_mb, reset_peak_rss
from msif_ray.store.layout import eigen_file, factor_layer
from msif_ray.store.storage import RunDir

HEAD_RESOURCE = "node:__internal_head__"


def sum_layer(store: RunDir, checkpoints: Sequence[str], key: str, count: str) -> tuple[torch.Tensor, int]:
    """Σ over checkpoints of tensor ``key`` and of the counter ``count``, reading one tensor at a time."""
    total, number = None, 0
    for name in checkpoints:
        tensors, _ = store.load_tensors(name, [key, count])
        total = tensors[key] if total is None else total.add_(tensors[key])
        number += int(tensors[count])
    return total, number


@ray.remote(num_cpus=0)
def eigendecompose(run_dir: str, checkpoints: list[str], factors: str, layer: str, which: str) -> dict[str, float]:
    """Sum one covariance factor (``which`` = "A" or "S") of one layer; float64 eigendecomposition."""
    reset_peak_rss()
    store = RunDir(run_dir)
    total, tokens = sum_layer(store, checkpoints, f"{layer}/{which}", "num_tokens")
    check_finite(layer, total, f"{which} covariance")
    values, vectors = symmetric_eigh(total, tokens)
    store.save_tensors(eigen_file(factors, layer, which), {"vectors": vectors, "values": values},
                       {"layer": layer, "num_tokens": str(tokens)})
    return {"peak_rss_mb": peak_rss_mb()}


@ray.remote(num_cpus=0)
def finish_layer(run_dir: str, checkpoints: list[str], factors: str, layer: str) -> dict[str, float]:
    """Λ of one layer = Σ (Q_Sᵀ G Q_A)² / windows; written with the layer's eigenbases as its factor file."""
    reset_peak_rss()
    store = RunDir(run_dir)
    total, windows = sum_layer(store, checkpoints, f"{layer}/lambda", "num_windows")
    lambdas = total / max(windows, 1)
    check_finite(layer, lambdas, "eigenvalue correction")
    bases = {which: store.load_tensors(eigen_file(factors, layer, which))[0]["vectors"] for which in "AS"}
    store.save_tensors(factor_layer(factors, layer), {"Q_A": bases["A"], "Q_S": bases["S"],
                                                      "lambda": lambdas.to(bases["A"].dtype).contiguous()},
                       {"layer": layer, "num_windows": str(windows)})
    return {"num_windows": windows, "peak_rss_mb": peak_rss_mb()}


def reduce_memory_bytes(out: int, inp: int, which: str) -> int:
    """Peak bytes of one reduce task: the float32 sum and one checkpoint's tensor, then float64 eigh.

    Eigen: n² x (4 + 4 + 8 x 3) for n = in or out (sum, read buffer, matrix, vectors, workspace).
    Finish: out·in x 4 x 3 (sum, read buffer, Λ) plus both bases.
    """
    if which in ("A", "S"):
        n = inp if which == "A" else out
        return 32 * n * n + (64 << 20)
    return 12 * out * inp + 4 * (out * out + inp * inp) + (64 << 20)


def worker_nodes() -> list[str]:
    """Alive nodes other than the head (empty on a single-node Ray, e.g. a laptop)."""
    return [n["NodeID"] for n in ray.nodes() if n.get("Alive") and HEAD_RESOURCE not in n.get("Resources", {})]


def run_bounded(calls: list[tuple], memory: Sequence[int] | None = None, limit: int | None = None) -> list:
    """Run ``(remote_function, *args)`` calls with at most ``limit`` in flight; results in order.

    ``memory`` (bytes per call) is declared to Ray, which then places each task where that much is
    free. On a multi-node cluster tasks are spread over the worker nodes, never the head. The
    default limit is the number of CPUs in the cluster (the workers are idle while reduces run).
    """
    limit = limit or max(1, int(ray.cluster_resources().get("CPU", 1)))
    nodes = itertools.cycle(worker_nodes() or [None])
    refs: list[ray.ObjectRef] = []
    in_flight: list[ray.ObjectRef] = []
    for i, (function, *args) in enumerate(calls):
        if len(in_flight) >= limit:
            _, in_flight = ray.wait(in_flight, num_returns=1)
        options = {"memory": memory[i]} if memory is not None else {}
        node = next(nodes)
        if node is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        refs.append(function.options(**options).remote(*args))
        in_flight.append(refs[-1])
    return ray.get(refs)
