"""The corpus gradient index: every document's gradient at θ_pt, whitened and projected to k x k per layer.

For one tracked layer with gradient G_m = Σ_t s_t a_tᵀ [out, in] (``gradients.per_example_gradient``)
and a preconditioned query Ṽ_q = L Rᵀ (rank r), the index stores and the scan multiplies

    Ĝ_m = (P_out M) G_m (P_in N)ᵀ     = Σ_t (P_out M s_t)(P_in N a_t)ᵀ           [k, k]
    V̂_q = (P_out M⁻ᵀ) Ṽ_q (P_in N⁻ᵀ)ᵀ = (P_out M⁻ᵀ L)(P_in N⁻ᵀ R)ᵀ

with P_out [k, out], P_in [k, in] of i.i.d. N(0, 1/k) entries drawn from (index seed, layer name),
and M, N any invertible matrices. Since E[PᵀP] = I, P_out and P_in independent,

    E ⟨V̂_q, Ĝ_m⟩_F = ⟨M⁻ᵀ Ṽ_q N⁻¹, M G_m Nᵀ⟩_F = ⟨Ṽ_q, G_m⟩_F          (unbiased, for any M, N)

M and N only set the variance, which is of order ‖M⁻ᵀṼN⁻¹‖‖MGNᵀ‖ / k per layer. A preconditioned
query lives where the curvature is small and a document gradient where it is large, so without
whitening (M = N = I) their inner product is a tiny fraction of ‖Ṽ‖‖G‖ and drowns in that noise.
With the pre-training factors, M = (D_S)^(-1/2) Q_Sᵀ and N = (D_A)^(-1/2) Q_Aᵀ, where D_S, D_A are
the two sides of a rank-one fit of the EK-FAC eigenvalues Λ ≈ d_S d_Aᵀ (damped): both sides are
whitened halfway, and the estimate's noise is measured against ‖H^(-1/2) U_q‖ ‖H^(-1/2) G_m‖ instead.
The index then depends on the pre-training factors (one index per base model and its factors).

Cost on top of the backward pass: T·k·(out + in) + T·k² per layer and window; G is never formed.
Scoring new queries is one matrix product over the index, [N, D] x [D, Q] with D = Σ_layers k²,
and only the best candidates are re-scored exactly (``pipeline``).

Storage: a document's row is kept in float16 per layer block, divided by the block's largest
magnitude (kept as a float32 ``scale`` [N, L]): float16's 11-bit mantissa with no overflow or
underflow whatever the gradients' magnitude. The projections, 4·k·(out + in) numbers per layer,
are stored with the index (``layout.index_projection``): the whitening depends on the factors, and
an index must keep its own when the factors are fitted again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from msif_ray.engine.curvature import AUTO_DAMPING_SCALE, LayerFactors
from msif_ray.engine.gradients import Batch, backward_through_layers, model_device
from msif_ray.engine.vectors import QueryVectors
from msif_ray.engine.modules import LayerSpec, LayerTaps

ROWS_PER_BLOCK = 1 << 14  # index rows dequantised at once when scanning: 16k x D floats


@dataclass(frozen=True)
class Projection:
    """One layer's index-side maps P_out M [k_out, out], P_in N [k_in, in], and query-side maps
    P_out M⁻ᵀ, P_in N⁻ᵀ (the same when there is no whitening)."""

    out: torch.Tensor
    inp: torch.Tensor
    query_out: torch.Tensor
    query_inp: torch.Tensor

    @classmethod
    def plain(cls, out: torch.Tensor, inp: torch.Tensor) -> "Projection":
        return cls(out, inp, out, inp)

    @property
    def size(self) -> int:
        return self.out.shape[0] * self.inp.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Its four matrices, as copies (a plain projection's two sides are the same tensors)."""
        return {name: t.clone() for name, t in (("out", self.out), ("inp", self.inp), ("query_out", self.query_out),
                                                 ("query_inp", self.query_inp))}

    def to(self, device: torch.device | str) -> "Projection":
        return Projection(*(t.to(device) for t in (self.out, self.inp, self.query_out, self.query_inp)))


def layer_seed(seed: int, layer: str, side: str) -> int:
    """A stable 63-bit seed for one side of one layer's projection."""
    return int.from_bytes(hashlib.sha256(f"index:{seed}:{layer}:{side}".encode()).digest()[:8], "little") >> 1


def whitening(factors: LayerFactors) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(M, M⁻ᵀ) and (N, N⁻ᵀ) of one layer from its pre-training factors, in float64.

    Λ [out, in] is fitted by d_S d_Aᵀ (row and column means, scaled so that their product has Λ's
    mean), each side damped by 0.1 x its mean, as ``auto`` damps Λ; then M = D_S^(-1/2) Q_Sᵀ and
    N = D_A^(-1/2) Q_Aᵀ, so M⁻ᵀ = D_S^(1/2) Q_Sᵀ and N⁻ᵀ = D_A^(1/2) Q_Aᵀ (Q orthogonal).
    """
    lam = factors.lambdas.double().clamp_min(0)
    mean = float(lam.mean()) or 1.0
    sides = []
    for q, d in ((factors.s_vectors, lam.mean(1) / mean ** 0.5), (factors.a_vectors, lam.mean(0) / mean ** 0.5)):
        d = d + AUTO_DAMPING_SCALE * float(d.mean()) + 1e-30
        qt = q.double().t()
        sides.append((d.rsqrt()[:, None] * qt, d.sqrt()[:, None] * qt))
    return sides[0], sides[1]


def random_projections(layers: list[LayerSpec], dim: int, seed: int, device: torch.device | str = "cpu",
                       factors: Callable[[str], LayerFactors] | None = None) -> dict[str, Projection]:
    """Gaussian projections with entries of variance 1/dim, the same on every machine for (seed, layer),
    whitened by the pre-training ``factors`` of each layer when given (``whitening``)."""

    def draw(layer: str, side: str, width: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(layer_seed(seed, layer, side))
        return torch.randn(dim, width, generator=generator) / dim ** 0.5

    projections = {}
    for spec in layers:
        p_out, p_in = draw(spec.name, "out", spec.out_features), draw(spec.name, "in", spec.in_dim)
        if factors is None:
            projection = Projection.plain(p_out, p_in)
        else:
            (m, m_inv_t), (n, n_inv_t) = whitening(factors(spec.name))
            p_out, p_in = p_out.double(), p_in.double()
            projection = Projection(*(t.float() for t in (p_out @ m, p_in @ n, p_out @ m_inv_t, p_in @ n_inv_t)))
        projections[spec.name] = projection.to(device)
    return projections


def index_width(projections: dict[str, Projection]) -> int:
    """D: the numbers per document, Σ_layers k_out·k_in."""
    return sum(p.size for p in projections.values())


def project_windows(model: nn.Module, taps: LayerTaps, batch: Batch,
                    projections: dict[str, Projection]) -> torch.Tensor:
    """Projected gradients of each window: [B, D] in the projections' dtype, layers in ``taps`` order, each block
    the row-major flattening of P_out G P_inᵀ."""
    names = list(taps.modules)
    blocks: dict[str, torch.Tensor] = {}

    def add_layer(name: str, a: torch.Tensor, s: torch.Tensor) -> None:
        p = projections[name]
        s_k = s.to(p.out.dtype) @ p.out.t()  # [B, T, k_out]
        a_k = a.to(p.inp.dtype) @ p.inp.t()  # [B, T, k_in]
        blocks[name] = torch.bmm(s_k.transpose(1, 2), a_k).flatten(1)

    backward_through_layers(model, taps, batch, add_layer)
    return torch.cat([blocks[name] for name in names], dim=1)


def project_queries(vectors: QueryVectors, projections: dict[str, Projection], layers: list[str]) -> torch.Tensor:
    """V̂_q of every query and layer, flattened like the index rows: [Q, D] in the projections' dtype.

    Low-rank vectors cost Q·r·k·(out + in): (P_out L)(P_in R)ᵀ, Ṽ_q never formed.
    """
    blocks = []
    for name in layers:
        v, p = vectors.layers[name], projections[name]
        out, inp = p.query_out, p.query_inp
        if v.is_low_rank:
            left = out @ v.left.to(out.device, out.dtype)  # [Q, k_out, r]
            right = inp @ v.right.to(out.device, out.dtype)  # [Q, k_in, r]
            blocks.append((left @ right.mT).flatten(1))
        else:
            blocks.append((out @ v.dense.to(out.device, out.dtype) @ inp.t()).flatten(1))
    return torch.cat(blocks, dim=1)


def layer_sizes(projections: dict[str, Projection], layers: list[str]) -> list[int]:
    return [projections[name].size for name in layers]


def quantize(rows: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, D] float -> float16 rows with each layer block divided by its largest magnitude, and
    those magnitudes as ``scale`` [N, L] float32 (a zero block keeps scale 1)."""
    blocks = rows.float().split(sizes, dim=1)
    scale = torch.stack([b.abs().amax(dim=1) for b in blocks], dim=1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = torch.cat([b / scale[:, i : i + 1] for i, b in enumerate(blocks)], dim=1)
    return scaled.to(torch.float16), scale


def dequantize(rows: torch.Tensor, scale: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The inverse of ``quantize``: [N, D] float32."""
    expanded = torch.repeat_interleave(scale, torch.tensor(sizes, device=scale.device), dim=1)
    return rows.float() * expanded


def scan(rows: torch.Tensor, scale: torch.Tensor, sizes: list[int], queries: torch.Tensor) -> torch.Tensor:
    """Estimated scores of every indexed document against every projected query: [N, Q] float64.

    Rows are dequantised ``ROWS_PER_BLOCK`` at a time, so memory is one block plus the result.
    """
    queries = queries.to(rows.device, torch.float32)
    out = torch.empty(rows.shape[0], queries.shape[0], dtype=torch.float64)
    for lo in range(0, rows.shape[0], ROWS_PER_BLOCK):
        hi = min(lo + ROWS_PER_BLOCK, rows.shape[0])
        out[lo:hi] = (dequantize(rows[lo:hi], scale[lo:hi], sizes) @ queries.t()).double().cpu()
    return out


def document_rows(model: nn.Module, taps: LayerTaps, batches: list[Batch], num_documents: int,
                  projections: dict[str, Projection]) -> torch.Tensor:
    """Projected gradients of whole documents (their windows summed): [N, D] on the model's device."""
    dtype = next(iter(projections.values())).out.dtype
    total = torch.zeros(num_documents, index_width(projections), device=model_device(model), dtype=dtype)
    for batch in batches:
        total.index_add_(0, batch.examples.to(total.device), project_windows(model, taps, batch, projections))
    return total
