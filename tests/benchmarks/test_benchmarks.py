"""The quality benchmarks at their --smoke sizes (so none can rot), and the pieces they rest on.

The smoke runs check that each benchmark runs end to end and writes its JSON and PNG; the figures
of a smoke world (a model trained for seconds) mean nothing and are not asserted, except where a
result is exact by construction. The solvers and metrics the figures rest on are checked against
independent references.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_exact_influence  # noqa: E402
import bench_fact_tracing  # noqa: E402
import bench_lds  # noqa: E402
import bench_query  # noqa: E402
from common import load_world, pearson, query_entity, ranks, retrieval, spearman  # noqa: E402

from msif_ray.demo import toy  # noqa: E402
from msif_ray.demo.toy import ToySpec  # noqa: E402


@pytest.fixture(autouse=True)
def bench_cache(tmp_path_factory, monkeypatch):
    """Built worlds go to one temp cache per test session, never to the user's."""
    monkeypatch.setenv("MSIF_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bench-cache"))


def _outputs(payload_dir: Path, name: str) -> dict:
    json_path, png_path = payload_dir / f"{name}.smoke.json", payload_dir / f"{name}.smoke.png"
    assert png_path.stat().st_size > 1000
    return json.loads(json_path.read_text())


# --------------------------------------------------------------------------- solvers and metrics


def test_woodbury_and_cg_match_a_dense_solve():
    g = torch.Generator().manual_seed(0)
    j = torch.randn(30, 80, generator=g, dtype=torch.float64)
    v = torch.randn(3, 80, generator=g, dtype=torch.float64)
    damping = 0.05
    dense = torch.linalg.solve(j.t() @ j / 30 + damping * torch.eye(80, dtype=torch.float64), v.t()).t()
    torch.testing.assert_close(bench_exact_influence.woodbury_inverse(j, damping, v), dense, rtol=1e-10, atol=1e-12)
    x, iterations = bench_exact_influence.conjugate_gradient(j, damping, v)
    # CG stops at a relative residual of 1e-6; the error is at most that times the condition number (~1e2 here).
    assert float((x - dense).norm() / dense.norm()) < 1e-4
    assert iterations < 200


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ekfac_positive_control_matches_exact_where_its_assumption_holds(seed):
    """One linear layer fitted to convergence, N = 20,000 ≫ P = 28, a Fisher that is diagonal in the
    Kronecker eigenbasis but not Kronecker (the noise grows with one input direction).

    EK-FAC's only error there is sampling (its Λ is the exact diagonal of the sampled Fisher in a
    basis estimated from the same samples), so at the engine's ``auto`` damping it must track the
    dense solve (Pearson ≥ 0.95; 0.98-0.99 measured over six seeds), and K-FAC, whose d_S ⊗ d_A is
    off by up to 5x along the noisy direction, must fall visibly short (by ≥ 0.04; 0.05-0.15
    measured). A wrong rotation or Λ in the engine's correction would fail the first bound.
    """
    control = bench_exact_influence.linear_control(seed=seed)
    for chain in ("single_stage", "multi_stage"):
        at_auto = control[chain][str(0.1)]
        assert at_auto["EK-FAC"] >= 0.95, (chain, at_auto)
        assert at_auto["K-FAC"] <= at_auto["EK-FAC"] - 0.04, (chain, at_auto)
    for stage, error in control["fisher_relative_error"].items():
        # Λ is the best diagonal in its basis (George et al. 2018), so EK-FAC never loses in Frobenius norm.
        assert error["EK-FAC"] < 0.8 * error["K-FAC"], (stage, error)


def test_retrieval_metrics_and_rank_correlations_by_hand():
    scores = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.5, 0.7], [0.1, 0.2]])
    # Query 0: gold {2}; doc 2 ties doc 1 at 0.5 and ties go against gold -> rank 3.
    # Query 1: gold {2, 3}: ranks 1 and 3.
    m = retrieval(scores, [[2], [2, 3]], cutoffs=(1, 2))
    assert m["mrr"] == pytest.approx((1 / 3 + 1) / 2)
    assert m["recall@1"] == pytest.approx((0 + 0.5) / 2)
    assert m["recall@2"] == pytest.approx((0 + 0.5) / 2)
    # Four gold documents tied at the top (BM25 on the same words): ranks 1-4, not 1 each.
    tied = retrieval(torch.tensor([[2.0], [2.0], [2.0], [2.0], [1.0]]), [[0, 1, 2, 3]], cutoffs=(1, 4))
    assert (tied["mrr"], tied["recall@1"], tied["recall@4"]) == (1.0, 0.25, 1.0)
    assert ranks(torch.tensor([[3.0], [1.0], [2.0], [2.0]])).flatten().tolist() == [3.0, 0.0, 1.5, 1.5]
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(spearman(x, x.exp()), torch.ones(2, dtype=torch.float64))  # monotone: rank correlation 1
    assert torch.allclose(pearson(x, 3 * x + 1), torch.ones(2, dtype=torch.float64))
    assert float(pearson(x[:, :1], -x[:, :1])) == pytest.approx(-1)


def test_lds_is_one_for_an_exactly_additive_model():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(40, 3, generator=g, dtype=torch.float64)
    masks = torch.rand(25, 40, generator=g) < 0.5
    measured = masks.double() @ scores + 7.0
    assert torch.allclose(bench_lds.lds(scores, masks, measured), torch.ones(3, dtype=torch.float64))
    assert float(bench_lds.lds(-scores, masks, measured).mean()) == pytest.approx(-1)


# --------------------------------------------------------------------------- the generated world


def test_distractors_share_entity_or_value_and_state_no_fact():
    spec = replace(ToySpec.small(), entity_distractors=2, value_distractors=1)
    rng = random.Random(0)
    facts = toy.make_facts(spec, rng)
    corpus = toy.make_corpus(facts, spec, rng)
    values = {}
    for f in facts:
        values.setdefault(f.entity, set()).add(f.value)
    entity_docs = [d for d in corpus if d.get("distractor", ("",))[0] == "entity"]
    value_docs = [d for d in corpus if d.get("distractor", ("",))[0] == "value"]
    assert len(entity_docs) == 2 * spec.num_entities
    assert len(value_docs) == sum(len(v) for v, _, _ in toy.RELATIONS.values())
    for d in entity_docs:
        entity = d["distractor"][1]
        assert entity in d["text"] and not any(v in d["text"] for v in values[entity])
    for d in value_docs:
        assert d["distractor"][1] in d["text"] and not any(e in d["text"] for e in values)
    # Gold documents are still exactly the documents that name an entity and one of its values.
    for f in facts:
        naming = [d for d in corpus if f.entity in d["text"] and f.value in d["text"]]
        assert all(d["fact"] == f for d in naming) and len(naming) == spec.paraphrases_per_fact


def test_alias_world_states_facts_under_aliases_and_links_them_apart():
    spec = replace(ToySpec.small(), entity_distractors=1, value_distractors=1, alias_links=3)
    rng = random.Random(0)
    facts = toy.make_facts(spec, rng)
    corpus = toy.make_corpus(facts, spec, rng)
    aliases = {f.entity: f.alias for f in facts}
    name_words = {w for name in aliases for w in name.split()}
    assert len(set(aliases.values())) == spec.num_entities
    assert not any(w in name_words for alias in aliases.values() for w in alias.split())
    for d in corpus:  # only a link names both; no fact document or distractor names a person by name
        named = [e for e in aliases if e in d["text"]]
        assert named == ([d["link"]] if "link" in d else [])
    for entity, alias in aliases.items():
        links = [d for d in corpus if d.get("link") == entity]
        assert len(links) == spec.alias_links and all(alias in d["text"] for d in links)
    for f in facts:  # the gold documents are exactly those naming the alias and the value
        naming = [d for d in corpus if f.alias in d["text"] and f.value in d["text"]]
        assert all(d["fact"] == f for d in naming) and len(naming) == spec.paraphrases_per_fact


def test_default_spec_draws_the_same_world_as_before_distractors():
    """No distractors asked for: no random draw is added, so the demo's world is unchanged."""
    spec = ToySpec.small()
    with_fields = toy.make_corpus(toy.make_facts(spec, random.Random(3)), spec, random.Random(4))
    assert all("distractor" not in d for d in with_fields)
    assert len(with_fields) == 12 * 2 * spec.paraphrases_per_fact + spec.num_filler_docs


# --------------------------------------------------------------------------- smoke runs


@pytest.mark.slow
def test_fact_tracing_smoke(tmp_path):
    payload = bench_fact_tracing.main(["--smoke", "--out-dir", str(tmp_path)])
    saved = _outputs(tmp_path, "fact_tracing")
    assert saved["summary"].keys() == payload["summary"].keys() >= set(bench_fact_tracing.MAIN)
    # BM25 sees the entity's name and the answer in the query: on this world it must find a gold document first.
    assert saved["summary"]["bm25"]["mrr"]["mean"] == pytest.approx(1.0)
    for kinds in saved["top10_kinds"].values():
        assert sum(kinds.values()) == pytest.approx(1.0)
    for seed in saved["per_seed"]:  # the default is chosen on one half of the people, measured on the other
        held_out = seed["held_out"]
        assert held_out["dev_queries"] + held_out["test_queries"] == seed["num_queries"]
        assert held_out["chosen"] in held_out["test"] and "bm25" not in held_out["chosen"]
    rows = saved["held_out"]["rows"]
    lo, hi = rows["chosen on dev (per seed)"]["mrr_interval"]
    assert lo <= rows["chosen on dev (per seed)"]["mrr"] <= hi


@pytest.mark.slow
def test_fact_tracing_alias_world_smoke(tmp_path):
    """The alias world: no gold document names its query's person, so BM25 over the query no longer finds them."""
    payload = bench_fact_tracing.main(["--smoke", "--alias-links", "3", "--name", "fact_tracing_aliases",
                                       "--out-dir", str(tmp_path)])
    saved = _outputs(tmp_path, "fact_tracing_aliases")
    assert saved["spec"]["alias_links"] == 3 and saved["summary"].keys() == payload["summary"].keys()
    lw = load_world(replace(bench_fact_tracing.SMOKE, alias_links=3), 0, log=lambda line: None)
    texts = dict(zip(lw.doc_ids, lw.texts))
    for q in lw.queries:
        name, value = query_entity(q), q["completion"].strip()
        assert all(value in texts[g] and not set(name.split()) & set(re.findall(r"\w+", texts[g]))
                   for g in q["gold_doc_ids"])
    # With the name it finds the person's links; the answer alone is shared by other people's facts and distractors.
    assert saved["summary"]["bm25"]["mrr"]["mean"] < 0.5
    assert saved["held_out"]["rows"]["bm25 (sees the names)"]["mrr"] < 0.5
    for kinds in saved["top10_kinds"].values():
        assert set(kinds) == set(bench_fact_tracing.ALIAS_KINDS) and sum(kinds.values()) == pytest.approx(1.0)


@pytest.mark.slow
def test_exact_influence_smoke(tmp_path):
    bench_exact_influence.main(["--smoke", "--out-dir", str(tmp_path)])
    saved = _outputs(tmp_path, "exact_influence")
    for seed in saved["per_seed"]:
        # Woodbury and CG are independent solvers of the same float64 system.
        assert seed["cg_check"]["relative_difference"] < 1e-4
    assert -1 <= saved["at_auto"]["multi_stage"]["pearson"]["mean"] <= 1


@pytest.mark.slow
def test_lds_smoke(tmp_path):
    bench_lds.main(["--smoke", "--out-dir", str(tmp_path)])
    saved = _outputs(tmp_path, "lds")
    assert saved["num_subsets"] == 4 and set(saved["results"]) >= {"multi_stage", "single_stage", "bm25", "random"}


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--out", str(out), "--workdir", str(tmp_path)],
                   check=True, env=env, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    assert set(report["throughput"]["tiny"]["passes"]) == {"bare", "cov", "lambda", "score"}
    # CPU against CPU: the same computation twice must agree exactly (the plumbing of the GPU comparison).
    assert report["agreement"]["empirical"]["pearson_min"] > 0.999999


@pytest.mark.slow
def test_vs_kronfluence_smoke(tmp_path):
    """The like-for-like harness: both sides, each a fresh process, score the same (document, query)
    pairs and agree. Full rank on both sides, the empirical Fisher, the same windows and damping
    rule: the scores differ only by float32 rounding in another order (measured: Pearson 1 - 1e-7),
    so 0.999 leaves room for the machine and none for an unlike setting."""
    import bench_vs_kronfluence

    bench_vs_kronfluence.main(["--smoke", "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "vs_kronfluence_smoke.json").read_text())
    assert (tmp_path / "vs_kronfluence_smoke.png").stat().st_size > 1000
    sizes = saved["sizes"]
    for side in ("msif", "msif r32"):
        assert saved["agreement"][side]["pairs"] == sizes["documents"] * sizes["queries"]
    assert saved["agreement"]["msif"]["pearson_min"] >= 0.999
    assert saved["agreement"]["msif r32"]["pearson_min"] >= 0.99  # rank 32 of a full-rank query: close, not equal
    for side, figures in saved["summary"].items():
        wall = figures["process wall"]
        assert 0 < wall["min"] <= wall["median"] <= wall["max"]
        assert figures["until the scores"]["median"] < wall["median"]  # the process holds its whole run
    assert saved["summary"]["msif"]["factors/pretrain: covariance"]["median"] > 0
    assert set(saved["ratios_process_wall"]) == {"msif", "msif r32"}


@pytest.mark.slow
def test_index_smoke(tmp_path, ray_session):
    import bench_index

    bench_index.main(["--smoke", "--out-dir", str(tmp_path)])
    saved = _outputs(tmp_path, "index")
    assert set(saved["sections"]) == set(bench_index.SECTIONS)
    designs = saved["sections"]["designs"]["smoke"]
    assert designs["num_documents"] < 100 and {e["design"] for e in designs["designs"].values()} == {
        "sketch", "eigen block", "top terms"}
    for entry in designs["designs"].values():
        # Re-ranking every document (R >= N) returns exact mode's top 10, and its gold MRR.
        assert entry["rerank 100"] == pytest.approx(1.0)
        assert entry["gold MRR, index + rerank 100"] == pytest.approx(designs["exact_gold"]["mrr"])
        assert -1 <= entry["pearson"] <= 1 and entry["x_bare"] > 0
    rounds = next(e["rounds"] for e in designs["designs"].values() if "rounds" in e)
    assert 0 <= rounds["missing and flagged"] <= min(rounds["queries missing a document"], rounds["queries flagged still changing"])
    assert rounds["queries missing a document"] == 0 or rounds["top-10 overlap"] < 1
    assert 5 <= rounds["rescored per query"] <= 20
    scale = saved["sections"]["scale"]
    assert scale["facts"]["index shards computed in (2) (must be 0)"] == 0
    assert scale["facts"]["duplicate texts dropped"] >= 0 and scale["facts"]["documents"] > 300
    assert 0 < scale["speed"]["ratio: (3) exact scores / (2) new-query work"]


@pytest.mark.slow
def test_nightly_smoke(tmp_path):
    """Six ``msif nightly`` processes on the small scale world (~5 min on 2 shared cores): what each
    night recomputed must follow what changed."""
    import bench_nightly

    bench_nightly.main(["--smoke", "--out-dir", str(tmp_path), "--workdir", str(tmp_path / "work")])
    saved = _outputs(tmp_path, "nightly")
    nights = saved["nights"]
    assert list(nights) == [name for _, name in bench_nightly.NIGHTS] + [bench_nightly.EXACT[1]]
    recomputed = {name: {s for s, stage in n["stages"].items() if stage["recomputed"]} for name, n in nights.items()}
    first, nothing, queries, corpus, finetune = (name for _, name in bench_nightly.NIGHTS)
    assert recomputed[first] == {"factors/finetune", "factors/pretrain", "queries", "index", "scores"}
    assert recomputed[nothing] == set()
    assert recomputed[queries] == {"queries", "scores"}
    assert recomputed[corpus] == {"index", "scores"}  # the pre-training factors are kept
    assert nights[corpus]["stages"]["index"]["shards_computed"] == 1
    assert recomputed[finetune] == {"factors/finetune", "queries", "scores"}
    assert nights[finetune]["stages"]["index"]["shards_computed"] == 0
    assert nights[first]["fraction_of_night_1"] == 1.0 and all(n["wall_seconds"] > 0 for n in nights.values())


@pytest.mark.slow
def test_readers_smoke(tmp_path):
    """Every corpus form is read, token forms skip the tokenizer, and no reader is slower than the
    covariance pass (even the smoke model's, ~1k tok/s, against readers at ~100k tok/s and more)."""
    import bench_readers

    bench_readers.main(["--smoke", "--out-dir", str(tmp_path)])
    saved = _outputs(tmp_path, "readers")
    forms = saved["forms"]
    assert set(forms) == {"parquet", "jsonl", "jsonl.gz", "jsonl.zst", "save_to_disk", "parquet tokens", "megatron",
                          "npy", "raw uint16x256"}
    assert all(f["read"]["median"] == f["read+tokenize"]["median"] for f in forms.values() if not f["text"])
    assert all(f["ratio"]["read+tokenize"] > 1 for f in forms.values())


@pytest.mark.slow
def test_query_latency_smoke(ray_session, tmp_path):
    """``msif query`` timed on the small toy world in index mode: a fresh process and four calls in this one."""
    out = bench_query.main(["--smoke", "--workdir", str(tmp_path / "work"), "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "query.smoke.json").read_text())
    assert saved["fresh_process_s"] == out["fresh_process_s"] > 0 and len(saved["ask_s"]) == 4
    assert saved["candidates_rescored"] > 0 and set(saved["last_call_steps_s"]) == {"precondition", "scan", "rerank"}
