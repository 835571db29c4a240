"""The corpus gradient index (``index.py``) against exact scores.

- Orthogonal projections of full dimension preserve the Frobenius inner product, so index scores
  equal the exact scores (rtol 1e-5: the exact scorer works in float32).
- Random Gaussian projections give an unbiased estimate, whitened or not: the mean over many seeds lies within
  4 standard errors of the exact inner product (a false alarm about once in 16,000 runs; the
  seeds are fixed, so the test is deterministic), and the mean squared error falls as k grows
  (roughly as 1/k² per layer; asserted only to fall by half per doubling of k).
- float16 storage with per-block scales keeps ~3 decimal digits: rtol 2e-3 on scores.
"""

from __future__ import annotations

import pytest
import torch

from msif_ray.engine.curvature import LayerFactors
from msif_ray.engine.index import Projection, dequantize, document_rows, index_width, layer_sizes, project_queries, quantize, random_projections, scan, whitening
from msif_ray.engine.influence import Chain
from msif_ray.engine.api import Examples, TrackedLM
from msif_ray.engine.modules import LayerSpec
from tiny import SENTENCES, make_model, make_tokenizer


def tiny_lm(tmp_path) -> TrackedLM:
    tokenizer = make_tokenizer()
    model = make_model("gpt_neox", tmp_path / "m", len(tokenizer), seed=0).double()
    return TrackedLM(model, tokenizer, max_length=16, batch_size=3)


def orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_full_dimension_orthogonal_projections_give_exact_scores(tmp_path):
    lm = tiny_lm(tmp_path)
    docs = Examples.documents(SENTENCES[:5] + [" ".join(SENTENCES)])  # the last one spans several windows
    queries = Examples.pairs(["Q: a", "Q: b", "Q: c"], [" x", " y", " z"], ["q0", "q1", "q2"])
    factors = lm.fit_factors(docs, fisher="empirical")
    for rank in (None, 2):
        vectors = lm.query_vectors(queries, Chain.of("single_stage", factors, None), rank=rank)
        vectors = vectors.to("cpu", torch.float64)
        exact = lm.score(docs, vectors).total
        for whiten in (False, True):
            projections = {}
            for i, (name, spec) in enumerate(lm.taps.specs.items()):
                p_out, p_in = orthogonal(spec.out_features, 2 * i), orthogonal(spec.in_dim, 2 * i + 1)
                if whiten:  # any invertible M, N: (P M, P N) for the documents, (P M⁻ᵀ, P N⁻ᵀ) for the queries
                    (m, m_inv_t), (n, n_inv_t) = whitening(factors.layer(name))
                    projections[name] = Projection(p_out @ m, p_in @ n, p_out @ m_inv_t, p_in @ n_inv_t)
                else:
                    projections[name] = Projection.plain(p_out, p_in)
            rows = document_rows(lm.model, lm.taps, lm.batches(docs), len(docs), projections)
            projected = project_queries(vectors, projections, lm.layers)
            torch.testing.assert_close(rows.double() @ projected.t(), exact, rtol=1e-5, atol=1e-6 * exact.abs().max())


def test_python_api_index_estimates_the_scores(tmp_path):
    """``TrackedLM.index`` / ``index_scores``, plain (grad_dot) and whitened (single_stage): the mean
    of 32 seeds' estimates at k = 128 tracks the exact scores (Pearson > 0.95 on these fixed seeds;
    one seed alone gives ~0.9 for grad_dot, less for preconditioned queries: an unbiased, noisy estimate)."""
    lm = tiny_lm(tmp_path)
    docs = Examples.documents(SENTENCES)
    factors = lm.fit_factors(docs, fisher="empirical")
    queries = Examples.pairs(["Q: a", "Q: b"], [" x", " y"])
    for method, whiten in (("grad_dot", None), ("single_stage", factors)):
        vectors = lm.query_vectors(queries, Chain.of(method, factors, None), rank=4).to("cpu", torch.float64)
        exact = lm.score(docs, vectors).total
        estimate = sum(lm.index_scores(lm.index(docs, 128, seed, whiten), vectors, 128, seed, whiten)
                       for seed in range(32)) / 32
        for q in range(2):
            assert float(torch.corrcoef(torch.stack([estimate[:, q], exact[:, q]]))[0, 1]) > 0.95, method


def test_random_projections_are_unbiased_and_improve_with_k():
    generator = torch.Generator().manual_seed(0)
    out, inp = 12, 9
    g = torch.randn(out, inp, generator=generator, dtype=torch.float64)
    left, right = torch.randn(1, out, 2, generator=generator, dtype=torch.float64), torch.randn(1, inp, 2, generator=generator, dtype=torch.float64)
    exact = float((left[0] @ right[0].T * g).sum())
    spec = LayerSpec("layer", inp, out, has_bias=False)
    from msif_ray.engine.vectors import LayerVectors, QueryVectors

    vectors = QueryVectors(["q"], {"layer": LayerVectors(left=left, right=right)})
    factors = LayerFactors(orthogonal(inp, 7), orthogonal(out, 8),
                           torch.rand(out, inp, generator=generator, dtype=torch.float64) ** 4)  # a skewed spectrum
    for whitened in (None, lambda layer: factors):
        errors = {}
        for k in (2, 4, 8):
            estimates = []
            for seed in range(4000):
                p = random_projections([spec], k, seed, factors=whitened)["layer"]
                gk = (p.out.double() @ g @ p.inp.double().t()).flatten()
                estimates.append(float(project_queries(vectors, {"layer": p}, ["layer"])[0].double() @ gk))
            estimates = torch.tensor(estimates, dtype=torch.float64)
            standard_error = float(estimates.std() / len(estimates) ** 0.5)
            assert abs(float(estimates.mean()) - exact) < 4 * standard_error, k
            errors[k] = float(((estimates - exact) ** 2).mean())
        assert errors[4] < errors[2] / 2 and errors[8] < errors[4] / 2, errors


def test_projections_follow_seed_and_layer_only():
    specs = [LayerSpec("a", 5, 7, True), LayerSpec("b", 5, 7, True)]
    one, two = random_projections(specs, 4, 3), random_projections(list(reversed(specs)), 4, 3)
    assert torch.equal(one["a"].out, two["a"].out) and torch.equal(one["b"].inp, two["b"].inp)
    assert not torch.equal(one["a"].out, one["b"].out)
    assert not torch.equal(one["a"].out, random_projections(specs, 4, 4)["a"].out)
    assert one["a"].out.shape == (4, 7) and one["a"].inp.shape == (4, 6) and index_width(one) == 32


def test_float16_rows_with_block_scales_keep_scores():
    generator = torch.Generator().manual_seed(0)
    sizes = [16, 9, 4]
    rows = torch.randn(50, sum(sizes), generator=generator) * torch.tensor([1e-7] * 16 + [1e5] * 9 + [1.0] * 4)
    rows[3, 16:25] = 0.0  # an all-zero block
    q, scale = quantize(rows, sizes)
    assert q.dtype == torch.float16 and scale.shape == (50, 3)
    torch.testing.assert_close(dequantize(q, scale, sizes), rows, rtol=1e-3, atol=0)
    queries = torch.randn(3, sum(sizes), generator=generator)
    torch.testing.assert_close(scan(q, scale, sizes, queries), (rows.double() @ queries.double().t()), rtol=2e-3,
                               atol=2e-3 * float((rows.abs() @ queries.abs().t()).max()))
    assert layer_sizes(random_projections([LayerSpec("a", 3, 2, False)], 2, 0), ["a"]) == [4]


# --------------------------------------------------------------------------- the pipeline in index mode


def run(world, run_dir, log=None, **overrides):
    import pyarrow.parquet as pq

    from msif_ray.config import config_from_dict
    from msif_ray.store.layout import TOPK
    from msif_ray.pipeline.run import Pipeline

    config = config_from_dict(world.config(run_dir, **overrides), base_dir=world.root)
    Pipeline(config, log=log or (lambda line: None)).run()
    return pq.read_table(run_dir / TOPK).to_pydict()


def manifest(run_dir):
    from msif_ray.store.layout import MANIFEST
    from msif_ray.store.storage import RunDir

    return RunDir(str(run_dir)).read_json(MANIFEST)


def pairs(table: dict) -> dict:
    return {(q, d): s for q, d, s in zip(table["query_id"], table["doc_id"], table["score"])}


ALL = {"scoring.top_k": 1000, "factors.fisher": "empirical"}


@pytest.fixture(scope="module")
def exact_all(world, ray_session, tmp_path_factory):
    """Exact mode's table of every (query, document) pair, computed once for the tests that compare with it."""
    return run(world, tmp_path_factory.mktemp("exact"), **ALL)


def test_rerank_of_every_document_equals_exact_mode(world, ray_session, exact_all, tmp_path):
    """With every document a candidate, index mode returns exact mode's table (rtol 1e-4: factor
    sums in another float32 order, see test_pipeline.py)."""
    exact = exact_all
    indexed = run(world, tmp_path / "index", **ALL, **{"scoring.mode": "index", "scoring.rerank": 1000})
    assert indexed["query_id"] == exact["query_id"] and indexed["doc_id"] == exact["doc_id"]
    assert indexed["rank"] == exact["rank"]
    assert indexed["score"] == pytest.approx(exact["score"], rel=1e-4, abs=1e-6)
    stages = manifest(tmp_path / "index")["stages"]
    assert stages["index"]["passes"]["index"]["computed"] == stages["index"]["passes"]["index"]["shards_total"]
    from world import corpus_documents

    assert stages["scores"]["passes"]["rerank"]["documents"] == len(corpus_documents())  # each re-scored once


def test_reranked_scores_are_exact(world, ray_session, exact_all, tmp_path):
    exact = pairs(exact_all)
    table = run(world, tmp_path / "index", **{**ALL, "scoring.top_k": 2, "scoring.mode": "index", "scoring.rerank": 4,
                                              "index.dim": 4})
    assert len(table["doc_id"]) == 4  # 2 queries x top 2
    for pair, score in pairs(table).items():
        assert score == pytest.approx(exact[pair], rel=1e-4, abs=1e-6)
    rerank = manifest(tmp_path / "index")["stages"]["scores"]["passes"]["rerank"]
    assert rerank["documents"] <= 2 * 2 * 4  # (top + bottom) x queries x candidates, at most


@pytest.mark.slow
def test_index_is_shared_appended_and_reused(world, ray_session, tmp_path):
    """A second run on the same index with another fine-tuned model indexes nothing; appending a
    corpus file indexes only its shards and equals building from scratch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    extra = tmp_path / "extra.parquet"
    pq.write_table(pa.table({"id": [f"extra-{i}" for i in range(5)],
                             "text": [f"Extra document number {i} about the town of Elsk." for i in range(5)]}), extra)
    settings = {**ALL, "scoring.mode": "index", "scoring.rerank": 1000, "index.path": str(tmp_path / "index")}
    run(world, tmp_path / "a", **settings)
    first = manifest(tmp_path / "a")["stages"]["index"]["passes"]["index"]
    assert first["computed"] == first["shards_total"] == 4

    run(world, tmp_path / "b", **settings, **{"models.finetuned": str(world.pretrained)})  # another "fine-tune"
    assert manifest(tmp_path / "b")["stages"]["index"]["passes"]["index"]["computed"] == 0

    corpus = {"data.corpus.paths": [str(world.corpus), str(extra)]}
    appended = run(world, tmp_path / "c", **settings, **corpus)
    index = manifest(tmp_path / "c")["stages"]["index"]["passes"]["index"]
    assert (index["computed"], index["reused"]) == (2, 4)
    fresh = run(world, tmp_path / "d", **{**settings, "index.path": str(tmp_path / "fresh")}, **corpus)
    assert appended == fresh


@pytest.mark.parametrize("override, named", [
    ({"index.dim": 8}, "index.dim"),
    ({"index.seed": 1}, "index.seed"),
    ({"data.max_length": 24}, "data.max_length"),
    ({"modules.include": "mlp"}, "modules"),
    ({"models.finetuned": "PRETRAINED"}, "corpus model"),  # grad_dot: the corpus model is the fine-tuned one
])
def test_an_index_built_for_other_settings_is_refused(override, named, world, ray_session, tmp_path):
    from msif_ray.config import ConfigError

    settings = {"method": "grad_dot", "scoring.mode": "index", "index.path": str(tmp_path / "index"), "index.dim": 4}
    run(world, tmp_path / "a", **settings)
    override = {k: str(world.pretrained) if v == "PRETRAINED" else v for k, v in override.items()}
    with pytest.raises(ConfigError, match=named) as err:
        run(world, tmp_path / "b", **{**settings, **override})
    assert "index.path" in str(err.value)


@pytest.mark.slow
def test_new_queries_pay_for_themselves(world, ray_session, tmp_path):
    """Queries added to the file: only their batch is preconditioned, scanned and re-scored (the
    outputs of the old batch are not rewritten); the result equals a fresh run's."""
    import json

    queries = tmp_path / "queries.jsonl"
    lines = world.queries.read_text().splitlines()
    queries.write_text("\n".join(lines) + "\n")
    settings = {"method": "grad_dot", "scoring.mode": "index", "scoring.rerank": 4, "index.dim": 4,
                "budget.query_batch_size": 2, "data.queries.paths": [str(queries)]}
    run(world, tmp_path / "run", **settings)
    scores = tmp_path / "run" / "scores"
    before = {p: p.stat().st_mtime_ns for folder in ("scan", "rerank") for p in (scores / folder).rglob("*.parquet")}
    queries.write_text("\n".join(lines + [json.dumps({"id": "q9", "prompt": "Q: Where was Otto Fenn born? A:",
                                                      "completion": " Marrow"})]) + "\n")
    grown = run(world, tmp_path / "run", **settings)
    stages = manifest(tmp_path / "run")["stages"]
    assert stages["index"]["passes"]["index"]["computed"] == 0
    precondition = stages["queries"]["passes"]["precondition"]
    assert (precondition["computed"], precondition["reused"]) == (1, 1)  # batches of 2: the old one is reused
    after = {p: p.stat().st_mtime_ns for folder in ("scan", "rerank") for p in (scores / folder).rglob("*.parquet")}
    assert all(after[p] == t for p, t in before.items())  # nothing of the old batch was computed again
    new_batches = {p.parent.name for p in after.keys() - before.keys() if p.name != "candidates.parquet"}
    assert len(new_batches) == 1 and len(after) > len(before)
    assert set(grown["query_id"]) == {"q0", "q1", "q9"}
    assert grown == run(world, tmp_path / "fresh", **settings)


@pytest.mark.slow
def test_pretraining_factors_are_kept_when_shards_are_appended(world, ray_session, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    extra = tmp_path / "extra.parquet"
    pq.write_table(pa.table({"id": ["extra-0", "extra-1"], "text": ["Another town, Elsk.", "Marrow has a mill."]}), extra)
    settings = {"method": "single_stage", "scoring.mode": "index", "index.dim": 4}
    run(world, tmp_path / "run", **settings)
    fitted = manifest(tmp_path / "run")["stages"]["factors/pretrain"]["fingerprint"]
    lines: list[str] = []
    grown = {**settings, "data.corpus.paths": [str(world.corpus), str(extra)]}
    run(world, tmp_path / "run", log=lines.append, **grown)
    stages = manifest(tmp_path / "run")["stages"]
    assert stages["factors/pretrain"]["fingerprint"] == fitted and any("kept: fitted on 4 of the 5" in line for line in lines)
    assert stages["index"]["passes"]["index"]["computed"] == 1
    run(world, tmp_path / "run", **grown, **{"factors.refit": True})
    stages = manifest(tmp_path / "run")["stages"]
    assert stages["factors/pretrain"]["fingerprint"] != fitted
    assert stages["index"]["passes"]["index"]["computed"] == 0  # the index keeps its own projections


@pytest.mark.slow
@pytest.mark.parametrize("pass_name, stage", [("index", "index"), ("scan", "scores"), ("rerank", "scores")])
def test_worker_killed_in_an_index_pass(pass_name, stage, world, ray_session, tmp_path, monkeypatch):
    """A worker dies (os._exit) in a pass of index mode: the run completes, equal to an uninterrupted one."""
    from msif_ray.pipeline.run import FAULT_ENV

    settings = {"method": "grad_dot", "scoring.mode": "index", "index.dim": 4, "scoring.rerank": 3,
                "ray.num_workers": 2}
    reference = run(world, tmp_path / "reference", **settings)
    monkeypatch.setenv(FAULT_ENV, pass_name)
    assert run(world, tmp_path / "killed", **settings) == reference
    assert (tmp_path / "killed" / "_faults" / pass_name).exists(), "the fault was not injected"
    assert manifest(tmp_path / "killed")["stages"][stage]["passes"][pass_name]["retried_after_crash"]
