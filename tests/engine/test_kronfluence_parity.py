"""Parity with kronfluence 1.0.1, the reference EK-FAC implementation, on a tiny GPT-NeoX.

Both libraries see the same float64 model, the same tracked layers (msif's default: every
nn.Linear inside ``gpt_neox.layers``), the same token ids (msif's own tokenization, fed to
kronfluence as pre-padded tensors), the empirical Fisher and the same fixed damping λ. We check

1. pass 1: the raw activation / gradient covariance sums and their token counts agree;
2. the eigenbases agree up to the sign of each eigenvector, and Λ agrees;
3. the damped inverse agrees: msif's ``precondition(..., "single_stage")`` against kronfluence's
   own ``Ekfac.precondition_gradient`` applied to the same query gradients (this comparison is
   invariant to any eigenvector sign or rotation inside a degenerate eigenspace);
4. single_stage pairwise scores of prompt/completion queries against a small corpus agree
   (Pearson >= 0.999, and elementwise to rtol 1e-6).

Conventions compared (and why they do or do not matter):

- Sign. msif differentiates log p (documents: every token after the first; queries: completion
  tokens only); the kronfluence Task (``benchmarks/kf.py``'s, the one the benchmarks run)
  returns the summed cross-entropy, i.e. −log p, for both ``compute_train_loss`` and
  ``compute_measurement``. Every gradient flips sign, the Fisher (an outer product) does not, and
  the score, bilinear in (query, document) gradients, flips twice: the scores must be *equal*,
  not opposite, and the test asserts exactly that.
- Covariance normalisation. Both divide Σ_t a aᵀ and Σ_t s sᵀ by the number of real tokens
  (kronfluence: ``attention_mask.sum()``; msif: ``Batch.num_tokens``). Only eigenvectors of A
  and S are used by EK-FAC, so this normalisation could not change a score anyway.
- Λ normalisation. Both divide Σ (Q_Sᵀ G Q_A)² by the number of examples (kronfluence: batch
  sizes; msif: windows — the same here, since every text fits in one window). This one matters:
  it sets Λ's scale relative to the fixed damping λ.
- Padding. msif zeroes a_t on padded positions; kronfluence masks activations only in the
  covariance pass (``get_attention_mask``) and counts only real tokens. In the Λ and score passes
  kronfluence does not mask a_t, but with right padding and loss on real tokens only, s_t is
  exactly 0 on padded positions (no real position attends to them), so G = Σ_t s_t a_tᵀ is the
  same. The S covariance is unmasked in kronfluence for the same reason: s_t = 0 there.
- Bias. Both fold the bias in as a trailing input column of ones (in + 1), masked on padding.
- Fisher labels. Empirical Fisher on both sides (data labels); the sampled Fisher draws from
  different random streams and is not comparable pair by pair.
- Damping. A single float λ for every layer on both sides (msif ``damping_pretrain=λ``,
  kronfluence ``ScoreArguments(damping_factor=λ)``). The ``auto`` heuristics agree in formula
  (0.1 x mean Λ per layer) but are not exercised here.
- Precision. float64 model and float64 kronfluence dtypes throughout, so differences are
  summation order only.
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

import pytest
import torch

# kronfluence 1.0.1 builds torch.cuda.amp.GradScaler, deprecated in recent torch; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.cuda.amp.GradScaler:FutureWarning")

from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.factor.config import FactorConfig  # noqa: E402
from kronfluence.utils.constants import (  # noqa: E402
    ACTIVATION_COVARIANCE_MATRIX_NAME,
    ACTIVATION_EIGENVECTORS_NAME,
    ALL_MODULE_NAME,
    GRADIENT_COVARIANCE_MATRIX_NAME,
    GRADIENT_EIGENVECTORS_NAME,
    LAMBDA_MATRIX_NAME,
    NUM_ACTIVATION_COVARIANCE_PROCESSED,
    NUM_GRADIENT_COVARIANCE_PROCESSED,
    NUM_LAMBDA_PROCESSED,
)
from kronfluence.utils.dataset import DataLoaderKwargs  # noqa: E402

from msif_ray.engine.curvature import accumulate_covariances  # noqa: E402
from msif_ray.engine.api import Examples, TrackedLM
from msif_ray.engine.influence import precondition  # noqa: E402
from tiny import SENTENCES, make_model, make_tokenizer  # noqa: E402

# The benchmarks' kronfluence driver (benchmarks/ is scripts, not a package: on sys.path as in test_benchmarks.py),
# so that the code the benchmarks run is the code checked here.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from kf import PaddedTexts, causal_lm_task  # noqa: E402

DOCUMENTS = SENTENCES + [
    "Mira sailed from Elsk at dawn.",
    "The lighthouse of Elsk was painted white and red, and its lamp burned all night long.",
    "Ledgers list fish, rope and salt.",
    "The river rose.",
]
QUERY_PROMPTS = ["Q: Where was Mira Tolsen born? A:", "Rain fell on the", "Elsk is known for its"]
QUERY_COMPLETIONS = [" Elsk", " hills all night", " lighthouse"]
DAMPING = 1e-3  # fixed λ on both sides (Λ here is O(1e-2 .. 1e2))
BATCH_SIZE = 3  # not a divisor of the corpus size: the last batch is short


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """Fit and score with both libraries once; the tests below compare the pieces."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("kronfluence_parity")
    tokenizer = make_tokenizer(root / "tok")
    model = make_model("gpt_neox", root / "model", len(tokenizer), seed=0, dtype=torch.float64)

    # ---- msif
    lm = TrackedLM(model, tokenizer, batch_size=BATCH_SIZE)
    documents = Examples.documents(DOCUMENTS)
    queries = Examples.pairs(QUERY_PROMPTS, QUERY_COMPLETIONS)
    covariances = accumulate_covariances(lm.model, lm.taps, lm.batches(documents), fisher="empirical")
    factors = lm.fit_factors(documents, fisher="empirical")
    query_grads = lm.gradients(queries)
    preconditioned = precondition(query_grads, "single_stage", factors, damping_pretrain=DAMPING)
    msif_scores = lm.score(documents, preconditioned).total  # [N, Q]

    # ---- kronfluence, on its own copy (prepare_model swaps nn.Linear for TrackedLinear in place)
    task = causal_lm_task(lm.layers)
    kf_model = prepare_model(copy.deepcopy(model), task)
    analyzer = Analyzer(
        "parity", kf_model, task, cpu=True, disable_tqdm=True, log_level=logging.WARNING, output_dir=str(root / "kf"),
    )
    pad = tokenizer.pad_token_id
    train_set = PaddedTexts(documents.encode(tokenizer), pad)
    query_set = PaddedTexts(queries.encode(tokenizer), pad)
    f64 = torch.float64
    factor_args = FactorArguments(
        strategy="ekfac", use_empirical_fisher=True,
        activation_covariance_dtype=f64, gradient_covariance_dtype=f64, eigendecomposition_dtype=f64,
        per_sample_gradient_dtype=f64, lambda_dtype=f64,
    )
    score_args = ScoreArguments(
        damping_factor=DAMPING, per_sample_gradient_dtype=f64, precondition_dtype=f64, score_dtype=f64,
    )
    loader_kwargs = DataLoaderKwargs(num_workers=0, collate_fn=train_set.collate)
    analyzer.fit_all_factors(
        "ekfac", train_set, per_device_batch_size=BATCH_SIZE, factor_args=factor_args, dataloader_kwargs=loader_kwargs,
    )
    analyzer.compute_pairwise_scores(
        "scores", "ekfac", query_set, train_set, per_device_query_batch_size=len(query_set),
        per_device_train_batch_size=BATCH_SIZE, score_args=score_args, dataloader_kwargs=loader_kwargs,
    )
    kf_scores = analyzer.load_pairwise_scores("scores")[ALL_MODULE_NAME].t()  # [Q, N] -> [N, Q]
    kf_factors = analyzer.load_all_factors("ekfac")
    kf_cov = {
        name: analyzer.load_covariance_matrices("ekfac")[name]
        for name in (ACTIVATION_COVARIANCE_MATRIX_NAME, GRADIENT_COVARIANCE_MATRIX_NAME,
                     NUM_ACTIVATION_COVARIANCE_PROCESSED, NUM_GRADIENT_COVARIANCE_PROCESSED)
    }
    return dict(
        layers=lm.layers, covariances=covariances, factors=factors, query_grads=query_grads,
        preconditioned=preconditioned, msif_scores=msif_scores, kf_scores=kf_scores, kf_factors=kf_factors,
        kf_cov=kf_cov, score_args=score_args, num_documents=len(DOCUMENTS),
    )


def test_same_tracked_layers(parity):
    assert len(parity["layers"]) == 8  # 2 blocks x (query_key_value, dense, dense_h_to_4h, dense_4h_to_h)
    assert set(parity["kf_factors"][LAMBDA_MATRIX_NAME]) == set(parity["layers"])


def test_covariance_sums_and_counts_match(parity):
    cov, kf = parity["covariances"], parity["kf_cov"]
    for name in parity["layers"]:
        assert int(kf[NUM_ACTIVATION_COVARIANCE_PROCESSED][name]) == cov.num_tokens
        assert int(kf[NUM_GRADIENT_COVARIANCE_PROCESSED][name]) == cov.num_tokens
        torch.testing.assert_close(cov.activation[name], kf[ACTIVATION_COVARIANCE_MATRIX_NAME][name], rtol=1e-9, atol=1e-12)
        # S from −log p equals S from log p (outer product of the negated gradient).
        torch.testing.assert_close(cov.gradient[name], kf[GRADIENT_COVARIANCE_MATRIX_NAME][name], rtol=1e-9, atol=1e-14)


def test_eigenvectors_match_up_to_sign_and_lambdas_match(parity):
    kf, factors = parity["kf_factors"], parity["factors"]
    for name in parity["layers"]:
        mine = factors.layers[name]
        assert int(kf[NUM_LAMBDA_PROCESSED][name]) == parity["num_documents"]
        for ours, theirs, values in ((mine.a_vectors, kf[ACTIVATION_EIGENVECTORS_NAME][name], kf["activation_eigenvalues"][name]),
                                     (mine.s_vectors, kf[GRADIENT_EIGENVECTORS_NAME][name], kf["gradient_eigenvalues"][name])):
            # Both sort eigenvalues ascending (torch.linalg.eigh); a column may differ in sign only,
            # except inside a (numerically) degenerate eigenspace, where any rotation is valid:
            # only columns whose eigenvalue is separated from its neighbours are compared.
            gaps = values.diff().abs()
            gap = torch.minimum(torch.cat([gaps, gaps[-1:]]), torch.cat([gaps[:1], gaps]))
            separated = gap > 1e-6 * values.abs().max()
            assert separated.float().mean() > 0.5
            overlap = (ours.t() @ theirs).diagonal().abs()[separated]
            torch.testing.assert_close(overlap, torch.ones_like(overlap), rtol=0, atol=1e-6)
        kf_lambda = kf[LAMBDA_MATRIX_NAME][name] / kf[NUM_LAMBDA_PROCESSED][name]
        torch.testing.assert_close(mine.lambdas, kf_lambda.to(mine.lambdas.dtype), rtol=1e-6, atol=1e-10 * float(kf_lambda.max()))


def test_damped_inverse_matches_kronfluence(parity):
    """msif's (H + λI)⁻¹ G_q equals kronfluence's own EK-FAC preconditioner applied to the same G_q."""
    kf, ekfac = parity["kf_factors"], FactorConfig.CONFIGS["ekfac"]
    for name in parity["layers"]:
        storage = {
            ACTIVATION_EIGENVECTORS_NAME: kf[ACTIVATION_EIGENVECTORS_NAME][name].clone(),
            GRADIENT_EIGENVECTORS_NAME: kf[GRADIENT_EIGENVECTORS_NAME][name].clone(),
            "activation_eigenvalues": None, "gradient_eigenvalues": None,
            LAMBDA_MATRIX_NAME: kf[LAMBDA_MATRIX_NAME][name].clone(),
            NUM_LAMBDA_PROCESSED: kf[NUM_LAMBDA_PROCESSED][name].clone(),
        }
        ekfac.prepare(storage, parity["score_args"], torch.device("cpu"))
        theirs = ekfac.precondition_gradient(parity["query_grads"][name].clone(), storage)
        ours = parity["preconditioned"][name]
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8 * float(theirs.abs().max()))


def test_single_stage_scores_match_kronfluence_pairwise_scores(parity):
    ours, theirs = parity["msif_scores"], parity["kf_scores"].to(parity["msif_scores"].dtype)
    assert ours.shape == theirs.shape == (parity["num_documents"], len(QUERY_PROMPTS))
    pearson = torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1]
    assert pearson >= 0.999, f"Pearson {float(pearson):.6f}"
    # Same sign (loss-based on both kronfluence sides), same values.
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9 * float(theirs.abs().max()))
