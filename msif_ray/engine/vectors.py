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
    """Ṽ_q of one layer for Q queries: ``dense`` [Q, out, in], or ``left`` [Q, out, r] @ ``right`` [Q, in, r]ᵀ."""

    dense: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

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
        return LayerVectors(**{k: fn(v) for k, v in self.tensors().items()})


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

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``<layer>/<dense|left|right>`` tensors for safetensors (ids go in the metadata)."""
        return {f"{n}/{k}": t.contiguous().cpu() for n, v in self.layers.items() for k, t in v.tensors().items()}

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
        return cls([i for p in parts for i in p.ids], layers)


def as_query_vectors(vectors: "QueryVectors | dict[str, torch.Tensor]") -> QueryVectors:
    """Accept the dense ``name -> [Q, out, in]`` dicts of the notebook API too."""
    return vectors if isinstance(vectors, QueryVectors) else QueryVectors.from_dense(vectors)

