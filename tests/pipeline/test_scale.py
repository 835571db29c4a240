"""The memory-bounded forms of the engine against their exact counterparts.

- Query vectors through the token-factor chain (``TrackedLM.query_vectors``) equal the dense
  reference chain (``precondition`` on autograd-style dense gradients) at full rank, for every
  method; at rank r they equal the best rank-r approximation of the dense Ṽ (float64, rtol 1e-8).
- The three scoring forms (dense, G-form, factored) agree (float64, rtol 1e-10: same sums, other order).
- The randomized truncated SVD is within 1% of the optimal rank-r error.
- Worker checkpoints: the exactly-once rules of ``committed_checkpoints`` under crashes between writes.
- The plan refuses a budget too small for the model, naming the knob.
"""

from __future__ import annotations

import pytest
import torch

from msif_ray.engine.curvature import CovarianceSums
from msif_ray.distributed.checkpoints import Accumulation, committed_checkpoints
from msif_ray.engine.influence import Chain, precondition, truncated_svd
from msif_ray.engine.api import Examples, TrackedLM
from msif_ray.engine.vectors import LayerVectors
from msif_ray.engine.scoring import layer_operands, layer_scores
from msif_ray.store.storage import RunDir
from tiny import SENTENCES, make_model, make_tokenizer

PROMPTS = ["Q: Where was Mira Tolsen born? A:", "Rain fell on the", "Numbers like 12"]
COMPLETIONS = [" Elsk", " hills all night", ", 345 and 6789 appear"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    tokenizer = make_tokenizer(root / "tok")
    kw = dict(max_length=8, batch_size=2)  # short windows: queries span several windows
    pt = TrackedLM(make_model("gpt_neox", root / "pt", len(tokenizer), seed=0, dtype=torch.float64), tokenizer, **kw)
    ft = TrackedLM(make_model("gpt_neox", root / "ft", len(tokenizer), seed=1, dtype=torch.float64), tokenizer, **kw)
    pt_factors = pt.fit_factors(Examples.documents(SENTENCES), fisher="sampled")
    ft_factors = ft.fit_factors(Examples.pairs(PROMPTS, COMPLETIONS), fisher="empirical")
    return pt, ft, pt_factors, ft_factors


@pytest.mark.parametrize("method", ["multi_stage", "single_stage", "grad_dot"])
def test_token_factor_chain_equals_dense_chain(models, method):
    pt, ft, pt_factors, ft_factors = models
    queries = Examples.pairs(PROMPTS, COMPLETIONS, ids=["a", "b", "c"])
    chain = Chain.of(method, pt_factors, ft_factors, damping_pretrain="auto", damping_finetune=0.01)
    dense = precondition(ft.gradients(queries), method, pt_factors, ft_factors, "auto", 0.01)
    full = ft.query_vectors(queries, chain, rank=None)
    assert full.ids == ["a", "b", "c"]
    for name, v in dense.items():
        torch.testing.assert_close(full.layers[name].dense, v, rtol=1e-8, atol=1e-12)
    # Rank 5 takes the exact SVD on these 16-wide layers; rank 1 the randomized one (near-optimal error).
    for rank, exact in ((5, True), (1, False)):
        low = ft.query_vectors(queries, chain, rank=rank)
        for name, v in dense.items():
            u, s, vh = torch.linalg.svd(v)
            best = u[..., :rank] @ torch.diag_embed(s[..., :rank]) @ vh[..., :rank, :]
            if exact:
                torch.testing.assert_close(low.layers[name].to_dense(), best, rtol=1e-8, atol=1e-10)
            else:
                error = torch.linalg.matrix_norm(v - low.layers[name].to_dense())
                assert (error <= 1.01 * torch.linalg.matrix_norm(v - best) + 1e-12).all()
    # Scores with the low-rank vectors equal scores with their dense reconstruction.
    documents = Examples.documents(SENTENCES)
    reconstructed = {name: v.to_dense() for name, v in low.layers.items()}
    torch.testing.assert_close(pt.score(documents, low).total, pt.score(documents, reconstructed).total,
                               rtol=1e-9, atol=1e-12)


def test_scoring_forms_agree():
    generator = torch.Generator().manual_seed(0)
    batch, tokens, out, inp, queries, rank = 3, 5, 7, 6, 4, 2
    a = torch.randn(batch, tokens, inp, generator=generator, dtype=torch.float64)
    s = torch.randn(batch, tokens, out, generator=generator, dtype=torch.float64)
    left = torch.randn(queries, out, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(queries, inp, rank, generator=generator, dtype=torch.float64)
    low = LayerVectors(left=left, right=right)
    dense = LayerVectors(dense=low.to_dense())
    want = torch.einsum("bto,qoi,bti->bq", s, dense.dense, a)
    ops = layer_operands(low, torch.device("cpu"), torch.float64)
    for form in ("gform", "factored"):
        torch.testing.assert_close(layer_scores(a, s, ops, queries, form), want, rtol=1e-10, atol=1e-12)
    dense_ops = layer_operands(dense, torch.device("cpu"), torch.float64)
    torch.testing.assert_close(layer_scores(a, s, dense_ops, queries), want, rtol=1e-10, atol=1e-12)


def test_randomized_truncated_svd_is_near_optimal():
    generator = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(300, 300, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(200, 200, generator=generator, dtype=torch.float64)).Q
    spectrum = torch.logspace(0, -4, 200, dtype=torch.float64)
    m = (u[:, :200] * spectrum) @ v.t()
    for rank in (4, 16):
        left, sigma, right = truncated_svd(m[None], rank)
        error = torch.linalg.norm(m - (left[0] * sigma[0]) @ right[0].t())
        optimal = torch.linalg.norm(spectrum[rank:])
        assert error <= 1.01 * optimal


def test_checkpoints_count_each_shard_once(tmp_path):
    store = RunDir(str(tmp_path))
    folder = "factors/pretrain/k/covariance/g0"

    def sums(value: float) -> CovarianceSums:
        return CovarianceSums({"l": torch.full((2, 2), value)}, {"l": torch.full((1, 1), value)}, 1, 1)

    first = Accumulation(store, folder, interval=0.0, sums=sums(1.0))
    first.added("s1", {"tokens": 1})
    name_1 = first.commit()
    first.sums.activation["l"] += 2.0
    first.added("s2", {"tokens": 1})
    name_2 = first.commit()  # cumulative: replaces name_1
    assert committed_checkpoints(store, folder) == {name_2: {"s1": {"tokens": 1}, "s2": {"tokens": 1}}}
    assert not store.exists(name_1)

    # A crash between writing the new marker and removing the old one: the old one is replaced.
    store.save_tensors(name_1, sums(1.0).to_tensors())
    store.write_json(name_1 + ".json", {"shards": {"s1": {"tokens": 1}}, "replaces": []})
    assert list(committed_checkpoints(store, folder)) == [name_2]

    # Tensors written but no marker yet: not committed. A marker whose tensors are gone: not valid.
    second = Accumulation(store, folder, interval=0.0, sums=sums(5.0))
    second.added("s3", {"tokens": 1})
    orphan = f"{folder}/{second.worker}-00000.safetensors"
    store.save_tensors(orphan, sums(5.0).to_tensors())
    assert set(committed_checkpoints(store, folder)) == {name_2}
    store.write_json(orphan + ".json", {"shards": {"s3": {}}, "replaces": []})
    store.remove(orphan)
    assert set(committed_checkpoints(store, folder)) == {name_2}

    # Two valid checkpoints that share a shard: only the first is kept (its shard counts once).
    store.save_tensors(orphan, sums(5.0).to_tensors())
    store.write_json(orphan + ".json", {"shards": {"s2": {}, "s3": {}}, "replaces": []})
    valid = committed_checkpoints(store, folder)
    assert sum("s2" in shards for shards in valid.values()) == 1


def test_tree_merge_equals_a_global_sort(ray_session, tmp_path):
    """Partials of 23 shards merged by a tree of fan-in 3 (three levels) give exactly the k best and
    k worst documents per query of a global sort of all (query, document) scores."""
    import numpy as np
    import pyarrow as pa

    from msif_ray.distributed.merge import tree_merge
    from msif_ray.store.layout import BOTTOMK, TOPK
    from msif_ray.engine.topk import extremes_table

    store = RunDir(str(tmp_path))
    rng = np.random.default_rng(0)
    queries, k, every = ["qa", "qb", "qc"], 4, []
    names = []
    for shard in range(23):
        docs = [f"s{shard:02d}-d{d}" for d in range(int(rng.integers(1, 7)))]
        totals = torch.tensor(rng.standard_normal((len(docs), len(queries))).round(1))  # rounding makes ties
        every += [(q, d, float(totals[i, j])) for i, d in enumerate(docs) for j, q in enumerate(queries)]
        names.append(f"partials/{shard}.parquet")
        store.write_parquet(names[-1], extremes_table(queries, docs, totals, k))
    assert tree_merge(store, names, k, lambda level, i: f"merge/{level}-{i}.parquet", fan_in=3) == 3
    for name, sign in ((TOPK, -1), (BOTTOMK, 1)):
        got = store.read_parquet(name).to_pylist()
        want = []
        for q in queries:
            rows = sorted((r for r in every if r[0] == q), key=lambda r: (sign * r[2], r[1]))[:k]
            want += [{"query_id": q, "rank": i + 1, "doc_id": d, "score": s} for i, (_, d, s) in enumerate(rows)]
        assert got == want
    assert store.read_parquet(TOPK).schema == pa.schema([("query_id", pa.string()), ("rank", pa.int32()),
                                                         ("doc_id", pa.string()), ("score", pa.float64())])
