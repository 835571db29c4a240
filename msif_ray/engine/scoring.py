"""Scores of corpus windows against a group of preconditioned queries, and the top-k tables.

Per tracked layer and batch of windows (a [B, T, in], s [B, T, out]), ⟨Ṽ_q, G_b⟩ with
G_b = Σ_t s_t a_tᵀ is computed in the cheapest of three forms, chosen from a FLOP count:

    dense Ṽ [Q, out, in]:         G = sᵀa, then one matmul [B, out·in] x [out·in, Q]
                                  2·B·out·in·(T + Q)
    low-rank Ṽ = U Vᵀ, G-form:    G = sᵀa, then (G V) ⊙ U summed            (one matmul with all Q·r)
                                  2·B·out·in·(T + Q·r)
    low-rank, factored:           Σ_t (Uᵀ s_t)·(Vᵀ a_t), G never formed     (two matmuls with all Q·r)
                                  2·B·T·Q·r·(out + in)

The factored form wins for short windows and many queries; the G-form for long windows. Large
intermediate products are computed over blocks of queries so that the working set stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import torch
from torch import nn

from msif_ray.engine.gradients import Batch, backward_through_layers, model_device, per_example_gradient
from msif_ray.engine.vectors import LayerVectors, QueryVectors
from msif_ray.engine.modules import LayerTaps

WORKING_SET_ELEMENTS = 1 << 25  # 128 MiB of float32 per intermediate product


@dataclass
class LayerOperands:
    """One layer's query vectors laid out for scoring: dense [out·in, Q], or U [out, Q·r] and V [in, Q·r]."""

    dense: torch.Tensor | None
    left: torch.Tensor | None
    right: torch.Tensor | None
    rank: int


def layer_operands(vectors: LayerVectors, device: torch.device, dtype: torch.dtype) -> LayerOperands:
    """One layer's vectors of a single part in scoring layout (see ``QueryGroup.from_parts`` for several)."""
    return QueryGroup.from_parts(vectors.num_queries, [QueryVectors([""] * vectors.num_queries, {"_": vectors})],
                                 device, dtype).layers["_"]


class QueryGroup:
    """The queries scored by one corpus pass, on the scoring device, in scoring layout, with their
    whitened norms [Q] (``QueryVectors.whitened_norms``; None when the vectors carry none)."""

    def __init__(self, vectors: QueryVectors, device: torch.device, dtype: torch.dtype = torch.float32):
        group = QueryGroup.from_parts(len(vectors.ids), [vectors], device, dtype)
        self.ids, self.num_queries, self.layers, self.norms = group.ids, group.num_queries, group.layers, group.norms

    @classmethod
    def from_parts(cls, num_queries: int, parts: Iterable[QueryVectors], device: torch.device,
                   dtype: torch.dtype = torch.float32) -> "QueryGroup":
        """A group from batches of queries (e.g. loaded one file at a time), written into preallocated
        operands: memory is the group's operands plus one batch, never a second copy of the group."""
        group = cls.__new__(cls)
        group.ids, group.num_queries, group.layers = [], num_queries, {}
        norms = []
        for part in parts:
            start, q = len(group.ids), len(part.ids)
            for name, v in part.layers.items():
                if name not in group.layers:
                    part_dtype = next(iter(v.tensors().values())).dtype
                    group.layers[name] = _allocate(v, num_queries, device, torch.promote_types(dtype, part_dtype))
                ops = group.layers[name]
                if v.dense is not None:
                    ops.dense[:, start : start + q] = v.dense.flatten(1).t()
                else:
                    r = ops.rank
                    ops.left[:, start * r : (start + q) * r] = v.left.permute(1, 0, 2).reshape(v.left.shape[1], q * r)
                    ops.right[:, start * r : (start + q) * r] = v.right.permute(1, 0, 2).reshape(v.right.shape[1], q * r)
            group.ids += part.ids
            norms.append(part.whitened_norms())
        if len(group.ids) != num_queries:
            raise ValueError(f"the parts hold {len(group.ids)} queries, not {num_queries}")
        group.norms = None if any(n is None for n in norms) else torch.cat(norms)
        return group


def _allocate(v: LayerVectors, num_queries: int, device: torch.device, dtype: torch.dtype) -> LayerOperands:
    if v.dense is not None:
        out, inp = v.dense.shape[1:]
        return LayerOperands(torch.empty(out * inp, num_queries, device=device, dtype=dtype), None, None, 0)
    rank = v.left.shape[2]
    return LayerOperands(None, torch.empty(v.left.shape[1], num_queries * rank, device=device, dtype=dtype),
                         torch.empty(v.right.shape[1], num_queries * rank, device=device, dtype=dtype), rank)


# --------------------------------------------------------------------------- normalised scores

Normalize = Literal["none", "self", "unit"]


def normalize_scores(scores: torch.Tensor, how: Normalize, self_influence: torch.Tensor | None = None,
                     query_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Scores [N, Q] normalised by the documents' self-influence I_m [N] (and the queries' whitened
    norms [Q] for ``unit``):

        none:  ⟨Ṽ_q, G_m⟩
        self:  ⟨Ṽ_q, G_m⟩ / √I_m                          (RelatIF: ÷ √ of G_mᵀ(H + λI)⁻¹G_m)
        unit:  ⟨Ṽ_q, G_m⟩ / (√I_m · ‖Ṽ_q‖_(H+λI))         the cosine of the whitened query and document

    ``unit`` is a cosine because ⟨Ṽ_q, G_m⟩ = ⟨(H + λI)^½ Ṽ_q, (H + λI)^-½ G_m⟩, so it lies in [-1, 1];
    per query it ranks as ``self`` does. A document with I_m = 0 (no gradient) scores 0.
    """
    if how == "none":
        return scores
    if self_influence is None or (how == "unit" and query_norms is None):
        raise ValueError(f"scoring.normalize: {how} needs the documents' self-influence"
                         + (" and the queries' whitened norms" if how == "unit" else ""))
    root = self_influence.double().clamp_min(0).sqrt()[:, None]
    out = torch.where(root > 0, scores.double() / root.clamp_min(1e-300), torch.zeros((), dtype=torch.float64))
    if how == "unit":
        norms = query_norms.double()[None, :]
        out = torch.where(norms > 0, out / norms.clamp_min(1e-300), torch.zeros((), dtype=torch.float64))
    return out


# --------------------------------------------------------------------------- FLOP counts


def scoring_flops(form: str, batch: int, tokens: int, out: int, inp: int, queries: int, rank: int) -> int:
    """Multiply-add FLOPs of one layer's scores for a batch of ``batch`` windows of ``tokens`` tokens."""
    if form == "dense":
        return 2 * batch * out * inp * (tokens + queries)
    if form == "gform":
        return 2 * batch * out * inp * (tokens + queries * rank)
    if form == "factored":
        return 2 * batch * tokens * queries * rank * (out + inp)
    raise ValueError(form)


def choose_form(ops: LayerOperands, batch: int, tokens: int, out: int, inp: int, queries: int) -> str:
    """The cheaper form for a low-rank layer ("gform" or "factored"); "dense" for dense vectors."""
    if ops.dense is not None:
        return "dense"
    costs = {f: scoring_flops(f, batch, tokens, out, inp, queries, ops.rank) for f in ("factored", "gform")}
    return min(costs, key=costs.get)


def layer_scores(a: torch.Tensor, s: torch.Tensor, ops: LayerOperands, num_queries: int,
                 form: str | None = None) -> torch.Tensor:
    """⟨Ṽ_q, Σ_t s_t a_tᵀ⟩ for each window and query of one layer: a [B, T, in], s [B, T, out] -> [B, Q].

    ``form`` forces "gform" or "factored" (tests); by default the cheaper one is used.
    """
    batch, tokens, inp = a.shape
    out = s.shape[-1]
    a, s = a.to(_dtype(ops)), s.to(_dtype(ops))
    form = form if ops.dense is None and form is not None else choose_form(ops, batch, tokens, out, inp, num_queries)
    if form == "dense":
        return per_example_gradient(a, s).flatten(1) @ ops.dense
    scores = a.new_zeros(batch, num_queries)
    if form == "gform":
        g = per_example_gradient(a, s)
        for lo, hi in _query_blocks(num_queries, ops.rank, batch * out):
            cols = slice(lo * ops.rank, hi * ops.rank)
            gv = g @ ops.right[:, cols]  # [B, out, q·r]
            scores[:, lo:hi] = (gv * ops.left[:, cols]).sum(1).view(batch, hi - lo, ops.rank).sum(-1)
        return scores
    flat_a, flat_s = a.flatten(0, 1), s.flatten(0, 1)
    for lo, hi in _query_blocks(num_queries, ops.rank, batch * tokens):
        cols = slice(lo * ops.rank, hi * ops.rank)
        products = (flat_s @ ops.left[:, cols]).mul_(flat_a @ ops.right[:, cols])  # [B·T, q·r]
        scores[:, lo:hi] = products.view(batch, tokens, -1).sum(1).view(batch, hi - lo, ops.rank).sum(-1)
    return scores


def _dtype(ops: LayerOperands) -> torch.dtype:
    return (ops.dense if ops.dense is not None else ops.left).dtype


def _query_blocks(num_queries: int, rank: int, rows: int) -> list[tuple[int, int]]:
    """Blocks of queries whose [rows, q·r] intermediate stays within WORKING_SET_ELEMENTS."""
    per_block = max(1, WORKING_SET_ELEMENTS // max(rows * rank, 1))
    return [(lo, min(lo + per_block, num_queries)) for lo in range(0, num_queries, per_block)]


# --------------------------------------------------------------------------- the passes' inner steps


def score_windows(model: nn.Module, taps: LayerTaps, batch: Batch, group: QueryGroup) -> torch.Tensor:
    """Per-layer scores of each window against each query: [L, B, Q] float64, layers in ``taps`` order."""
    names = list(taps.modules)
    scores = torch.zeros(len(names), len(batch.examples), group.num_queries, device=model_device(model),
                         dtype=torch.float64)

    def add_layer(name: str, a: torch.Tensor, s: torch.Tensor) -> None:
        scores[names.index(name)] = layer_scores(a, s, group.layers[name], group.num_queries).double()

    backward_through_layers(model, taps, batch, add_layer)
    return scores


def token_scores(model: nn.Module, taps: LayerTaps, batch: Batch, group: QueryGroup) -> torch.Tensor:
    """Σ_layers s_tᵀ Ṽ_q a_t for each input position: [B, T, Q] (sums over T to the window score).

    A report-sized computation over a few documents.
    """
    device = model_device(model)
    out = torch.zeros(*batch.input_ids.shape, group.num_queries, dtype=torch.float64, device=device)

    def add_layer(name: str, a: torch.Tensor, s: torch.Tensor) -> None:
        ops = group.layers[name]
        a, s = a.to(_dtype(ops)), s.to(_dtype(ops))
        if ops.dense is not None:
            v = ops.dense.t().reshape(group.num_queries, s.shape[-1], a.shape[-1])
            out.add_(torch.einsum("bto,qoi,bti->btq", s, v, a).double())
        else:
            products = (s @ ops.left) * (a @ ops.right)  # [B, T, Q·r]
            out.add_(products.view(*products.shape[:2], group.num_queries, ops.rank).sum(-1).double())

    backward_through_layers(model, taps, batch, add_layer)
    return out


def credit_predicted_tokens(per_position: torch.Tensor) -> torch.Tensor:
    """[T, Q] contributions by input position -> by predicted token: row t + 1 gets position t's.

    Row 0 is zero (token 0 is predicted by nothing); the last position's term, which predicts no
    token (and is exactly zero in a causal model), is dropped.
    """
    credited = torch.zeros_like(per_position)
    credited[1:] = per_position[:-1]
    return credited


def segment_scores(credited: torch.Tensor, starts: Sequence[int]) -> torch.Tensor:
    """[S, Q] scores of the source documents packed into one training sequence: rows of ``credited``
    ([T, Q], by predicted token) summed over each document's tokens ``[starts[i], starts[i + 1])``
    (the first from 0, the last to T). The rows add up to the sequence's score, since its tokens do."""
    edges = sorted({0, *starts}) + [credited.shape[0]]
    return torch.stack([credited[lo:hi].sum(0) for lo, hi in zip(edges, edges[1:])])
