"""``msif tune``: trials of swept settings on labelled development queries, scored by where their
gold documents rank, in the config's run directory (stages reused by content key), which keeps its
own result."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml

from msif_ray.cli import main
from msif_ray.config import load_config
from msif_ray.ops.tune import read_gold, retrieval_metrics, trial_settings
from msif_ray.store.layout import MANIFEST, TOPK, TUNE_TRIALS, scores_result


def test_retrieval_metrics_by_hand():
    ranked = {"a": ["x", "g1", "y", "g2"], "b": ["g3"] + [f"d{i}" for i in range(12)], "c": ["x", "y"]}
    gold = {"a": {"g1", "g2"}, "b": {"g3", "late"}, "c": {"g4"}}
    mrr, (lo, hi), recall = retrieval_metrics(ranked, gold)
    assert mrr == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert recall == pytest.approx((2 / 2 + 1 / 2 + 0) / 3)
    assert 0 <= lo <= mrr <= hi <= 1


def test_trials_skip_settings_a_method_does_not_have():
    trials = trial_settings(["multi_stage", "single_stage", "grad_dot"], ["auto:0.01", "auto"], ["auto"], ["none", "self"])
    assert len(trials) == 2 * 2 + 2 * 2 + 2  # grad_dot: normalisation only
    assert {"method": "grad_dot", "scoring.normalize": "self"} in trials
    assert all("factors.damping_finetune" not in t for t in trials if t["method"] != "multi_stage")


@pytest.mark.parametrize("lines, fragment", [
    (['{"query_id": "q0", "doc_ids": ["fact-0"]}'], "no gold documents for queries ['q1']"),
    (['{"query_id": "q0", "doc_ids": []}'], "at least one doc id"),
    (["not json"], "line 1: invalid JSON"),
    (['{"query_id": "q0", "doc_ids": ["a"]}', '{"query_id": "q1", "doc_ids": ["b"]}',
      '{"query_id": "q9", "doc_ids": ["c"]}'], "queries ['q9'] are not in --queries"),
])
def test_bad_gold_labels_are_named(lines, fragment, tmp_path):
    path = tmp_path / "gold.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as error:
        read_gold(str(path), ["q0", "q1"])
    assert str(path) in str(error.value) and fragment in str(error.value)


def test_tune_reuses_factors_scores_each_trial_and_keeps_the_run_result(world, ray_session, tmp_path, capsys):
    """Two methods x two dampings x two normalisations on the world's queries (gold: each person's
    two birth documents): every trial's MRR equals the one computed by hand from its own stored
    top k; the pre-training factors are fitted by the first run and reused by every trial; the
    run directory's result is the same file afterwards; the best config is written and loads."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(world.config(tmp_path / "run", **{"factors.fisher": "empirical"})))
    assert main(["run", str(config)]) == 0
    before = (tmp_path / "run" / TOPK).read_bytes()
    gold = tmp_path / "gold.jsonl"
    gold.write_text("".join(json.dumps({"query_id": f"q{i}", "doc_ids": [f"fact-{i}", f"para-{i}"]}) + "\n"
                            for i in range(2)))
    capsys.readouterr()
    assert main(["tune", str(config), "--queries", str(world.queries), "--gold", str(gold),
                 "--method", "multi_stage,single_stage", "--damping-pretrain", "auto:0.01,auto:1",
                 "--normalize", "none,self"]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("method  "):].splitlines()
    assert len([line for line in table if line.startswith(("multi_stage", "single_stage"))]) == 8
    assert "best: method" in printed

    run_dir = tmp_path / "run"
    assert (run_dir / TOPK).read_bytes() == before
    manifest = json.loads((run_dir / MANIFEST).read_text())
    assert manifest["stages"]["factors/pretrain"]["outcome"] == "reused"
    # fitted once per corpus model (θ_pt for multi_stage, θ_ft for single_stage), whatever the damping
    assert len([p for p in (run_dir / "factors" / "pretrain").iterdir() if p.is_dir()]) == 2
    trials = json.loads((run_dir / TUNE_TRIALS).read_text())["trials"]
    assert len({t["scores_key"] for t in trials}) == 8
    for trial in trials:
        rows = pq.read_table(run_dir / scores_result(trial["scores_key"], "topk")).to_pylist()
        reciprocal = []
        for query in ("q0", "q1"):
            ranks = [r["rank"] for r in rows if r["query_id"] == query and r["doc_id"] in (f"fact-{query[1]}", f"para-{query[1]}")]
            reciprocal.append(1 / min(ranks) if ranks else 0.0)
        assert trial["mrr"] == pytest.approx(sum(reciprocal) / 2)
        assert max(r["rank"] for r in rows) == 10  # top_k raised to 10 for Recall@10

    tuned = load_config(tmp_path / "config.tuned.yaml")
    assert tuned.data.queries.paths == load_config(config).data.queries.paths
    assert tuned.method in ("multi_stage", "single_stage") and tuned.scoring.normalize in ("none", "self")
    assert tuned.factors.damping_pretrain in ("auto:0.01", "auto:1")
