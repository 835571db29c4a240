"""Reduce steps of the factor stages, run as jobs on the worker actors over the run directory.

One job per (layer, factor), run as ``job.run(store, device)``: it reads only that layer's tensors
from each worker checkpoint (byte ranges of the safetensors files), sums them and writes the
result, so no process ever holds more than one layer's factors. The jobs run between map passes on
the pool's actors, which sit idle then and have torch and their storage client loaded (a Ray task
per job started fresh processes that imported them again). Handed out one per idle actor, they fan
out over the cluster, and a job whose actor died is handed out again (``WorkerPool.map``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from msif_ray.engine.curvature import check_finite, symmetric_eigh
from msif_ray.store.layout import eigen_file, factor_layer
from msif_ray.store.storage import RunDir


def sum_layer(store: RunDir, checkpoints: Sequence[str], key: str, count: str) -> tuple[torch.Tensor, int]:
    """Σ over checkpoints of tensor ``key`` and of the counter ``count``, reading one tensor at a time."""
    total, number = None, 0
    for name in checkpoints:
        tensors, _ = store.load_tensors(name, [key, count])
        total = tensors[key] if total is None else total.add_(tensors[key])
        number += int(tensors[count])
    return total, number


@dataclass(frozen=True)
class Eigendecompose:
    """Sum one covariance factor (``which`` = "A" or "S") of ``layer``; its float64 eigendecomposition."""

    checkpoints: tuple[str, ...]
    factors: str
    layer: str
    which: str

    @property
    def job_id(self) -> str:
        return f"eigh {self.layer} {self.which}"

    def run(self, store: RunDir, device: torch.device | None = None) -> dict:
        """On ``device`` (the worker's GPU, if it has one) the eigendecomposition takes seconds
        where a CPU takes minutes for a 7B model's 11008² factors."""
        total, tokens = sum_layer(store, self.checkpoints, f"{self.layer}/{self.which}", "num_tokens")
        check_finite(self.layer, total, f"{self.which} covariance")
        values, vectors = (t.cpu() for t in symmetric_eigh(total.to(device or "cpu"), tokens))
        store.save_tensors(eigen_file(self.factors, self.layer, self.which), {"vectors": vectors, "values": values},
                           {"layer": self.layer, "num_tokens": str(tokens)})
        return {}


@dataclass(frozen=True)
class FinishLayer:
    """Λ of ``layer`` = Σ (Q_Sᵀ G Q_A)² / windows; written with the layer's eigenbases as its factor file."""

    checkpoints: tuple[str, ...]
    factors: str
    layer: str

    @property
    def job_id(self) -> str:
        return f"finish {self.layer}"

    def run(self, store: RunDir, device: torch.device | None = None) -> dict:
        total, windows = sum_layer(store, self.checkpoints, f"{self.layer}/lambda", "num_windows")
        lambdas = total / max(windows, 1)
        check_finite(self.layer, lambdas, "eigenvalue correction")
        bases = {which: store.load_tensors(eigen_file(self.factors, self.layer, which))[0]["vectors"] for which in "AS"}
        store.save_tensors(factor_layer(self.factors, self.layer),
                           {"Q_A": bases["A"], "Q_S": bases["S"], "lambda": lambdas.to(bases["A"].dtype).contiguous()},
                           {"layer": self.layer, "num_windows": str(windows)})
        return {"num_windows": windows}
