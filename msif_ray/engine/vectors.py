"""Preconditioned query vectors Ṽ_q per tracked layer: dense [Q, out, in] or rank-r factors.

Ṽ_q = left @ rightᵀ with left [Q, out, r] and right [Q, in, r]; the scoring pass and the index
consume them in either form (``scoring.py``, ``index.py``), the preconditioning chains produce them
(``influence.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

@dataclass
class LayerVectors:
    """Ṽ_q of one layer for Q queries: ``dense`` [Q, out, in], or ``left`` [Q, out, r] @ ``right`` [Q, in, r]ᵀ.

    ``norm2`` [Q], when the chain gives it: ‖Ṽ_q‖² in the metric of H_pt + λI, Σ_ij U_ij² (Λ_ij + λ)
    with U = Q_Sᵀ Ṽ_q Q_A at full rank (‖G_q‖² for grad_dot): the query's side of
    ``scoring.normalize: unit``.
    """

    dense: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    norm2: torch.Tensor | None = None

    @property
    def num_queries(self) -> int:
        return (self.dense if self.dense is not None else self.left).shape[0]

    @property
    def is_low_rank(self) -> bool:
        return self.dense is None

    def to_dense(self) -> torch.Tensor:
        return self.dense if self.dense is not None else self.left @ self.right.mT

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"dense": self.dense} if self.dense is not None else {"left": self.left, "right": self.right}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "LayerVectors":
        """``fn`` applied to every tensor (``norm2`` too: selections and moves keep it)."""
        return LayerVectors(**{k: fn(v) for k, v in self.tensors().items()},
                            norm2=None if self.norm2 is None else fn(self.norm2))


@dataclass
class QueryVectors:
    """Preconditioned query vectors per tracked layer, with the query ids in order."""

    ids: list[str]
    layers: dict[str, LayerVectors] = field(default_factory=dict)

    @classmethod
    def from_dense(cls, vectors: dict[str, torch.Tensor], ids: Sequence[str] | None = None) -> "QueryVectors":
        num = next(iter(vectors.values())).shape[0]
        return cls(list(ids) if ids is not None else [str(i) for i in range(num)],
                   {name: LayerVectors(dense=v) for name, v in vectors.items()})

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "QueryVectors":
        return QueryVectors(self.ids, {n: v.map(lambda t: t.to(device=device, dtype=dtype)) for n, v in self.layers.items()})

    def select(self, index: Sequence[int]) -> "QueryVectors":
        """The queries at ``index``, in that order."""
        rows = torch.tensor(list(index), dtype=torch.long)
        return QueryVectors([self.ids[i] for i in index],
                            {n: v.map(lambda t: t.index_select(0, rows)) for n, v in self.layers.items()})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for v in self.layers.values() for t in v.tensors().values())

    def whitened_norms(self) -> torch.Tensor | None:
        """‖Ṽ_q‖ in the metric of H_pt + λI over all layers, [Q] float64 (None unless every layer has ``norm2``)."""
        if not self.layers or any(v.norm2 is None for v in self.layers.values()):
            return None
        return sum(v.norm2.double().cpu() for v in self.layers.values()).clamp_min(0).sqrt()

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``<layer>/<dense|left|right|norm2>`` tensors for safetensors (ids go in the metadata)."""
        out = {}
        for name, v in self.layers.items():
            parts = v.tensors() | ({"norm2": v.norm2} if v.norm2 is not None else {})
            out |= {f"{name}/{kind}": t.contiguous().cpu() for kind, t in parts.items()}
        return out

    @classmethod
    def from_tensors(cls, ids: list[str], tensors: dict[str, torch.Tensor]) -> "QueryVectors":
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            name, _, kind = key.rpartition("/")
            layers.setdefault(name, {})[kind] = tensor
        return cls(ids, {name: LayerVectors(**parts) for name, parts in layers.items()})

    @classmethod
    def concat(cls, parts: Sequence["QueryVectors"]) -> "QueryVectors":
        """The queries of several batches as one group (same layers, same form)."""
        first = parts[0]
        layers = {}
        for name, v in first.layers.items():
            layers[name] = LayerVectors(**{k: torch.cat([p.layers[name].tensors()[k] for p in parts]) for k in v.tensors()})
            if all(p.layers[name].norm2 is not None for p in parts):
                layers[name].norm2 = torch.cat([p.layers[name].norm2 for p in parts])
        return cls([i for p in parts for i in p.ids], layers)


def as_query_vectors(vectors: "QueryVectors | dict[str, torch.Tensor]") -> QueryVectors:
    """Accept the dense ``name -> [Q, out, in]`` dicts of the notebook API too."""
    return vectors if isinstance(vectors, QueryVectors) else QueryVectors.from_dense(vectors)

