"""Agreement with exact multi-stage influence on a tiny GPT-NeoX (the paper's first experiment).

    python benchmarks/bench_exact_influence.py [--seeds 0 1 2] [--hidden 32] [--smoke]

The model is the toy world's (``msif_ray.demo.toy``), shrunk so that the Fisher over ALL tracked
parameters can be handled exactly in float64: pre-trained on ~500 documents, then fully
fine-tuned on question/answer pairs; ~10 queries about held-out people.

Ground truth (no Kronecker factoring, no block-diagonal truncation). With J [N, P] the per-example
gradients of log p over every tracked parameter (θ_pt on the corpus; θ_ft on the fine-tuning
pairs), the empirical Fisher is F = JᵀJ / N and

    exact(m, q) = α · g_qᵀ (F_ft + αI)⁻¹ (F_pt + λI)⁻¹ g_m,   g_q at θ_ft, g_m at θ_pt

by the Woodbury identity (F + λI)⁻¹v = (v − Jᵀ(NλI + JJᵀ)⁻¹Jv)/λ in float64 (an N x N solve
instead of P x P), cross-checked by conjugate gradient on v ↦ Jᵀ(Jv)/N + λv. Dampings are
relative to the mean eigenvalue: λ = m · tr(F_pt)/P, α = m · tr(F_ft)/P, m swept over
0.001..10 (0.1 is the engine's ``auto``: curvature.AUTO_DAMPING_SCALE).

Compared (empirical Fisher everywhere, like the ground truth; float64 models), per query over the
corpus, Pearson and Spearman, averaged over queries:

  exact block-diag  the same solve per layer (what block-diagonal truncation alone costs)
  multi_stage       msif's EK-FAC chain, per-layer dampings m x mean(Λ) (the engine's auto at m = 0.1)
  multi_stage/KFAC  the same with Λ replaced by d_S ⊗ d_A (the eigenvalues of S and A) x tokens/window
  multi_stage/global λ  EK-FAC with the exact's global λ and α (floats) instead of per-layer ones
  single_stage      EK-FAC at θ_ft, H fitted on the corpus at θ_ft (the pipeline's single_stage)
  grad_dot          g_q · g_m at θ_ft;  grad_dot θ_pt: g_q(θ_ft) · g_m(θ_pt) (the chain without inverses)
  kronfluence       kronfluence 1.0.1 single-stage EK-FAC at θ_ft (its defaults: sampled Fisher,
                    damping None = 0.1 x mean Λ per layer; sweep: one λ = m x mean Λ over layers)

The damping matrix (EK-FAC and K-FAC multi_stage at m_approx vs exact at m_exact) is what the
choice of the ``auto`` multiplier rests on.

Positive controls (where EK-FAC should be right, so that a bug in the correction would show):

  linear layer  one Linear regression layer per stage, each fitted to convergence (least squares),
                N = 20,000 ≫ P = 28, noise that grows with one input direction: the Fisher is
                diagonal in the Kronecker eigenbasis but not Kronecker. EK-FAC (the engine's own
                covariance, eigh, Λ and chain) vs the dense solve, K-FAC beside it.
  2-layer LM    the toy world at width 8 (CONTROL): 2,980 documents ≫ 288, the largest block;
                EK-FAC and K-FAC vs the exact block-diagonal answer (what they approximate).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from common import (flat, fmt, inverse, load_world, mean_spread, multi_stage_chain, new_figure, pearson, print_table,
                    result_paths, save_figure, setup, spearman, write_json)
from kf import PaddedTexts, kronfluence_single_stage
from msif_ray.engine.curvature import (AUTO_DAMPING_SCALE, CovarianceSums, Factors, LambdaSums, LayerFactors, accumulate_covariances,
                                       accumulate_lambdas, eigendecompose_layer, finish_factors, rotated_square_sum)
from msif_ray.engine.gradients import per_example_gradient
from msif_ray.engine.api import Examples, TrackedLM
from msif_ray.engine.influence import precondition
from msif_ray.demo.toy import ToySpec

FULL = ToySpec(num_entities=50, num_query_entities=5, paraphrases_per_fact=4, num_filler_docs=100,
               hidden_size=32, num_heads=2, pretrain_steps=400, finetune_steps=120)
SMOKE = replace(FULL, num_entities=12, num_query_entities=2, paraphrases_per_fact=2, num_filler_docs=10,
                hidden_size=16, pretrain_steps=40, finetune_steps=10)
# The LM positive control: N ≫ each block's dimension (2,980 documents; blocks of at most 4·8·9 = 288).
CONTROL = replace(FULL, num_entities=360, hidden_size=8, pretrain_steps=1600)
CONTROL_SMOKE = replace(SMOKE, num_entities=40, hidden_size=4, pretrain_steps=40)
SCALES = [0.001, 0.01, 0.1, 1.0, 10.0]


# --------------------------------------------------------------------------- exact solves


def woodbury_inverse(j: torch.Tensor, damping: float, v: torch.Tensor) -> torch.Tensor:
    """(JᵀJ/N + λI)⁻¹ vᵀ for v [Q, P], J [N, P], float64: returns [Q, P]."""
    n = j.shape[0]
    kernel = j @ j.t() + n * damping * torch.eye(n, dtype=j.dtype)
    inner = torch.linalg.solve(kernel, j @ v.t())  # [N, Q]
    return (v - (j.t() @ inner).t()) / damping


def conjugate_gradient(j: torch.Tensor, damping: float, v: torch.Tensor, tol: float = 1e-12, max_iter: int = 5000) -> tuple[torch.Tensor, int]:
    """The same solve by CG on each row of v (batched, float64); returns x and the iterations used."""
    n = j.shape[0]
    apply = lambda x: (x @ j.t()) @ j / n + damping * x
    x = torch.zeros_like(v)
    r = v.clone()
    p = r.clone()
    rs = (r * r).sum(1, keepdim=True)
    target = tol * (v * v).sum(1, keepdim=True)
    for it in range(1, max_iter + 1):
        ap = apply(p)
        step = rs / (p * ap).sum(1, keepdim=True)
        x += step * p
        r -= step * ap
        new = (r * r).sum(1, keepdim=True)
        if bool((new <= target).all()):
            return x, it
        p = r + (new / rs) * p
        rs = new
    return x, max_iter


def mean_eigenvalue(j: torch.Tensor) -> float:
    """tr(JᵀJ/N) / P."""
    return float(j.square().sum()) / (j.shape[0] * j.shape[1])


def block_diagonal_per_layer(j_pt, j_ft, g_q, scale: float, blocks: list[slice]) -> torch.Tensor:
    """The block-diagonal chain with the engine's per-layer dampings λ_l = m · tr(F_l)/P_l (= m · mean Λ_l)."""
    out = []
    for b in blocks:
        lam, alpha = scale * mean_eigenvalue(j_pt[:, b]), scale * mean_eigenvalue(j_ft[:, b])
        out.append(alpha * woodbury_inverse(j_pt[:, b], lam, woodbury_inverse(j_ft[:, b], alpha, g_q[:, b])))
    return torch.cat(out, dim=1)


def exact_multi_stage(j_pt, j_ft, g_q, scale: float, blocks: list[slice] | None = None) -> torch.Tensor:
    """α · (F_pt+λ)⁻¹ (F_ft+α)⁻¹ g_q [Q, P]; with ``blocks``, F restricted to its diagonal blocks (same λ, α)."""
    lam, alpha = scale * mean_eigenvalue(j_pt), scale * mean_eigenvalue(j_ft)
    if blocks is None:
        return alpha * woodbury_inverse(j_pt, lam, woodbury_inverse(j_ft, alpha, g_q))
    return torch.cat([alpha * woodbury_inverse(j_pt[:, b], lam, woodbury_inverse(j_ft[:, b], alpha, g_q[:, b]))
                      for b in blocks], dim=1)


# --------------------------------------------------------------------------- EK-FAC and K-FAC factors


def ekfac_and_kfac(lm: TrackedLM, examples: Examples) -> tuple[Factors, Factors]:
    """The engine's EK-FAC factors (empirical Fisher) and K-FAC factors on the same eigenbases.

    K-FAC's eigenvalues are d_S ⊗ d_A (eigenvalues of the token-normalised S and A) times the mean
    number of tokens per window, so that they approximate E[vec G vec Gᵀ] per window like Λ.
    """
    batches = lm.batches(examples)
    cov = accumulate_covariances(lm.model, lm.taps, batches, "empirical")
    bases = {n: eigendecompose_layer(n, cov) for n in lm.layers}
    ekfac = finish_factors(bases, accumulate_lambdas(lm.model, lm.taps, batches, bases, "empirical"), {})
    per_window = cov.num_tokens / cov.num_windows
    kfac = Factors({n: LayerFactors(b.a_vectors, b.s_vectors, per_window * torch.outer(b.s_values, b.a_values).clamp_min(0))
                    for n, b in bases.items()})
    return ekfac, kfac


def layer_slices(grads: dict[str, torch.Tensor], layers: list[str]) -> list[slice]:
    out, start = [], 0
    for n in layers:
        size = grads[n][0].numel()
        out.append(slice(start, start + size))
        start += size
    return out


# --------------------------------------------------------------------------- positive control


def heteroscedastic_task(n: int, rotation: torch.Tensor, scales: torch.Tensor, teacher: torch.Tensor, mixing: torch.Tensor,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear regression data, float64: x = R·diag(scales)·z with z ~ N(0, I), y = T x + σ(z)·M ε.

    The noise σ = 0.1 + z_1² grows with one latent direction, so the residual s (the output
    gradient) depends on the input a: K-FAC's E[s sᵀ] ⊗ E[a aᵀ] is off by up to ~5x along that
    direction. The Fisher stays diagonal in the Kronecker eigenbasis (z's coordinates are
    independent and symmetric), which is EK-FAC's one assumption.
    """
    z = torch.randn(n, len(scales), generator=generator, dtype=torch.float64)
    x = (z * scales) @ rotation.t()
    sigma = 0.1 + z[:, :1].square()
    noise = torch.randn(n, mixing.shape[1], generator=generator, dtype=torch.float64) @ mixing.t()
    return x, x @ teacher.t() + sigma * noise


def regression_gradients(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's (a, s) per example: a = [x, 1] [N, 1, in], s = ∂ log N(y; W a, I)/∂(W a) = y − W a [N, 1, out]."""
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    return a[:, None], (y - a @ weight.t())[:, None]


def least_squares(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The converged model: W [out, in] minimising Σ ||y − W [x, 1]||²."""
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    return torch.linalg.lstsq(a, y).solution.t()


def fitted_factors(a: torch.Tensor, s: torch.Tensor) -> tuple[Factors, Factors]:
    """EK-FAC by the engine's own passes on one layer ("layer"), and K-FAC on the same eigenbasis (Λ = d_S ⊗ d_A)."""
    cov = CovarianceSums()
    cov.add_layer("layer", a, s)
    cov.num_tokens = cov.num_windows = len(a)
    basis = eigendecompose_layer("layer", cov)
    lambdas = LambdaSums({"layer": rotated_square_sum(a, s, basis.a_vectors, basis.s_vectors)}, len(a))
    kfac = LayerFactors(basis.a_vectors, basis.s_vectors, torch.outer(basis.s_values, basis.a_values).clamp_min(0))
    return finish_factors({"layer": basis}, lambdas, {}), Factors({"layer": kfac})


def dense_fisher(f: LayerFactors) -> torch.Tensor:
    """(Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ [P, P]: one layer's approximate Fisher as one matrix."""
    q = torch.kron(f.s_vectors.double(), f.a_vectors.double())
    return q @ torch.diag(f.lambdas.double().flatten()) @ q.t()


def fisher_error(approx: LayerFactors, j: torch.Tensor) -> float:
    """||F̂ − F||_F / ||F||_F against the empirical Fisher F = JᵀJ/N of per-example gradients J [N, P]."""
    fisher = j.t() @ j / len(j)
    return float((dense_fisher(approx) - fisher).norm() / fisher.norm())


def linear_control(num_examples: int = 20_000, dim: int = 6, outputs: int = 4, num_queries: int = 40,
                   num_documents: int = 2_000, seed: int = 0) -> dict:
    """The positive control: one linear layer, each stage fitted to convergence with N ≫ P.

    Pre-training: a regression task fitted by least squares on N examples. Fine-tuning: another
    teacher on inputs with another covariance, fitted the same way (θ_ft). The exact Fisher of each
    stage is JᵀJ/N over the per-example gradients J [N, P] (empirical Fisher, as the engine fits it
    here), P = outputs·(dim + 1). Queries are held-out fine-tuning examples at θ_ft, documents
    pre-training examples at θ_pt. Per damping multiplier m (λ = m·tr(F)/P, which is m·mean Λ, so
    m = 0.1 is the engine's ``auto`` on both sides), Pearson over documents per query, averaged,
    of the engine's EK-FAC chain and of K-FAC (same eigenbasis, Λ = d_S ⊗ d_A) against the dense
    solve; and each factorisation's relative Frobenius error of the Fisher.
    """
    g = torch.Generator().manual_seed(seed)

    def task(scale_range: tuple[float, float]):
        rotation = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
        scales = torch.linspace(*scale_range, dim, dtype=torch.float64)
        teacher = torch.randn(outputs, dim, generator=g, dtype=torch.float64)
        mixing = torch.linalg.qr(torch.randn(outputs, outputs, generator=g, dtype=torch.float64))[0] * torch.linspace(0.5, 1.5, outputs)
        return lambda n: heteroscedastic_task(n, rotation, scales, teacher, mixing, g)

    pretrain_task, finetune_task = task((0.5, 2.0)), task((0.3, 1.5))
    x_pt, y_pt = pretrain_task(num_examples)
    x_ft, y_ft = finetune_task(num_examples)
    w_pt, w_ft = least_squares(x_pt, y_pt), least_squares(x_ft, y_ft)
    a_pt, s_pt = regression_gradients(x_pt, y_pt, w_pt)
    a_ft, s_ft = regression_gradients(x_ft, y_ft, w_ft)
    a_q, s_q = regression_gradients(*finetune_task(num_queries), w_ft)
    ek_pt, kf_pt = fitted_factors(a_pt, s_pt)
    ek_ft, kf_ft = fitted_factors(a_ft, s_ft)

    j_pt = per_example_gradient(a_pt, s_pt).flatten(1)            # [N, P]
    j_ft = per_example_gradient(a_ft, s_ft).flatten(1)
    g_q = per_example_gradient(a_q, s_q)                           # [Q, out, in]
    docs = j_pt[:num_documents]
    fisher_pt, fisher_ft = j_pt.t() @ j_pt / num_examples, j_ft.t() @ j_ft / num_examples
    eye = torch.eye(len(fisher_pt), dtype=torch.float64)

    def corr(vectors: dict[str, torch.Tensor], reference: torch.Tensor) -> float:
        return float(pearson(docs @ vectors["layer"].flatten(1).t(), docs @ reference.t()).mean())

    out: dict = {"num_examples": num_examples, "num_parameters": int(j_pt.shape[1]), "num_queries": num_queries,
                 "num_documents": num_documents, "seed": seed,
                 "fisher_relative_error": {stage: {kind: fisher_error(f.layers["layer"], j) for kind, f in (("EK-FAC", ek), ("K-FAC", kf))}
                                           for stage, ek, kf, j in (("pre-training", ek_pt, kf_pt, j_pt),
                                                                    ("fine-tuning", ek_ft, kf_ft, j_ft))},
                 "single_stage": {}, "multi_stage": {}}
    for m in SCALES:
        lam, alpha = m * float(fisher_pt.trace()) / len(eye), m * float(fisher_ft.trace()) / len(eye)
        after_pt = torch.linalg.solve(fisher_pt + lam * eye, g_q.flatten(1).t()).t()
        after_both = alpha * torch.linalg.solve(fisher_pt + lam * eye, torch.linalg.solve(fisher_ft + alpha * eye, g_q.flatten(1).t())).t()
        out["single_stage"][str(m)] = {kind: corr(precondition({"layer": g_q}, "single_stage", pt, damping_pretrain=lam), after_pt)
                                       for kind, pt in (("EK-FAC", ek_pt), ("K-FAC", kf_pt))}
        out["multi_stage"][str(m)] = {kind: corr(precondition({"layer": g_q}, "multi_stage", pt, ft, lam, alpha), after_both)
                                      for kind, pt, ft in (("EK-FAC", ek_pt, ek_ft), ("K-FAC", kf_pt, kf_ft))}
    return out


def float64_world(spec: ToySpec, seed: int, log) -> tuple:
    """A toy world in float64: (the loaded world, θ_pt and θ_ft as TrackedLMs, its documents,
    fine-tuning pairs and queries as Examples)."""
    lw = load_world(spec, seed, dtype=torch.float64, log=log)
    tracked = lambda model: TrackedLM(model, lw.tokenizer, max_length=128, batch_size=32)  # noqa: E731
    return (lw, tracked(lw.pretrained), tracked(lw.finetuned), Examples.documents(lw.texts),
            Examples.pairs([p for p, _ in lw.finetune], [c for _, c in lw.finetune]),
            Examples.pairs([q["prompt"] for q in lw.queries], [q["completion"] for q in lw.queries]))


def lm_control(spec: ToySpec, seed: int, log) -> dict:
    """The positive control on the 2-layer LM: N ≫ each block's dimension (``CONTROL``), against the
    exact block-diagonal answer with the engine's per-layer dampings, which is what EK-FAC
    approximates inside each block. Same Pearson per query over documents as ``linear_control``."""
    _, pt, ft, docs, pairs, qx = float64_world(spec, seed, log)
    layers = pt.layers
    g_q_layers = ft.gradients(qx)
    j_pt, j_ft = flat(pt.gradients(docs), layers), flat(ft.gradients(pairs), layers)
    blocks = layer_slices(g_q_layers, layers)
    g_q = flat(g_q_layers, layers)
    ek_pt, kf_pt = ekfac_and_kfac(pt, docs)
    ek_ft, kf_ft = ekfac_and_kfac(ft, pairs)

    def corr(v: dict[str, torch.Tensor], reference: torch.Tensor) -> float:
        return float(pearson(j_pt @ flat(v, layers).t(), j_pt @ reference.t()).mean())

    out = {"num_documents": j_pt.shape[0], "num_finetune_pairs": j_ft.shape[0], "num_queries": g_q.shape[0],
           "largest_block": max(b.stop - b.start for b in blocks), "num_parameters": j_pt.shape[1],
           "fisher_relative_error": {stage: {kind: sum(fisher_error(f.layers[n], j[:, b]) for n, b in zip(layers, blocks)) / len(blocks)
                                             for kind, f in (("EK-FAC", ek), ("K-FAC", kf))}
                                     for stage, ek, kf, j in (("pre-training", ek_pt, kf_pt, j_pt), ("fine-tuning", ek_ft, kf_ft, j_ft))},
           "single_stage": {}, "multi_stage": {}}
    for m in SCALES:
        single = torch.cat([woodbury_inverse(j_pt[:, b], m * mean_eigenvalue(j_pt[:, b]), g_q[:, b]) for b in blocks], dim=1)
        out["single_stage"][str(m)] = {kind: corr(inverse(f, g_q_layers, f"{m}x"), single)
                                       for kind, f in (("EK-FAC", ek_pt), ("K-FAC", kf_pt))}
        multi = block_diagonal_per_layer(j_pt, j_ft, g_q, m, blocks)
        out["multi_stage"][str(m)] = {kind: corr(multi_stage_chain(g_q_layers, p, f, f"{m}x", f"{m}x"), multi)
                                      for kind, p, f in (("EK-FAC", ek_pt, ek_ft), ("K-FAC", kf_pt, kf_ft))}
    log(f"LM control seed {seed}: {out['num_documents']} documents, blocks up to {out['largest_block']} parameters; "
        f"at auto, single_stage {out['single_stage'][str(AUTO_DAMPING_SCALE)]}, multi_stage {out['multi_stage'][str(AUTO_DAMPING_SCALE)]}, "
        f"Fisher error per block (mean) {out['fisher_relative_error']}")
    return out


# --------------------------------------------------------------------------- one seed


def run_seed(spec: ToySpec, seed: int, log, workdir: Path) -> dict:
    t0 = time.process_time()
    lw, pt, ft, docs, pairs, qx = float64_world(spec, seed, log)
    layers = pt.layers

    g_q_layers = ft.gradients(qx)
    g_q = flat(g_q_layers, layers)
    j_pt = flat(pt.gradients(docs), layers)            # [N, P] at θ_pt
    j_ft = flat(ft.gradients(pairs), layers)           # [N_ft, P] at θ_ft
    j_ftc = flat(ft.gradients(docs), layers)           # corpus at θ_ft (single_stage, grad_dot)
    blocks = layer_slices(g_q_layers, layers)
    num_params = j_pt.shape[1]
    log(f"seed {seed}: {num_params} tracked parameters, J_pt {tuple(j_pt.shape)}, J_ft {tuple(j_ft.shape)}")

    exact = {m: j_pt @ exact_multi_stage(j_pt, j_ft, g_q, m).t() for m in SCALES}
    block = {m: j_pt @ exact_multi_stage(j_pt, j_ft, g_q, m, blocks).t() for m in SCALES}
    block_per_layer = {m: j_pt @ block_diagonal_per_layer(j_pt, j_ft, g_q, m, blocks).t() for m in SCALES}
    # One stage at a time, exact: (F_pt + λ)⁻¹ alone and α(F_ft + α)⁻¹ alone, scored against g_m(θ_pt).
    exact_pt_only = {m: j_pt @ woodbury_inverse(j_pt, m * mean_eigenvalue(j_pt), g_q).t() for m in SCALES}
    exact_ft_only = {m: j_pt @ (m * mean_eigenvalue(j_ft) * woodbury_inverse(j_ft, m * mean_eigenvalue(j_ft), g_q)).t()
                     for m in SCALES}

    # Cross-check of the ground truth by conjugate gradient at the auto multiplier.
    m = AUTO_DAMPING_SCALE
    lam, alpha = m * mean_eigenvalue(j_pt), m * mean_eigenvalue(j_ft)
    after_ft, it_ft = conjugate_gradient(j_ft, alpha, g_q)
    after_pt, it_pt = conjugate_gradient(j_pt, lam, after_ft)
    cg_scores = j_pt @ (alpha * after_pt).t()
    cg = {"scale": m, "iterations": [it_ft, it_pt],
          "relative_difference": float((cg_scores - exact[m]).norm() / exact[m].norm()),
          "min_pearson": float(pearson(cg_scores, exact[m]).min())}
    log(f"seed {seed}: CG vs Woodbury at m={m}: relative difference {cg['relative_difference']:.2e} "
        f"({it_ft} + {it_pt} iterations)")

    ek_pt, kf_pt = ekfac_and_kfac(pt, docs)
    ek_ft, kf_ft = ekfac_and_kfac(ft, pairs)
    ek_c, _ = ekfac_and_kfac(ft, docs)

    def scored(j, v):
        return j @ flat(v, layers).t()

    approx: dict[str, dict[float, torch.Tensor]] = {
        "multi_stage": {s: scored(j_pt, multi_stage_chain(g_q_layers, ek_pt, ek_ft, f"{s}x", f"{s}x")) for s in SCALES},
        "multi_stage/KFAC": {s: scored(j_pt, multi_stage_chain(g_q_layers, kf_pt, kf_ft, f"{s}x", f"{s}x")) for s in SCALES},
        "multi_stage/global λ": {s: scored(j_pt, multi_stage_chain(g_q_layers, ek_pt, ek_ft, s * mean_eigenvalue(j_pt),
                                                                   s * mean_eigenvalue(j_ft))) for s in SCALES},
        "single_stage": {s: scored(j_ftc, inverse(ek_c, g_q_layers, f"{s}x")) for s in SCALES},
        "grad_dot": {s: j_ftc @ g_q.t() for s in SCALES},
        "grad_dot θ_pt": {s: j_pt @ g_q.t() for s in SCALES},
    }
    # The engine's own chain at `auto` must equal the sweep's m = AUTO_DAMPING_SCALE column.
    engine_auto = scored(j_pt, precondition(g_q_layers, "multi_stage", ek_pt, ek_ft))
    assert torch.allclose(engine_auto, approx["multi_stage"][AUTO_DAMPING_SCALE], rtol=1e-9, atol=1e-12 * float(engine_auto.abs().max()))

    # kronfluence single-stage at θ_ft on the corpus: its heuristic, then one λ per sweep point.
    mean_lambda = float(torch.cat([f.lambdas.flatten() for f in ek_c.layers.values()]).double().mean())
    pad = lw.tokenizer.pad_token_id
    kf_scores, kf_seconds = kronfluence_single_stage(
        lw.finetuned, layers, PaddedTexts(docs.encode(lw.tokenizer), pad), PaddedTexts(qx.encode(lw.tokenizer), pad),
        [None] + [s * mean_lambda for s in SCALES], workdir / f"kf{seed}", dtype=torch.float64)
    approx["kronfluence"] = {s: kf_scores[s * mean_lambda] for s in SCALES}
    kf_auto = kf_scores[None]

    def corr(a, b) -> dict[str, float]:
        p, s = pearson(a, b), spearman(a, b)
        return {"pearson": float(p.mean()), "spearman": float(s.mean()), "pearson_min": float(p.min())}

    ref = exact[AUTO_DAMPING_SCALE]
    at_auto = {"exact block-diag": corr(block[AUTO_DAMPING_SCALE], ref)}
    at_auto |= {name: corr(v[AUTO_DAMPING_SCALE], ref) for name, v in approx.items() if name != "kronfluence"}
    at_auto["kronfluence"] = corr(kf_auto, ref)
    matched = {"exact block-diag": {s: corr(block[s], exact[s]) for s in SCALES}}
    matched |= {name: {s: corr(v[s], exact[s]) for s in SCALES} for name, v in approx.items()}
    # Where the error comes from: EK-FAC against the exact block-diagonal answer with the same
    # per-layer dampings (the Kronecker approximation alone), and each stage on its own.
    diagnostics = {
        "EK-FAC vs exact block-diag, per-layer λ": {s: corr(approx["multi_stage"][s], block_per_layer[s]) for s in SCALES},
        "K-FAC vs exact block-diag, per-layer λ": {s: corr(approx["multi_stage/KFAC"][s], block_per_layer[s]) for s in SCALES},
        "exact block-diag per-layer λ vs exact": {s: corr(block_per_layer[s], exact[s]) for s in SCALES},
        "pre-training stage only: EK-FAC vs exact": {s: corr(scored(j_pt, inverse(ek_pt, g_q_layers, s * mean_eigenvalue(j_pt))),
                                                             exact_pt_only[s]) for s in SCALES},
        "fine-tuning stage only: EK-FAC vs exact": {
            s: corr(scored(j_pt, {n: s * mean_eigenvalue(j_ft) * v for n, v in
                                  inverse(ek_ft, g_q_layers, s * mean_eigenvalue(j_ft)).items()}), exact_ft_only[s])
            for s in SCALES},
        "exact pre-training stage only vs exact": {s: corr(exact_pt_only[s], exact[s]) for s in SCALES},
        "exact fine-tuning stage only vs exact": {s: corr(exact_ft_only[s], exact[s]) for s in SCALES},
    }
    matrix = {name: {f"{se}": {f"{sa}": corr(approx[name][sa], exact[se])["pearson"] for sa in SCALES} for se in SCALES}
              for name in ("multi_stage", "multi_stage/KFAC", "single_stage")}
    log(f"seed {seed}: at auto, Pearson vs exact: " + ", ".join(f"{k} {v['pearson']:.3f}" for k, v in at_auto.items())
        + f" ({time.process_time() - t0:.0f}s CPU)")
    return {"seed": seed, "num_documents": len(lw.documents), "num_queries": len(lw.queries), "num_parameters": num_params,
            "num_finetune_pairs": len(lw.finetune), "world_stats": lw.world.stats(), "cg_check": cg,
            "at_auto": at_auto, "matched": matched, "diagnostics": diagnostics, "matrix_pearson": matrix, "kronfluence_seconds": kf_seconds,
            "cpu_seconds": time.process_time() - t0}


# --------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="world seeds (default 0 1 2; smoke: 0)")
    parser.add_argument("--hidden", type=int, default=None, help="model width (P grows as ~24 x hidden²)")
    parser.add_argument("--entities", type=int, default=None, help="people (corpus ≈ 8 x entities + filler)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    setup(args.threads)
    spec = SMOKE if args.smoke else FULL
    spec = replace(spec, **{k: v for k, v in (("hidden_size", args.hidden), ("num_entities", args.entities)) if v})
    seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        per_seed = [run_seed(spec, s, lambda line: print(line, flush=True), Path(tmp)) for s in seeds]

    methods = list(per_seed[0]["matched"])
    at_auto = {m: {k: mean_spread([s["at_auto"][m][k] for s in per_seed]) for k in ("pearson", "spearman")}
               for m in per_seed[0]["at_auto"]}
    matched = {m: {str(sc): {k: mean_spread([s["matched"][m][sc][k] for s in per_seed]) for k in ("pearson", "spearman")}
                   for sc in SCALES} for m in methods}
    matrix = {name: {se: {sa: mean_spread([s["matrix_pearson"][name][se][sa] for s in per_seed])["mean"]
                          for sa in per_seed[0]["matrix_pearson"][name][se]} for se in per_seed[0]["matrix_pearson"][name]}
              for name in per_seed[0]["matrix_pearson"]}
    diagnostics = {d: {str(sc): mean_spread([s["diagnostics"][d][sc]["pearson"] for s in per_seed])["mean"] for sc in SCALES}
                   for d in per_seed[0]["diagnostics"]}
    best = {name: {se: max(row, key=row.get) for se, row in m.items()} for name, m in matrix.items()}

    s0 = per_seed[0]
    print(f"\nexact influence: {s0['num_queries']} queries x {s0['num_documents']} documents, {s0['num_parameters']} "
          f"tracked parameters, {len(seeds)} seeds; per-query correlation, mean over queries, then mean ± sd over seeds")
    tables = {"auto": print_table(["method (damping auto; exact at m=0.1)", "Pearson", "Spearman"],
                                  [[m, fmt(v["pearson"]), fmt(v["spearman"])] for m, v in at_auto.items()])}
    tables["sweep"] = print_table(["Pearson, matched damping m"] + [f"m={s}" for s in SCALES],
                                  [[m] + [f"{matched[m][str(s)]['pearson']['mean']:.3f}" for s in SCALES] for m in methods])
    tables["sweep_spearman"] = print_table(["Spearman, matched damping m"] + [f"m={s}" for s in SCALES],
                                           [[m] + [f"{matched[m][str(s)]['spearman']['mean']:.3f}" for s in SCALES] for m in methods])
    tables["diagnostics"] = print_table(["where the error comes from (Pearson)"] + [f"m={s}" for s in SCALES],
                                        [[d] + [f"{v[str(s)]:.3f}" for s in SCALES] for d, v in diagnostics.items()])
    controls = {"linear layer": [linear_control(seed=s, **({"num_examples": 4_000, "num_documents": 500} if args.smoke else {}))
                                 for s in seeds],
                "2-layer LM": [lm_control(CONTROL_SMOKE if args.smoke else CONTROL, s, lambda line: print(line, flush=True))
                               for s in seeds]}
    control_rows, fisher_rows = [], []
    for world, runs in controls.items():
        for chain in ("single_stage", "multi_stage"):
            for kind in ("EK-FAC", "K-FAC"):
                control_rows.append([f"{world}: {chain} {kind}"] + [
                    fmt(mean_spread([r[chain][str(s)][kind] for r in runs])) for s in SCALES])
        for stage in ("pre-training", "fine-tuning"):
            fisher_rows.append([f"{world}: {stage}"] + [fmt(mean_spread([r["fisher_relative_error"][stage][kind] for r in runs]))
                                                        for kind in ("EK-FAC", "K-FAC")])
    tables["positive_control"] = print_table(["positive control: Pearson vs exact (block-diag for the LM), same damping m"]
                                             + [f"m={s}" for s in SCALES], control_rows)
    tables["positive_control_fisher"] = print_table(["Fisher relative Frobenius error (per block, mean)", "EK-FAC", "K-FAC"],
                                                    fisher_rows)
    tables["matrix"] = print_table(["EK-FAC multi_stage Pearson: exact m \\ approx m"] + [f"{s}" for s in SCALES],
                                   [[f"exact m={se}"] + [f"{matrix['multi_stage'][se][str(sa)]:.3f}" for sa in SCALES]
                                    for se in matrix["multi_stage"]])
    per_seed_best = {name: [{se: max(row, key=row.get) for se, row in s["matrix_pearson"][name].items()} for s in per_seed]
                     for name in matrix}
    json_path, png_path = result_paths("exact_influence", args.smoke, args.out_dir)
    import sys
    payload = {"command": "python benchmarks/bench_exact_influence.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "spec": spec.__dict__, "control_spec": (CONTROL_SMOKE if args.smoke else CONTROL).__dict__, "seeds": seeds, "scales": SCALES, "auto_scale": AUTO_DAMPING_SCALE,
               "at_auto": at_auto, "matched": matched, "diagnostics": diagnostics, "matrix_pearson": matrix, "best_approx_scale_per_exact_scale": best,
               "best_approx_scale_per_seed": per_seed_best, "positive_control": controls, "tables": tables, "per_seed": per_seed,
               "wall_seconds": time.perf_counter() - started}
    write_json(json_path, payload)

    fig, axes = new_figure(3, 1, size=(5.2, 4.0))
    ax = axes[0][0]
    for m in methods:
        ax.plot(SCALES, [matched[m][str(s)]["pearson"]["mean"] for s in SCALES], marker="o", label=m)
    ax.set_xscale("log"); ax.set_xlabel("damping m (x mean eigenvalue), exact at the same m"); ax.set_ylabel("Pearson vs exact")
    ax.axvline(AUTO_DAMPING_SCALE, color="gray", ls=":"); ax.legend(fontsize=6); ax.set_title("matched damping", fontsize=9)
    for ax, name in zip(axes[0][1:], ("multi_stage", "multi_stage/KFAC")):
        grid = torch.tensor([[matrix[name][str(se)][str(sa)] for sa in SCALES] for se in SCALES])
        im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(SCALES)), [str(s) for s in SCALES]); ax.set_yticks(range(len(SCALES)), [str(s) for s in SCALES])
        ax.set_xlabel("approximation m"); ax.set_ylabel("exact m"); ax.set_title(f"{name}: Pearson", fontsize=9)
        for i in range(len(SCALES)):
            for k in range(len(SCALES)):
                ax.text(k, i, f"{grid[i, k]:.2f}", ha="center", va="center", fontsize=7, color="w" if grid[i, k] < 0.6 else "k")
        fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, png_path)
    return payload


if __name__ == "__main__":
    main()
