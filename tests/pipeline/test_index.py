"""The corpus gradient index (``index.py``) against exact scores.

- With every term kept, the index score is the exact score: Q_S, Q_A are orthogonal, so
  ⟨Ṽ_q, G_m⟩ = Σ_ij U_q,ij V_m,ij. The only error is float16 storage of V_m: each kept value is
  rounded to 2^-11 of itself (or to 2^-25 of its layer's largest value, where float16 is
  subnormal), so |estimate - exact| ≤ 2^-11 Σ_ij |U_q,ij V_m,ij| + 2^-25 Σ_ij |U_q,ij| max|V_m|;
  asserted with 2^-10 and 2^-24 (the exact scorer works in float32 on a float64 model).
- With fewer terms the estimate is the exact score minus the dropped terms; its error falls as
  the budget grows (mean squared error over pairs: falls at every step of 8, 64, 256 terms and all,
  by 4x from 8 to 256).
"""

from __future__ import annotations

import pytest
import torch

from msif_ray.engine.api import Examples, TrackedLM
from msif_ray.engine.index import IndexRows, TermBasis, quantize, rotate_queries, scan
from msif_ray.engine.influence import Chain
from msif_ray.engine.vectors import LayerVectors, QueryVectors
from tiny import SENTENCES, make_model, make_tokenizer


def tiny_lm(tmp_path) -> TrackedLM:
    tokenizer = make_tokenizer()
    model = make_model("gpt_neox", tmp_path / "m", len(tokenizer), seed=0).double()
    return TrackedLM(model, tokenizer, max_length=16, batch_size=3)


DOCS = Examples.documents(SENTENCES[:5] + [" ".join(SENTENCES)])  # the last one spans several windows
QUERIES = Examples.pairs(["Q: a", "Q: b", "Q: c"], [" x", " y", " z"], ["q0", "q1", "q2"])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    lm = tiny_lm(tmp_path_factory.mktemp("lm"))
    return lm, lm.fit_factors(DOCS, fisher="empirical"), lm.fit_factors(QUERIES, fisher="empirical")


def term_bound(lm, factors, vectors) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_ij |U_q,ij V_m,ij| and Σ_ij |U_q,ij| max|V_m| summed over layers: [N, Q] each (dense reference)."""
    grads = lm.gradients(DOCS)
    products = magnitudes = 0
    for name in lm.layers:
        basis = TermBasis.of(None if factors is None else factors.layer(name))
        u = basis.rotate_query(vectors.layers[name]).to_dense().double().abs()
        q_s, q_a = (torch.eye(n, dtype=torch.float64) if basis.s_vectors is None else q.double()
                    for n, q in ((grads[name].shape[1], basis.s_vectors), (grads[name].shape[2], basis.a_vectors)))
        v = (q_s.t() @ grads[name].double() @ q_a).abs()
        products = products + torch.einsum("noi,qoi->nq", v, u)
        magnitudes = magnitudes + v.flatten(1).amax(1)[:, None] * u.flatten(1).sum(1)[None, :]
    return products, magnitudes


@pytest.mark.parametrize("method", ["grad_dot", "single_stage", "multi_stage"])
@pytest.mark.parametrize("rank", [None, 2])
def test_every_term_kept_gives_exact_scores(method, rank, fitted):
    lm, pt, ft = fitted
    factors = None if method == "grad_dot" else pt
    vectors = lm.query_vectors(QUERIES, Chain.of(method, pt, ft), rank=rank).to("cpu", torch.float64)
    exact = lm.score(DOCS, vectors).total
    rows = lm.index(DOCS, terms=10**6, factors=factors)
    assert rows.counts == [s.out_features * s.in_dim for s in lm.taps.specs.values()]
    products, magnitudes = term_bound(lm, factors, vectors)
    error = (lm.index_scores(rows, vectors, factors) - exact).abs()
    assert (error <= 2 ** -10 * products + 2 ** -24 * magnitudes + 1e-6 * exact.abs().max()).all(), float(error.max())


def test_error_falls_as_the_budget_grows(fitted):
    lm, pt, ft = fitted
    vectors = lm.query_vectors(QUERIES, Chain.of("multi_stage", pt, ft), rank=2).to("cpu", torch.float64)
    exact = lm.score(DOCS, vectors).total
    errors = [float(((lm.index_scores(lm.index(DOCS, terms, pt), vectors, pt) - exact) ** 2).mean())
              for terms in (8, 64, 256, 10**6)]
    assert errors == sorted(errors, reverse=True) and errors[2] < errors[0] / 4 and errors[3] < 1e-4 * errors[0], errors


def test_windows_are_summed_per_document_in_any_batch_order(fitted):
    """A document's terms are chosen from its whole gradient: batches sorted by length (its windows
    apart) give the same rows as batches that keep its windows together."""
    from msif_ray.engine.index import document_terms, term_bases

    lm, pt, _ = fitted
    bases = term_bases(list(lm.taps.specs.values()), pt.layer)
    together = document_terms(lm.model, lm.taps, lm.batches(DOCS, by_document=True), len(DOCS), bases, 8)
    apart = document_terms(lm.model, lm.taps, lm.batches(DOCS), len(DOCS), bases, 8)
    assert torch.equal(together.positions, apart.positions)
    torch.testing.assert_close(together.values.float(), apart.values.float(), rtol=1e-3, atol=1e-3)


def test_float16_values_with_layer_scales_keep_scores():
    generator = torch.Generator().manual_seed(0)
    counts = [16, 9, 4]
    values = torch.randn(50, sum(counts), generator=generator) * torch.tensor([1e-7] * 16 + [1e5] * 9 + [1.0] * 4)
    values[3, 16:25] = 0.0  # an all-zero block
    positions = torch.cat([torch.randperm(64, generator=generator)[:c].repeat(50, 1) for c in counts], dim=1).int()
    rows = quantize(values, positions, counts)
    assert rows.values.dtype == torch.float16 and rows.scale.shape == (50, 3)
    assert IndexRows.from_tensors(rows.tensors()).counts == counts
    dense = {name: torch.randn(3, 8, 8, generator=generator, dtype=torch.float64) for name in "abc"}
    vectors = QueryVectors(["q0", "q1", "q2"], {n: LayerVectors(dense=d) for n, d in dense.items()})
    identity = {n: TermBasis(None, None, None) for n in "abc"}
    estimate = scan(rows, rotate_queries(vectors, identity, list("abc")), list("abc"))
    expected = torch.zeros(50, 3, dtype=torch.float64)
    for lo, count, name in zip((0, 16, 25), counts, "abc"):
        block, where = values[:, lo:lo + count].double(), positions[:, lo:lo + count].long()
        expected += torch.einsum("nt,qnt->nq", block, dense[name].flatten(1)[:, where])
    torch.testing.assert_close(estimate, expected, rtol=2e-3, atol=2e-3 * float(expected.abs().max()))


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


def test_normalized_index_mode_equals_exact_mode(world, ray_session, tmp_path):
    """``scoring.normalize: self`` in index mode (estimates and exact re-scores divided alike by the
    stored self-influence) returns exact mode's normalised table when every document is a
    candidate; both runs share one run directory, so the self-influence stage is computed once."""
    settings = {**ALL, "scoring.normalize": "self"}
    exact = run(world, tmp_path, **settings)
    indexed = run(world, tmp_path, **settings, **{"scoring.mode": "index", "scoring.rerank": 1000})
    assert indexed["doc_id"] == exact["doc_id"] and indexed["rank"] == exact["rank"]
    for column in ("score", "raw_score"):
        assert indexed[column] == pytest.approx(exact[column], rel=1e-4, abs=1e-6)
    assert manifest(tmp_path)["stages"]["self_influence"]["outcome"] == "reused"


def test_the_index_pass_gives_the_self_influence(world, ray_session, tmp_path):
    """In index mode with ``scoring.normalize``, the index pass computes each shard's self-influence
    beside its terms (one forward and backward instead of two): the self_influence stage then
    computes no shard, and the values equal the stage's own pass (an exact-mode run) to 1e-12
    relative (float64 sums of the same float32 layer sums, in another order across layer groups).
    An index whose weights come from another λ is not fused: the stage computes every shard."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from msif_ray.distributed.worker import read_self_influence
    from msif_ray.store.layout import self_influence_shard
    from msif_ray.store.storage import RunDir

    settings = {**ALL, "method": "multi_stage", "scoring.normalize": "self", "budget.layer_groups": 2}
    indexed = {"scoring.mode": "index", "scoring.rerank": 4, "index.terms": 16}
    run(world, tmp_path / "exact", **settings)
    run(world, tmp_path / "fused", **settings, **indexed)
    stages = manifest(tmp_path / "fused")["stages"]
    assert stages["self_influence"]["passes"]["self_influence"]["computed"] == 0
    key = stages["self_influence"]["fingerprint"]
    assert key == manifest(tmp_path / "exact")["stages"]["self_influence"]["fingerprint"]
    exact_store, fused_store = RunDir(str(tmp_path / "exact")), RunDir(str(tmp_path / "fused"))
    for shard in manifest(tmp_path / "fused")["shards"]["corpus"]:
        doc_ids = json.loads(exact_store.tensor_header(self_influence_shard(key, shard))["__metadata__"]["doc_ids"])
        expected = read_self_influence(exact_store, key, shard, doc_ids)
        assert read_self_influence(fused_store, key, shard, doc_ids) == pytest.approx(expected, rel=1e-12)

    # a grown corpus under another λ: the index keeps its basis and weights, and indexes the new shard with them,
    # so that shard's self-influence under this λ must come from the stage's own pass, as every other shard's
    extra = tmp_path / "extra.parquet"
    pq.write_table(pa.table({"id": ["new-0", "new-1"], "text": ["Mira Tolsen walked to Elsk.", "Otto Fenn sold bread."]}), extra)
    other = {"factors.damping_pretrain": "auto:0.1", "index.path": str(tmp_path / "fused" / "index"),
             "data.corpus.paths": [str(world.corpus), str(extra)]}
    run(world, tmp_path / "other", **settings, **indexed, **other)
    stages = manifest(tmp_path / "other")["stages"]
    assert stages["index"]["passes"]["index"]["computed"] == 1
    stage = stages["self_influence"]["passes"]["self_influence"]
    assert stage["computed"] == stage["shards_total"] > 1


def test_reranked_scores_are_exact(world, ray_session, exact_all, tmp_path):
    exact = pairs(exact_all)
    table = run(world, tmp_path / "index", **{**ALL, "scoring.top_k": 2, "scoring.mode": "index", "scoring.rerank": 4,
                                              "index.terms": 16})
    assert len(table["doc_id"]) == 4  # 2 queries x top 2
    for pair, score in pairs(table).items():
        assert score == pytest.approx(exact[pair], rel=1e-4, abs=1e-6)
    rerank = manifest(tmp_path / "index")["stages"]["scores"]["passes"]["rerank"]
    assert rerank["documents"] <= 2 * 2 * 4  # (top + bottom) x queries x candidates, at most


def test_rerank_rounds_double_until_the_top_k_stops_changing():
    from msif_ray.engine.topk import rerank_windows, top_changed

    assert rerank_windows(2, 8) == [(0, 2), (2, 4), (4, 8)]
    assert rerank_windows(100, 400) == [(0, 100), (100, 200), (200, 400)]
    assert rerank_windows(3, 10) == [(0, 3), (3, 6), (6, 10)] and rerank_windows(5, 5) == [(0, 5)]
    scores = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 2.0}
    assert top_changed(scores, {"d"}, 2) is False  # b and d tie: b first by doc id
    assert top_changed(scores, {"d"}, 3) and not top_changed(scores, {"c"}, 3)


def test_adaptive_rerank_rounds(world, ray_session, exact_all, tmp_path):
    """Two candidates a query, then 2 and 4 more while a round changes the top 2: each query's
    re-scored count is one of the rounds' ends, its top 2 are the exact best of its first
    ``rescored`` candidates by estimate, and ``msif status`` states the account."""
    from msif_ray.ops.status import describe
    from msif_ray.store.layout import scores_result
    from msif_ray.store.storage import RunDir

    exact = pairs(exact_all)
    settings = {**ALL, "scoring.top_k": 2, "scoring.mode": "index", "scoring.rerank": 2, "scoring.rerank_max": 8,
                "index.terms": 16}
    table = run(world, tmp_path / "index", **settings)
    record = manifest(tmp_path / "index")["stages"]["scores"]
    store = RunDir(str(tmp_path / "index"))
    summary = store.read_parquet(scores_result(record["fingerprint"], "candidates")).to_pylist()
    assert {r["rescored"] for r in summary} <= {2, 4, 8} and len(summary) == 2
    rounds = [name for name in record["passes"] if name.startswith("rerank")]
    assert rounds == ["rerank", "rerank/2", "rerank/3"][: len(rounds)]
    assert max(r["rescored"] for r in summary) == {1: 2, 2: 4, 3: 8}[len(rounds)]
    candidates = {}
    for path in (tmp_path / "index" / "scores" / "scan").rglob("candidates-*.parquet"):
        for row in pq_rows(path):
            if row["side"] == "top":
                candidates.setdefault(row["query_id"], []).append(row["doc_id"])  # in the index's order
    for r in summary:
        first = candidates[r["query_id"]][: r["rescored"]]
        best = sorted(first, key=lambda d: (-exact[(r["query_id"], d)], d))[:2]
        returned = [d for q, d in zip(table["query_id"], table["doc_id"]) if q == r["query_id"]]
        assert returned == best
    assert "re-scored per query" in describe(str(tmp_path / "index"))


def pq_rows(path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


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
    ({"index.terms": 8}, "index.terms"),
    ({"data.max_length": 24}, "data.max_length"),
    ({"modules.include": "mlp"}, "modules"),
    ({"models.finetuned": "PRETRAINED"}, "corpus model"),  # grad_dot: the corpus model is the fine-tuned one
])
def test_an_index_built_for_other_settings_is_refused(override, named, world, ray_session, tmp_path):
    from msif_ray.config import ConfigError

    settings = {"method": "grad_dot", "scoring.mode": "index", "index.path": str(tmp_path / "index"), "index.terms": 16}
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
    settings = {"method": "grad_dot", "scoring.mode": "index", "scoring.rerank": 4, "index.terms": 16,
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
    settings = {"method": "single_stage", "scoring.mode": "index", "index.terms": 16}
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
    assert stages["index"]["passes"]["index"]["computed"] == 0  # the index keeps its own basis


@pytest.mark.slow
@pytest.mark.parametrize("pass_name, stage", [("index", "index"), ("rotate", "scores"), ("scan", "scores"),
                                             ("rerank", "scores")])
def test_worker_killed_in_an_index_pass(pass_name, stage, world, ray_session, tmp_path, monkeypatch):
    """A worker dies (os._exit) in a pass of index mode: the run completes, equal to an uninterrupted one."""
    from msif_ray.pipeline.run import FAULT_ENV

    settings = {"method": "grad_dot", "scoring.mode": "index", "index.terms": 16, "scoring.rerank": 3,
                "ray.num_workers": 2}
    reference = run(world, tmp_path / "reference", **settings)
    monkeypatch.setenv(FAULT_ENV, pass_name)
    assert run(world, tmp_path / "killed", **settings) == reference
    assert (tmp_path / "killed" / "_faults" / pass_name).exists(), "the fault was not injected"
    assert manifest(tmp_path / "killed")["stages"][stage]["passes"][pass_name]["retried_after_crash"]
