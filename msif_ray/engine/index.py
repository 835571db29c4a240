"""The corpus gradient index: each document's largest gradient terms in the pre-training eigenbasis.

In one tracked layer's EK-FAC eigenbasis (Q_S [out, out], Q_A [in, in], eigenvalues Λ [out, in],
damping λ; ``curvature.py``) a document's gradient and a preconditioned query are

    V_m = Q_Sᵀ G_m Q_A = Σ_t (Q_Sᵀ s_t)(Q_Aᵀ a_t)ᵀ      [out, in]   (the Λ pass forms the same matrix)
    U_q = Q_Sᵀ Ṽ_q Q_A                                  [out, in]   (rank r: (Q_Sᵀ L)(Q_Aᵀ R)ᵀ)

and, Q being orthogonal, the exact score is  ⟨Ṽ_q, G_m⟩ = Σ_ij U_q,ij V_m,ij. The index keeps, per
document and layer, the ``terms`` coordinates (i, j) with the largest |V_m,ij| · w_ij, where
w = (Λ + λ)^(-1/2): the document's gradient whitened halfway, as the preconditioned query carries
the other half, so that a kept term's expected share of the score, not only its size, decides.
The estimate  Σ_(i,j kept) U_q,ij V_m,ij  is exact on the kept terms and drops the rest: with
every term kept (``terms`` ≥ out·in) it is the exact score (up to the float16 storage).

benchmarks/bench_index.py measures the choice against random Gaussian sketches of the same bytes
(README: "Corpus gradient index"): at 2 kB per layer on the demo world, Pearson vs exact multi-stage 0.51 vs 0.15.

Without pre-training factors (``grad_dot``) the basis is the identity and w = 1.

Storage per document and layer: ``terms`` values in float16, divided by the layer's largest kept
magnitude (a float32 ``scale`` per layer), and their flat positions i·in + j in int32: 6 bytes a
term. Cost on top of the backward pass, per window and layer: T·(out² + in²) to rotate the token
factors and T·out·in for V (the Λ pass's work), plus a top-k over out·in.

The scan rebuilds U_q densely for a few queries of one layer at a time and multiplies it by the
documents' terms as a sparse matrix: Q·Σ_layers out·in·r to build, N·Q·Σ_layers terms to multiply.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from msif_ray.engine.curvature import LayerFactors
from msif_ray.engine.gradients import Batch, backward_through_layers, model_device, per_example_gradient
from msif_ray.engine.modules import LayerSpec, LayerTaps
from msif_ray.engine.vectors import LayerVectors, QueryVectors

SCAN_BLOCK_BYTES = 1 << 28  # one scan step's dense query block: out·in x queries float32 numbers


@dataclass(frozen=True)
class TermBasis:
    """One layer's basis and term weights: Q_S [out, out], Q_A [in, in] (None: the identity) and
    w [out, in] (None: all ones)."""

    s_vectors: torch.Tensor | None
    a_vectors: torch.Tensor | None
    weight: torch.Tensor | None

    @classmethod
    def of(cls, factors: LayerFactors | None, damping: float | str = "auto") -> "TermBasis":
        """The pre-training eigenbasis with w = (Λ + λ)^(-1/2), or the identity without factors."""
        if factors is None:
            return cls(None, None, None)
        lam = factors.lambdas.double().clamp_min(0)
        weight = (lam + factors.damping(damping)).clamp_min(1e-30).rsqrt()
        return cls(factors.s_vectors.float(), factors.a_vectors.float(), weight.float())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: t.contiguous() for name, t in (("s_vectors", self.s_vectors), ("a_vectors", self.a_vectors),
                                                      ("weight", self.weight)) if t is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "TermBasis":
        return cls(tensors.get("s_vectors"), tensors.get("a_vectors"), tensors.get("weight"))

    def to(self, device: torch.device | str) -> "TermBasis":
        return TermBasis(*(None if t is None else t.to(device) for t in (self.s_vectors, self.a_vectors, self.weight)))

    def rotate_tokens(self, s: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q_Sᵀ s_t, Q_Aᵀ a_t) for every token: s [..., out], a [..., in]."""
        if self.s_vectors is None:
            return s.float(), a.float()
        return s.float() @ self.s_vectors, a.float() @ self.a_vectors

    def rotate_query(self, v: LayerVectors) -> LayerVectors:
        """U_q = Q_Sᵀ Ṽ_q Q_A, kept low-rank when Ṽ_q is (``norm2``, a rotation's invariant, kept too)."""
        if self.s_vectors is None:
            return v.map(lambda t: t.float())
        device = (v.left if v.is_low_rank else v.dense).device
        q_s, q_a = self.s_vectors.to(device), self.a_vectors.to(device)
        if v.is_low_rank:
            return LayerVectors(left=q_s.t() @ v.left.float(), right=q_a.t() @ v.right.float(), norm2=v.norm2)
        return LayerVectors(dense=q_s.t() @ v.dense.float() @ q_a, norm2=v.norm2)


def term_bases(layers: list[LayerSpec], factors: Callable[[str], LayerFactors] | None,
               damping: float | str = "auto") -> dict[str, TermBasis]:
    """Each layer's ``TermBasis`` from its pre-training factors (the identity without)."""
    return {spec.name: TermBasis.of(None if factors is None else factors(spec.name), damping) for spec in layers}


@dataclass
class IndexRows:
    """Index rows of N documents over L layers of ``terms[l]`` kept terms each (concatenated in layer order).

    ``values`` [N, Σ terms] float16 (each layer divided by ``scale``), ``positions`` [N, Σ terms]
    int32 (i·in + j within the layer), ``scale`` [N, L] float32.
    """

    values: torch.Tensor
    positions: torch.Tensor
    scale: torch.Tensor
    counts: list[int]  # terms per layer

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values.cpu(), "positions": self.positions.cpu(), "scale": self.scale.cpu(),
                "counts": torch.tensor(self.counts, dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "IndexRows":
        return cls(tensors["values"], tensors["positions"], tensors["scale"], tensors["counts"].tolist())

    def to(self, device: torch.device | str) -> "IndexRows":
        return IndexRows(self.values.to(device), self.positions.to(device), self.scale.to(device), self.counts)

    @classmethod
    def concat(cls, parts: list["IndexRows"]) -> "IndexRows":
        """The rows of several layer groups side by side (the same documents, groups in order)."""
        return cls(torch.cat([p.values for p in parts], 1), torch.cat([p.positions for p in parts], 1),
                   torch.cat([p.scale for p in parts], 1), [c for p in parts for c in p.counts])


def layer_terms(specs: list[LayerSpec], terms: int) -> list[int]:
    """Terms kept per layer: ``terms``, or every coordinate of a smaller layer."""
    return [min(terms, s.out_features * s.in_dim) for s in specs]


def document_terms(model: nn.Module, taps: LayerTaps, batches: list[Batch], num_documents: int,
                   bases: dict[str, TermBasis], terms: int, layers: Sequence[str] | None = None,
                   self_influence: torch.Tensor | None = None) -> IndexRows:
    """Index rows of whole documents: each one's windows summed into V_m, then its top terms per layer
    (of ``layers``, a layer group whose ``bases`` fit in memory; default: every tracked layer), ranked
    by |V_m,ij|·w_ij. With ``self_influence`` [N] float64 given, each document's share of its
    self-influence over these layers (``document_self_influence``) is added to it in the same pass:
    the index's weights are the self-influence's when both come from the same factors and λ."""
    names = list(layers) if layers is not None else list(taps.modules)
    counts = layer_terms([taps.specs[n] for n in names], terms)
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    device = model_device(model)
    values = torch.zeros(num_documents, sum(counts), device=device)
    positions = torch.zeros(num_documents, sum(counts), dtype=torch.int32, device=device)

    def keep_top(name: str, done: torch.Tensor, v: torch.Tensor) -> None:
        layer = names.index(name)
        weighted = _whitened(v, bases[name].weight).abs_()
        top = weighted.topk(counts[layer], dim=1).indices
        lo, hi = offsets[layer], offsets[layer] + counts[layer]
        values[done, lo:hi] = v.gather(1, top).to(device)
        positions[done, lo:hi] = top.to(device, torch.int32)
        if self_influence is not None:
            self_influence.index_add_(0, done.to(self_influence.device), _energy(weighted).to(self_influence.device))

    each_document_gradient(model, taps, batches, num_documents, bases, names, keep_top)
    for name, block in zip(names, values.split(counts, dim=1)):
        if not torch.isfinite(block).all():
            raise FloatingPointError(f"non-finite document gradient in layer {name!r}: check the model weights and inputs")
    if self_influence is not None and not torch.isfinite(self_influence).all():
        raise FloatingPointError("non-finite document self-influence: check the model weights and inputs")
    return quantize(values, positions, counts)


def document_self_influence(model: nn.Module, taps: LayerTaps, batches: list[Batch], num_documents: int,
                            bases: dict[str, TermBasis], layers: Sequence[str] | None = None) -> torch.Tensor:
    """Each document's self-influence over ``layers`` (default: every tracked layer): [N] float64,

        I_m = G_mᵀ (H + λI)⁻¹ G_m = Σ_layers Σ_ij (V_m,ij · w_ij)²,   w = (Λ + λ)^(-1/2)

    in each layer's ``TermBasis`` (‖G_m‖² in the identity basis). Layer groups add up.
    """
    names = list(layers) if layers is not None else list(taps.modules)
    device = model_device(model)
    total = torch.zeros(num_documents, dtype=torch.float64, device=device)

    def add(name: str, done: torch.Tensor, v: torch.Tensor) -> None:
        total.index_add_(0, done, _energy(_whitened(v, bases[name].weight)).to(device))

    each_document_gradient(model, taps, batches, num_documents, bases, names, add)
    if not torch.isfinite(total).all():
        raise FloatingPointError("non-finite document self-influence: check the model weights and inputs")
    return total.cpu()


def _whitened(v: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """V·w [D, out·in], a new tensor (w None: a copy of V)."""
    return v.clone() if weight is None else v * weight.flatten()


def _energy(whitened: torch.Tensor) -> torch.Tensor:
    """Σ_ij (V·w)²_ij per document: [D] float64, squaring ``whitened`` (or its absolute value) in place.
    Torch's pairwise float32 sum of these positive terms is within 1e-7 of float64 (measured on the
    160m's 3,072 x 769 layers; vector_norm and a BLAS dot were 2e-4 and 3e-3 off)."""
    return whitened.square_().sum(1).double()


def each_document_gradient(model: nn.Module, taps: LayerTaps, batches: list[Batch], num_documents: int,
                           bases: dict[str, TermBasis], names: list[str],
                           visit: Callable[[str, torch.Tensor, torch.Tensor], None]) -> None:
    """One forward and backward per batch; for each layer of ``names``, ``visit(layer, documents,
    V)`` with V [D, out·in] = Σ_windows Q_Sᵀ s_t a_tᵀ Q_A of each document finished in the batch
    (``documents`` [D], their indices).

    A document is finished when its last window has been seen, so memory holds the documents of
    one batch per layer, plus those whose windows continue in a later batch (none when the batches
    keep each document's windows together, ``make_batches(..., by_document=True)``).
    """
    device = model_device(model)
    windows_left = torch.zeros(num_documents, dtype=torch.long)
    for batch in batches:
        windows_left.index_add_(0, batch.examples, torch.ones_like(batch.examples))
    open_docs: dict[str, dict[int, torch.Tensor]] = {n: {} for n in names}

    for batch in batches:
        docs = batch.examples.tolist()
        unique = list(dict.fromkeys(docs))  # the batch's documents, in order
        row_of = {d: row for row, d in enumerate(unique)}
        finished_after = windows_left.clone()
        finished_after.index_add_(0, batch.examples, -torch.ones_like(batch.examples))
        done = [d for d in unique if finished_after[d] == 0]

        def add_layer(name: str, a: torch.Tensor, s: torch.Tensor) -> None:
            s_rot, a_rot = bases[name].rotate_tokens(s, a)
            per_window = per_example_gradient(a_rot, s_rot)  # V of each window [B, out, in]
            slot = torch.tensor([row_of[d] for d in docs], device=per_window.device)
            per_doc = per_window.new_zeros((len(unique),) + per_window.shape[1:]).index_add_(0, slot, per_window)
            kept = open_docs[name]
            for row, d in enumerate(unique):
                if d in kept:
                    per_doc[row] += kept.pop(d)
                if d not in done:
                    kept[d] = per_doc[row].clone()
            if done:
                visit(name, torch.tensor(done, device=device), per_doc[[row_of[d] for d in done]].flatten(1))

        backward_through_layers(model, taps, batch, add_layer, layers=names)
        windows_left = finished_after


def quantize(values: torch.Tensor, positions: torch.Tensor, counts: list[int]) -> IndexRows:
    """Float32 values -> float16 with each layer's block divided by its largest magnitude (a zero
    block keeps scale 1): float16's 11-bit mantissa, and no overflow or underflow whatever the
    gradients' magnitude."""
    blocks = values.float().split(counts, dim=1)
    scale = torch.stack([b.abs().amax(dim=1) for b in blocks], dim=1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = torch.cat([b / scale[:, i : i + 1] for i, b in enumerate(blocks)], dim=1)
    return IndexRows(scaled.to(torch.float16), positions, scale, list(counts))


def rotate_queries(vectors: QueryVectors, bases: dict[str, TermBasis], layers: list[str]) -> dict[str, LayerVectors]:
    """U_q per layer (``TermBasis.rotate_query``): what ``scan`` multiplies the index rows with."""
    return {name: bases[name].rotate_query(vectors.layers[name]) for name in layers}


def scan(rows: IndexRows, queries: dict[str, LayerVectors], layers: list[str]) -> torch.Tensor:
    """Estimated scores of every indexed document against every rotated query: [N, Q] float64.

    Per layer, the documents' kept terms are a sparse [N, out·in] matrix (CSR, ``terms`` entries a
    row) and U_q is built densely for a few queries at a time (``SCAN_BLOCK_BYTES`` bound the dense
    [out·in, q] block); their product is each document's estimate, N·q·terms multiply-adds.
    """
    n = rows.values.shape[0]
    num_queries = next(iter(queries.values())).num_queries
    out = torch.zeros(n, num_queries, dtype=torch.float64)
    lo = 0
    for layer, (name, count) in enumerate(zip(layers, rows.counts)):
        u = queries[name]
        width = int(u.left.shape[1] * u.right.shape[1]) if u.is_low_rank else int(u.dense[0].numel())
        values = rows.values[:, lo:lo + count].float() * rows.scale[:, layer:layer + 1].float()
        terms = _sparse_rows(values, rows.positions[:, lo:lo + count], width)
        step = max(1, min(num_queries, SCAN_BLOCK_BYTES // (4 * max(width, 1))))
        for q0 in range(0, num_queries, step):
            q1 = min(q0 + step, num_queries)
            dense = (u.left[q0:q1] @ u.right[q0:q1].mT if u.is_low_rank else u.dense[q0:q1]).flatten(1)  # [q, out·in]
            out[:, q0:q1] += (terms @ dense.t().contiguous().to(values.device)).double().cpu()
        lo += count
    return out


def _sparse_rows(values: torch.Tensor, positions: torch.Tensor, width: int) -> torch.Tensor:
    """[N, terms] values at [N, terms] positions as a CSR matrix [N, width] (torch marks CSR beta)."""
    n, count = values.shape
    crow = torch.arange(0, n * count + 1, count, device=values.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, positions.long().flatten(), values.flatten(), size=(n, width))
