"""The engine against independent references: autograd loops, dense matrices, the score's algebra.

Tolerances: float64 models and factors are used wherever a result is compared with a reference
computed another way, so the only differences are summation order (rtol 1e-8 / 1e-9); the few
float32 checks use rtol 1e-4.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from msif_ray.engine.curvature import CovarianceSums, Factors, LambdaSums, LayerFactors, eigendecompose_layer, finish_factors, rotated_square_sum
from msif_ray.engine.gradients import InputError, split_windows
from msif_ray.engine.api import Examples, TrackedLM
from msif_ray.engine.influence import Chain, precondition
from msif_ray.engine.vectors import QueryVectors
from msif_ray.engine.modules import ModuleSelectionError, select_modules, weight_gradient
from tiny import ARCHITECTURES, SENTENCES, make_model, make_tokenizer

QUERY_PROMPTS = ["Q: Where was Mira Tolsen born? A:", "Rain fell on the"]
QUERY_COMPLETIONS = [" Elsk", " hills all night"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def tiny_lm(arch, tmp_path, tokenizer, seed=0, dtype=torch.float64, **kw) -> TrackedLM:
    model = make_model(arch, tmp_path / f"{arch}-{seed}", len(tokenizer), seed=seed, dtype=dtype)
    return TrackedLM(model, tokenizer, **kw)


# --------------------------------------------------------------------------- reference: autograd loop


def reference_gradient(lm: TrackedLM, ids: list[int], loss_mask: list[bool], max_length: int) -> dict[str, torch.Tensor]:
    """∇ Σ log p over one example by plain autograd, one window at a time (no batching, no hooks).

    Windows are cut here independently of the library: starts 0, L-1, 2(L-1), ...; in each window
    token i (i >= 1) is predicted from tokens < i and counts if loss_mask[start + i].
    """
    model = lm.model
    model.zero_grad()
    start = 0
    while True:
        chunk = ids[start : start + max_length]
        logits = model(input_ids=torch.tensor([chunk])).logits[0]
        log_probs = torch.log_softmax(logits, dim=-1)
        total = sum(log_probs[i - 1, chunk[i]] for i in range(1, len(chunk)) if loss_mask[start + i])
        if torch.is_tensor(total):
            total.backward()
        if start + max_length >= len(ids):
            break
        start += max_length - 1
    grads = {name: weight_gradient(m).clone() for name, m in lm.taps.modules.items()}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("max_length", [64, 7])
def test_document_and_query_gradients_match_autograd(arch, max_length, tmp_path, tokenizer):
    """Batched hook gradients (with padding, windows and masked prompts) equal the autograd loop."""
    lm = tiny_lm(arch, tmp_path, tokenizer, max_length=max_length, batch_size=3)
    for examples in (Examples.documents(SENTENCES), Examples.pairs(QUERY_PROMPTS, QUERY_COMPLETIONS)):
        grads = lm.gradients(examples)
        for k, (ids, mask) in enumerate(examples.encode(tokenizer)):
            reference = reference_gradient(lm, ids, mask, max_length)
            for name, ref in reference.items():
                torch.testing.assert_close(grads[name][k], ref, rtol=1e-8, atol=1e-10, msg=f"{arch} {name} example {k}")


def test_prompt_tokens_carry_no_loss(tokenizer):
    (ids, mask), = Examples.pairs(["Q: Where was Mira Tolsen born? A:"], [" Elsk"]).encode(tokenizer)
    completion = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert completion == " Elsk"


def test_windows_cover_every_loss_token_once():
    ids, mask = list(range(20)), [False] + [True] * 19
    windows = split_windows(0, ids, mask, max_length=6)
    predicted = [w.input_ids[i] for w in windows for i, m in enumerate(w.loss_mask) if m]
    assert predicted == list(range(1, 20))
    assert all(len(w.input_ids) <= 6 for w in windows)


def test_empty_completion_is_a_clear_error(tokenizer):
    with pytest.raises(InputError, match="'q7'.*no token"):
        Examples.pairs(["Where?"], [""], ids=["q7"]).encode(tokenizer)


# --------------------------------------------------------------------------- the EK-FAC inverse, densely


def random_layer_factors(out_dim: int, in_dim: int, seed: int = 0, lambdas: torch.Tensor | None = None) -> LayerFactors:
    g = torch.Generator().manual_seed(seed)
    q_a, _ = torch.linalg.qr(torch.randn(in_dim, in_dim, generator=g, dtype=torch.float64))
    q_s, _ = torch.linalg.qr(torch.randn(out_dim, out_dim, generator=g, dtype=torch.float64))
    if lambdas is None:
        lambdas = torch.rand(out_dim, in_dim, generator=g, dtype=torch.float64) * 3
    return LayerFactors(q_a, q_s, lambdas)


def vec(matrix: torch.Tensor) -> torch.Tensor:
    """Column-major vectorisation, so that vec(S X Aᵀ) = (A ⊗ S) vec(X)."""
    return matrix.t().reshape(-1)


def unvec(vector: torch.Tensor, out_dim: int, in_dim: int) -> torch.Tensor:
    return vector.reshape(in_dim, out_dim).t()


def dense_ekfac(f: LayerFactors) -> torch.Tensor:
    """Σ_ij Λ_ij u_ij u_ijᵀ with u_ij = vec(q_s_i q_a_jᵀ), built one eigenvector at a time."""
    out_dim, in_dim = f.lambdas.shape
    h = torch.zeros(out_dim * in_dim, out_dim * in_dim, dtype=torch.float64)
    for i in range(out_dim):
        for j in range(in_dim):
            u = vec(torch.outer(f.s_vectors[:, i], f.a_vectors[:, j]))
            h += f.lambdas[i, j] * torch.outer(u, u)
    return h


def test_ekfac_inverse_equals_dense_inverse():
    f = random_layer_factors(5, 4)
    v = torch.randn(3, 5, 4, dtype=torch.float64)
    damping = 0.3
    h = dense_ekfac(f) + damping * torch.eye(20, dtype=torch.float64)
    got = f.inverse_apply(v, damping)
    for q in range(3):
        want = unvec(torch.linalg.solve(h, vec(v[q])), 5, 4)
        torch.testing.assert_close(got[q], want, rtol=1e-9, atol=1e-12)


def test_relative_dampings_scale_the_layers_mean_eigenvalue():
    f = random_layer_factors(5, 4)
    mean = float(f.lambdas.mean())
    assert f.damping("auto") == pytest.approx(0.1 * mean) and f.damping("auto:0.01") == pytest.approx(0.01 * mean)
    assert f.damping(2e-3) == 2e-3
    for bad in ("auto:0", "auto:-1", "auto:x", "automatic"):
        with pytest.raises(ValueError, match="auto:<m>"):
            f.damping(bad)


def test_kfac_special_case_equals_kronecker_inverse():
    """With Λ = d_S d_Aᵀ (no eigenvalue correction) the inverse is (A ⊗ S + λI)⁻¹."""
    g = torch.Generator().manual_seed(1)
    d_a, d_s = torch.rand(4, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64)
    f = random_layer_factors(5, 4, seed=2, lambdas=torch.outer(d_s, d_a))
    a = f.a_vectors @ torch.diag(d_a) @ f.a_vectors.t()
    s = f.s_vectors @ torch.diag(d_s) @ f.s_vectors.t()
    v = torch.randn(5, 4, dtype=torch.float64)
    want = unvec(torch.linalg.solve(torch.kron(a, s) + 0.05 * torch.eye(20, dtype=torch.float64), vec(v)), 5, 4)
    torch.testing.assert_close(f.inverse_apply(v[None], 0.05)[0], want, rtol=1e-9, atol=1e-12)


def test_exactly_kronecker_fisher_is_inverted_exactly():
    """Single-token windows (a_i, s_j) over all pairs i, j: the Fisher E[g gᵀ] is exactly A ⊗ S.

    Fitting through the real accumulators (covariances, eigh, Λ) must then give the exact damped
    Fisher inverse, built here from the per-window gradients g = vec(s aᵀ) directly.
    """
    g = torch.Generator().manual_seed(3)
    acts = torch.randn(6, 4, generator=g, dtype=torch.float64)
    grads = torch.randn(7, 3, generator=g, dtype=torch.float64)
    a = acts.repeat_interleave(7, dim=0)[:, None, :]  # [42, T=1, 4]
    s = grads.repeat(6, 1)[:, None, :]  # [42, T=1, 3]
    covariances = CovarianceSums(num_tokens=42, num_windows=42)
    covariances.add_layer("layer", a, s)
    basis = eigendecompose_layer("layer", covariances)
    lambdas = LambdaSums({"layer": rotated_square_sum(a, s, basis.a_vectors, basis.s_vectors)}, 42)
    factors = finish_factors({"layer": basis}, lambdas, {})

    per_window = torch.stack([vec(torch.outer(s[k, 0], a[k, 0])) for k in range(42)])
    fisher = per_window.t() @ per_window / 42
    v = torch.randn(3, 4, dtype=torch.float64)
    want = unvec(torch.linalg.solve(fisher + 0.01 * torch.eye(12, dtype=torch.float64), vec(v)), 3, 4)
    got = factors.inverse_apply({"layer": v[None]}, 0.01)["layer"][0]
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------- multi-stage, densely


def test_multi_stage_score_equals_dense_composition(tmp_path, tokenizer):
    """score = α g_qᵀ (F_ft + αI)⁻¹ (F_pt + λI)⁻¹ g_m with every matrix built densely.

    g_q comes from the autograd loop at θ_ft, g_m at θ_pt; F_pt and F_ft are the dense EK-FAC
    matrices of the fitted factors (block-diagonal over layers, per-layer auto dampings).
    """
    kw = dict(include=r"mlp\.", max_length=64, batch_size=4)
    pt = tiny_lm("gpt_neox", tmp_path, tokenizer, seed=0, **kw)
    ft = tiny_lm("gpt_neox", tmp_path, tokenizer, seed=1, **kw)
    documents = Examples.documents(SENTENCES)
    queries = Examples.pairs(QUERY_PROMPTS, QUERY_COMPLETIONS)
    pt_factors = pt.fit_factors(documents, fisher="sampled", seed=0)
    ft_factors = ft.fit_factors(Examples.pairs(QUERY_PROMPTS[::-1], QUERY_COMPLETIONS[::-1]), fisher="empirical")
    preconditioned = precondition(ft.gradients(queries), "multi_stage", pt_factors, ft_factors, "auto", "auto")
    scores = pt.score(documents, preconditioned).total

    want = torch.zeros(len(documents), len(queries), dtype=torch.float64)
    query_refs = [reference_gradient(ft, ids, m, 64) for ids, m in queries.encode(tokenizer)]
    doc_refs = [reference_gradient(pt, ids, m, 64) for ids, m in documents.encode(tokenizer)]
    for name in pt.layers:
        f_pt, f_ft = pt_factors.layers[name], ft_factors.layers[name]
        lam, alpha = 0.1 * f_pt.lambdas.mean(), 0.1 * f_ft.lambdas.mean()
        n = f_pt.lambdas.numel()
        h_pt = dense_ekfac(f_pt) + lam * torch.eye(n, dtype=torch.float64)
        h_ft = dense_ekfac(f_ft) + alpha * torch.eye(n, dtype=torch.float64)
        middle = alpha * torch.linalg.solve(h_ft, torch.linalg.inv(h_pt))
        for q, gq in enumerate(query_refs):
            for m, gm in enumerate(doc_refs):
                want[m, q] += vec(gq[name]) @ middle @ vec(gm[name])
    torch.testing.assert_close(scores, want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("rank", [None, 3])
def test_normalized_scores_equal_dense_references(rank, tmp_path, tokenizer):
    """``scoring.normalize`` against dense matrices: I_m = g_mᵀ (F_pt + λI)⁻¹ g_m from the autograd
    loop's g_m, and ‖Ṽ_q‖² = ṽᵀ (F_pt + λI) ṽ for the full-rank multi-stage ṽ; ``unit`` divides by
    both, so its scores are cosines (|·| ≤ 1), and a single_stage query made of a document's own
    gradient scores exactly 1 against it."""
    kw = dict(include=r"mlp\.", max_length=8, batch_size=3)  # documents span several windows
    pt = tiny_lm("gpt_neox", tmp_path, tokenizer, seed=0, **kw)
    ft = tiny_lm("gpt_neox", tmp_path, tokenizer, seed=1, **kw)
    documents = Examples.documents(SENTENCES)
    pt_factors = pt.fit_factors(documents, fisher="empirical")
    ft_factors = ft.fit_factors(Examples.pairs(QUERY_PROMPTS, QUERY_COMPLETIONS), fisher="empirical")
    vectors = ft.query_vectors(Examples.pairs(QUERY_PROMPTS, QUERY_COMPLETIONS),
                               Chain.of("multi_stage", pt_factors, ft_factors), rank)
    full = precondition(ft.gradients(Examples.pairs(QUERY_PROMPTS, QUERY_COMPLETIONS)), "multi_stage", pt_factors, ft_factors)
    self_influence = pt.self_influence(documents, pt_factors)

    doc_refs = [reference_gradient(pt, ids, m, 8) for ids, m in documents.encode(tokenizer)]
    want_self = torch.zeros(len(documents), dtype=torch.float64)
    want_norm2 = torch.zeros(len(QUERY_PROMPTS), dtype=torch.float64)
    for name in pt.layers:
        f = pt_factors.layers[name]
        h = dense_ekfac(f) + 0.1 * f.lambdas.mean() * torch.eye(f.lambdas.numel(), dtype=torch.float64)
        for m, g in enumerate(doc_refs):
            want_self[m] += vec(g[name]) @ torch.linalg.solve(h, vec(g[name]))
        for q in range(len(QUERY_PROMPTS)):
            want_norm2[q] += vec(full[name][q]) @ h @ vec(full[name][q])
    # the self-influence rotates in float32 (the index's basis), the chain works in float64
    torch.testing.assert_close(self_influence, want_self, rtol=1e-5, atol=0)
    torch.testing.assert_close(vectors.whitened_norms() ** 2, want_norm2, rtol=1e-9, atol=0)

    unit = pt.score(documents, vectors).normalized("unit", self_influence, vectors)
    assert float(unit.abs().max()) <= 1 + 1e-6
    own, grads = Chain.of("single_stage", pt_factors), pt.gradients(documents)
    own_vectors = QueryVectors([str(m) for m in range(len(documents))], {n: own.layer(n, grads[n]) for n in pt.layers})
    cosine = pt.score(documents, own_vectors).normalized("unit", self_influence, own_vectors)
    torch.testing.assert_close(cosine.diagonal(), torch.ones(len(documents), dtype=torch.float64), rtol=1e-5, atol=0)


def test_single_stage_and_grad_dot_chains(tmp_path, tokenizer):
    lm = tiny_lm("llama", tmp_path, tokenizer, max_length=64)
    factors = lm.fit_factors(Examples.documents(SENTENCES))
    g = lm.gradients(Examples.pairs(QUERY_PROMPTS, QUERY_COMPLETIONS))
    assert precondition(g, "grad_dot") == g
    single = precondition(g, "single_stage", factors, damping_pretrain=0.5)
    for name in lm.layers:
        torch.testing.assert_close(single[name], factors.layers[name].inverse_apply(g[name], 0.5))
    with pytest.raises(ValueError, match="fine-tuning factors"):
        precondition(g, "multi_stage", factors)


# --------------------------------------------------------------------------- scores: sanity and decompositions


def test_verbatim_document_is_top_proponent_and_decompositions_add_up(tmp_path, tokenizer):
    """A document repeating the query verbatim ranks first; tokens and layers sum to the score."""
    lm = tiny_lm("gpt_neox", tmp_path, tokenizer, max_length=64, dtype=torch.float32)
    corpus = [s for s in SENTENCES if "Mira" not in s] + ["Q: Where was Mira Tolsen born? A: Elsk"]
    factors = lm.fit_factors(Examples.documents(corpus), fisher="sampled")
    v = precondition(lm.gradients(Examples.pairs(QUERY_PROMPTS[:1], QUERY_COMPLETIONS[:1])), "single_stage", factors)
    scores = lm.score(Examples.documents(corpus), v)
    assert int(scores.total[:, 0].argmax()) == len(corpus) - 1
    assert scores.total[-1, 0] > 0
    torch.testing.assert_close(scores.per_layer.sum(0), scores.total)
    ids, per_token = lm.token_scores(corpus[-1], v)
    assert ids == tokenizer(corpus[-1])["input_ids"]
    torch.testing.assert_close(per_token.sum(0), scores.total[-1], rtol=1e-4, atol=1e-6)


def test_windowed_token_scores_sum_to_document_score(tmp_path, tokenizer):
    lm = tiny_lm("gpt2", tmp_path, tokenizer, max_length=5)
    v = lm.gradients(Examples.pairs(QUERY_PROMPTS, QUERY_COMPLETIONS))
    ids, per_token = lm.token_scores(SENTENCES[1], v)
    assert ids == tokenizer(SENTENCES[1])["input_ids"]
    torch.testing.assert_close(per_token.sum(0), lm.score(Examples.documents(SENTENCES[1:2]), v).total[0], rtol=1e-9, atol=1e-12)


def test_factors_round_trip_through_safetensors(tmp_path, tokenizer):
    lm = tiny_lm("gpt_neox", tmp_path, tokenizer)
    factors = lm.fit_factors(Examples.documents(SENTENCES), fisher="empirical")
    factors.save(str(tmp_path / "f.safetensors"))
    loaded = Factors.load(str(tmp_path / "f.safetensors"))
    assert loaded.metadata["fisher"] == "empirical" and loaded.metadata["num_examples"] == str(len(SENTENCES))
    assert list(loaded.layers) == lm.layers
    for name in lm.layers:
        torch.testing.assert_close(loaded.layers[name].lambdas, factors.layers[name].lambdas)


def test_sampled_fisher_is_reproducible_for_a_seed(tmp_path, tokenizer):
    lm = tiny_lm("gpt_neox", tmp_path, tokenizer)
    first, second, other = (lm.fit_factors(Examples.documents(SENTENCES), seed=s) for s in (0, 0, 1))
    name = lm.layers[0]
    assert torch.equal(first.layers[name].lambdas, second.layers[name].lambdas)
    assert not torch.equal(first.layers[name].lambdas, other.layers[name].lambdas)


# --------------------------------------------------------------------------- bad input


def test_include_that_matches_nothing_lists_candidates(tmp_path, tokenizer):
    model = make_model("gpt_neox", tmp_path / "m", len(tokenizer))
    with pytest.raises(ModuleSelectionError, match=r"'nothing_here'.*gpt_neox\.layers\.0\.attention\.query_key_value"):
        select_modules(model, include="nothing_here")
    with pytest.raises(ModuleSelectionError, match="no layer left"):
        select_modules(model, exclude=".")


def test_model_without_trackable_layers_is_rejected():
    with pytest.raises(ModuleSelectionError, match="no nn.Linear or Conv1D"):
        select_modules(nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4)))


def test_nan_weights_are_named(tmp_path, tokenizer):
    lm = tiny_lm("gpt_neox", tmp_path, tokenizer)
    with torch.no_grad():
        lm.taps.modules["gpt_neox.layers.1.mlp.dense_4h_to_h"].weight[0, 0] = math.nan
    with pytest.raises(FloatingPointError, match=r"layer 'gpt_neox\.layers\.\d\..*'"):
        lm.gradients(Examples.documents(SENTENCES))
    with pytest.raises(FloatingPointError, match=r"layer 'gpt_neox\.layers\.\d\..*'"):
        lm.fit_factors(Examples.documents(SENTENCES))
