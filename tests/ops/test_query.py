"""``msif query``: ad hoc queries against a finished index-mode run give the documents and exact
scores ``msif run`` gives the same queries (the same engine functions, in one process)."""

from __future__ import annotations


import pyarrow.parquet as pq
import pytest

from msif_ray.cli import main
from msif_ray.config import config_from_dict
from msif_ray.ops.query import QueryError, ask
from msif_ray.pipeline.run import Pipeline
from msif_ray.store.data import read_pairs
from msif_ray.store.layout import TOPK

# Few candidates, so that which documents the index proposes matters: top 3 of 6 candidates of 14
# in one round, or of 2, then 2 more, then 4 more while a round changes the top 3.
SETTINGS = {"method": "multi_stage", "scoring.mode": "index", "scoring.top_k": 3, "index.terms": 16}
ROUNDS = {"one round": {"scoring.rerank": 6, "scoring.rerank_max": 6},
          "rounds": {"scoring.rerank": 2, "scoring.rerank_max": 8},
          "normalised rounds": {"scoring.rerank": 2, "scoring.rerank_max": 8, "scoring.normalize": "unit"}}


@pytest.fixture(scope="module", params=list(ROUNDS))
def index_run(request, world, ray_session, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("index-run")
    settings = SETTINGS | ROUNDS[request.param]
    Pipeline(config_from_dict(world.config(run_dir, **settings), base_dir=world.root), log=lambda line: None).run()
    return run_dir


def test_ad_hoc_queries_equal_the_run(world, index_run):
    """The run's own queries, asked again: the same top documents in the same order; scores within
    1e-5 relative (the query gradients are batched differently: float32 reduction order)."""
    from msif_ray.store.layout import read_manifest, scores_result
    from msif_ray.store.storage import RunDir

    table = pq.read_table(index_run / TOPK).to_pylist()
    store = RunDir(str(index_run))
    rescored = store.read_parquet(scores_result(read_manifest(store)["stages"]["scores"]["fingerprint"], "candidates"))
    rescored = dict(zip(rescored["query_id"].to_pylist(), rescored["rescored"].to_pylist()))
    queries = read_pairs([str(world.queries)], "prompt", "completion", "id")
    answers = ask(str(index_run), queries, log=lambda line: None)
    for answer in answers:
        expected = [r for r in table if r["query_id"] == answer.query_id]
        assert [r.doc_id for r in answer.top] == [r["doc_id"] for r in expected]
        assert [r.score for r in answer.top] == pytest.approx([r["score"] for r in expected], rel=1e-5, abs=1e-8)
        assert answer.candidates == rescored[answer.query_id] and all(r.text for r in answer.top)


def test_the_command_prints_the_top_documents_with_their_text(world, index_run, capsys):
    (query,) = [q for q in read_pairs([str(world.queries)], "prompt", "completion", "id") if q.id == "q0"]
    assert main(["query", str(index_run), "--prompt", query.prompt, "--completion", query.completion, "--id", "q0",
                 "--top", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    top = [r for r in pq.read_table(index_run / TOPK).to_pylist() if r["query_id"] == "q0"][:2]
    first = next(i for i, line in enumerate(out) if line.startswith("query q0: top 2 of "))
    assert [line.split()[2] for line in out[first + 1 : first + 3]] == [r["doc_id"] for r in top]
    assert all(len(line.split()) > 3 for line in out[first + 1 : first + 3])  # each with the start of its text


def test_a_run_in_exact_mode_is_refused(world, ray_session, tmp_path, capsys):
    run_dir = tmp_path / "exact"
    Pipeline(config_from_dict(world.config(run_dir, **{"method": "grad_dot"}), base_dir=world.root),
             log=lambda line: None).run()
    with pytest.raises(QueryError, match="needs a run with scoring.mode: index"):
        ask(str(run_dir), read_pairs([str(world.queries)], "prompt", "completion", "id"))
    assert main(["query", str(tmp_path / "nothing"), "--prompt", "a", "--completion", " b"]) == 2
    assert "no finished run here" in capsys.readouterr().err
