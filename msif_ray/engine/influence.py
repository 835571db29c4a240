"""The preconditioning chains and the preconditioned query vectors; the engine's Python API, usable without Ray.

    multi_stage(m, q)  = ⟨ α · (H_pt + λI)⁻¹ (H_ft + αI)⁻¹ G_q , G_m ⟩   G_q at θ_ft, G_m at θ_pt
    single_stage(m, q) = ⟨ (H + λI)⁻¹ G_q , G_m ⟩                        one model θ
    grad_dot(m, q)     = ⟨ G_q , G_m ⟩

G_q is the gradient of log p(completion | prompt), G_m of log p(document); both are per-layer
[out, in(+1)] matrices and ⟨·,·⟩ sums over layers, so scores split exactly by layer, and by token
(G_m = Σ_t s_t a_tᵀ, so token t contributes s_tᵀ Ṽ a_t). Positive = proponent.

Each chain works in the eigenbases of the EK-FAC factors (see ``Chain``): a query gradient is
rotated in once, divided by the damped eigenvalues (and, for multi_stage, rotated from the
fine-tuning into the pre-training eigenbasis once), and only the result's rank-r truncation is
rotated back out: Ṽ_q = (Q_S U Σ)(Q_A V)ᵀ, stored as two thin matrices (``LayerVectors``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from msif_ray.engine.curvature import Damping, Factors, LayerFactors
from msif_ray.engine.gradients import Batch, backward_through_layers, per_example_gradient
from msif_ray.engine.modules import LayerTaps
from msif_ray.engine.vectors import LayerVectors, QueryVectors

Method = Literal["multi_stage", "single_stage", "grad_dot"]
METHODS: tuple[str, ...] = ("multi_stage", "single_stage", "grad_dot")



def truncated_svd(m: torch.Tensor, rank: int, power_iterations: int = 3, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U [Q, out, r], σ [Q, r], V [Q, in, r] with U diag(σ) Vᵀ the best rank-r approximation of each m[q].

    Exact (LAPACK) when a sketch of 2r + 8 columns would cover the smaller side; otherwise a seeded
    randomized range finder with power iterations (Halko, Martinsson & Tropp 2011, alg. 4.4):
    O(out·in·r) instead of O(out·in·min(out, in)); its error is within 1% of the optimal rank-r
    error even on a flat spectrum (tests/pipeline/test_scale.py).
    """
    rank = min(rank, *m.shape[-2:])
    sketch = 2 * rank + 8
    if sketch >= min(m.shape[-2:]):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[..., :rank], s[..., :rank], vh[..., :rank, :].mT
    generator = torch.Generator(device=m.device).manual_seed(seed)
    omega = torch.randn(m.shape[-1], sketch, generator=generator, device=m.device, dtype=m.dtype)
    basis = torch.linalg.qr(m @ omega).Q  # [Q, out, 2r]
    for _ in range(power_iterations):
        basis = torch.linalg.qr(m @ torch.linalg.qr(m.mT @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.mT @ m, full_matrices=False)  # [Q, 2r, in]: small
    return (basis @ u)[..., :rank], s[..., :rank], vh[..., :rank, :].mT


# --------------------------------------------------------------------------- query gradients


@dataclass
class TokenGradient:
    """One layer's query gradients kept as their token factors: G_q = Σ_windows of q Σ_t s_t a_tᵀ.

    ``parts`` holds (a [W, T, in], s [W, T, out], query index [W]) per batch of windows. A query
    gradient has rank at most its token count, so rotating it costs T·(out² + in²), not
    out·in·(out + in), and nothing [out, in]-sized exists before the rotation.
    """

    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    num_queries: int

    def rotated(self, q_s: torch.Tensor | None, q_a: torch.Tensor | None) -> torch.Tensor:
        """Q_Sᵀ G_q Q_A for every query: [Q, out, in] (G_q itself when no basis is given)."""
        total = None
        for a, s, index in self.parts:
            dtype = torch.promote_types(a.dtype, q_a.dtype) if q_a is not None else a.dtype
            a, s = a.to(dtype), s.to(dtype)
            if q_a is not None:
                a, s = a @ q_a.to(dtype), s @ q_s.to(dtype)
            g = per_example_gradient(a, s)
            if total is None:
                total = g.new_zeros((self.num_queries,) + g.shape[1:])
            total.index_add_(0, index.to(g.device), g)
        return total


def token_factors(grad: TokenGradient) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's tokens stacked over its windows: S [Q, T, out], A [Q, T, in] with G_q = S_qᵀ A_q.

    T is the longest query's token count; shorter queries are padded with zero rows.
    """
    rows: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(grad.num_queries)]
    for a, s, index in grad.parts:
        for window, query in enumerate(index.tolist()):
            rows[query].append((s[window], a[window]))
    width = max(sum(s.shape[0] for s, _ in r) for r in rows)
    first_s, first_a = grad.parts[0][1], grad.parts[0][0]
    big_s = first_s.new_zeros(grad.num_queries, width, first_s.shape[-1])
    big_a = first_a.new_zeros(grad.num_queries, width, first_a.shape[-1])
    for query, r in enumerate(rows):
        s, a = torch.cat([x for x, _ in r]), torch.cat([y for _, y in r])
        big_s[query, : s.shape[0]], big_a[query, : a.shape[0]] = s, a
    return big_s, big_a


def low_rank_gradient(grad: TokenGradient, rank: int) -> LayerVectors:
    """G_q = S_qᵀ A_q truncated to rank r exactly, without forming G: QR of both token factors,
    then the SVD of a small T x T core (S_qᵀ = Q₁R₁, A_qᵀ = Q₂R₂, G_q = Q₁ (R₁R₂ᵀ) Q₂ᵀ)."""
    s, a = token_factors(grad)
    q1, r1 = torch.linalg.qr(s.mT)
    q2, r2 = torch.linalg.qr(a.mT)
    u, sigma, vh = torch.linalg.svd(r1 @ r2.mT)
    keep = min(rank, sigma.shape[-1])
    left = q1 @ (u[..., :keep] * sigma[:, None, :keep])
    right = q2 @ vh[..., :keep, :].mT
    pad = (0, rank - keep)  # every batch of queries has the same rank, so that batches concatenate
    return LayerVectors(left=F.pad(left, pad).contiguous(), right=F.pad(right, pad).contiguous(),
                        norm2=sigma.square().sum(-1))


def _rotate_dense(g: torch.Tensor, q_s: torch.Tensor | None, q_a: torch.Tensor | None) -> torch.Tensor:
    if q_a is None:
        return g
    dtype = torch.promote_types(g.dtype, q_a.dtype)
    return q_s.to(g.device, dtype).t() @ g.to(dtype) @ q_a.to(g.device, dtype)


LayerGradient = TokenGradient | torch.Tensor  # token factors, or dense [Q, out, in]


def _rotated(grad: LayerGradient, factors: LayerFactors | None) -> torch.Tensor:
    q_s, q_a = (factors.s_vectors, factors.a_vectors) if factors is not None else (None, None)
    if isinstance(grad, TokenGradient):
        return grad.rotated(q_s, q_a)
    return _rotate_dense(grad, q_s, q_a)


# --------------------------------------------------------------------------- the chains


@dataclass
class Chain:
    """A method's preconditioning chain, applied one layer at a time.

    ``pretrain`` and ``finetune`` give a layer's factors by name (a dict lookup, or a loader from
    storage so that only the layer in hand is in memory). In the eigenbasis of each factor, with
    M = Q_Sᵀ G Q_A:

        grad_dot:      Ṽ = G
        single_stage:  Ṽ = Q_S [ M_pt ⊘ (Λ_pt + λ) ] Q_Aᵀ
        multi_stage:   M' = (Q_S,ptᵀ Q_S,ft) [ M_ft ⊘ (Λ_ft + α) ] (Q_A,ftᵀ Q_A,pt)
                       Ṽ = α · Q_S,pt [ M' ⊘ (Λ_pt + λ) ] Q_A,ptᵀ
    """

    method: Method
    pretrain: Callable[[str], LayerFactors] | None = None
    finetune: Callable[[str], LayerFactors] | None = None
    damping_pretrain: Damping = "auto"
    damping_finetune: Damping = "auto"
    # (Q_S,ptᵀ Q_S,ft, Q_A,ftᵀ Q_A,pt) of a layer: out³ + in³ FLOPs each time, so workers cache them
    cross: Callable[[str], tuple[torch.Tensor, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.method != "grad_dot" and self.pretrain is None:
            raise ValueError(f"{self.method} needs pre-training factors")
        if self.method == "multi_stage" and self.finetune is None:
            raise ValueError("multi_stage needs fine-tuning factors")

    @classmethod
    def of(cls, method: Method, pretrain: Factors | None = None, finetune: Factors | None = None,
           damping_pretrain: Damping = "auto", damping_finetune: Damping = "auto") -> "Chain":
        """A chain over in-memory ``Factors``."""
        lookup = lambda f: None if f is None else f.layer  # noqa: E731
        return cls(method, lookup(pretrain), lookup(finetune), damping_pretrain, damping_finetune)

    def layer(self, name: str, grad: LayerGradient, rank: int | None = None) -> LayerVectors:
        """Ṽ_q of one layer for every query, truncated to ``rank`` (None: dense, full rank), with its
        full-rank ``norm2`` (``LayerVectors``): Σ U² (Λ_pt + λ) = Σ U·M for U = M ⊘ (Λ_pt + λ)."""
        if self.method == "grad_dot":
            if rank is not None and isinstance(grad, TokenGradient):
                return low_rank_gradient(grad, rank)
            g = _rotated(grad, None)
            return _output(g, None, rank, g.square().sum((1, 2)))
        pt = self.pretrain(name)
        if self.method == "single_stage":
            m = _rotated(grad, pt)
            u = m / _damped(pt, self.damping_pretrain, m)
            return _output(u, pt, rank, (u * m).sum((1, 2)))
        ft = self.finetune(name)
        m = _rotated(grad, ft)
        m = m / _damped(ft, self.damping_finetune, m)
        to_pt_s, to_pt_a = self.cross(name) if self.cross is not None else cross_rotations(pt, ft)
        m = ft.damping(self.damping_finetune) * (to_pt_s.to(m.device, m.dtype) @ m @ to_pt_a.to(m.device, m.dtype))
        u = m / _damped(pt, self.damping_pretrain, m)
        return _output(u, pt, rank, (u * m).sum((1, 2)))


def cross_rotations(pt: LayerFactors, ft: LayerFactors) -> tuple[torch.Tensor, torch.Tensor]:
    """From the fine-tuning eigenbasis to the pre-training one: (Q_S,ptᵀ Q_S,ft [out, out], Q_A,ftᵀ Q_A,pt [in, in])."""
    dtype = torch.promote_types(pt.s_vectors.dtype, ft.s_vectors.dtype)
    return pt.s_vectors.to(dtype).t() @ ft.s_vectors.to(dtype), ft.a_vectors.to(dtype).t() @ pt.a_vectors.to(dtype)


def _damped(factors: LayerFactors, damping: Damping, like: torch.Tensor) -> torch.Tensor:
    return factors.lambdas.to(like.device, like.dtype) + factors.damping(damping)


def _output(m: torch.Tensor, basis: LayerFactors | None, rank: int | None, norm2: torch.Tensor) -> LayerVectors:
    """Rotate M [Q, out, in] back out of ``basis``: densely, or only its rank-r truncation."""
    q_s, q_a = ((basis.s_vectors.to(m.device, m.dtype), basis.a_vectors.to(m.device, m.dtype))
                if basis is not None else (None, None))
    if rank is None:
        return LayerVectors(dense=q_s @ m @ q_a.t() if basis is not None else m, norm2=norm2)
    u, sigma, v = truncated_svd(m, rank)
    left, right = u * sigma[:, None, :], v
    if basis is not None:
        left, right = q_s @ left, q_a @ right
    return LayerVectors(left=left.contiguous(), right=right.contiguous(), norm2=norm2)


def precondition(
    query_grads: dict[str, torch.Tensor],
    method: Method,
    pretrain_factors: Factors | None = None,
    finetune_factors: Factors | None = None,
    damping_pretrain: Damping = "auto",
    damping_finetune: Damping = "auto",
) -> dict[str, torch.Tensor]:
    """Dense Ṽ_q per layer, [Q, out, in(+1)], from dense query gradients (the reference form).

    ``pretrain_factors`` are H (θ_pt on the corpus, or the one model's for single_stage);
    ``finetune_factors`` are H_ft (θ_ft on the fine-tuning data), used by multi_stage only.
    """
    if method == "grad_dot":
        return dict(query_grads)
    chain = Chain.of(method, pretrain_factors, finetune_factors, damping_pretrain, damping_finetune)
    return {name: chain.layer(name, g).dense for name, g in query_grads.items()}


def precondition_queries(
    model: nn.Module, taps: LayerTaps, batches: Iterable[Batch], num_queries: int, chain: Chain, rank: int | None,
    ids: Sequence[str] | None = None,
) -> QueryVectors:
    """The per-pass function of the query stage: one forward+backward per batch of query windows,
    keeping each layer's token factors (a, s), then the chain layer by layer.

    Memory: the token factors of the batch (Σ_layers T·(in + out) per window) plus one layer's
    [Q, out, in] working set at a time.
    """
    captured: dict[str, list] = {name: [] for name in taps.modules}
    for batch in batches:
        def keep(name: str, a: torch.Tensor, s: torch.Tensor, index: torch.Tensor = batch.examples) -> None:
            captured[name].append((a, s, index))

        backward_through_layers(model, taps, batch, keep)
    vectors = QueryVectors(list(ids) if ids is not None else [str(i) for i in range(num_queries)])
    for name in taps.modules:
        layer = chain.layer(name, TokenGradient(captured.pop(name), num_queries), rank)
        for tensor in layer.tensors().values():
            if not torch.isfinite(tensor).all():
                raise FloatingPointError(f"non-finite preconditioned query gradient in layer {name!r}: "
                                         "check the model weights and the factors")
        vectors.layers[name] = layer
    return vectors

