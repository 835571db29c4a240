"""``msif run`` on local Ray (CPU): worker counts, crashes of workers and of the driver, reruns.

Scores are compared with rtol 1e-4: a worker sums the factor statistics of the shards it is given
in float32, and which worker gets which shard varies from run to run, so the factors differ by
float32 summation order (~1e-6 relative, seen), which the eigendecompositions and the damped
inverse carry into the scores. Rankings must agree exactly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from msif_ray.config import DEFAULT_DAMPING_PRETRAIN, config_from_dict
from msif_ray.pipeline.run import FAULT_ENV, Pipeline
from msif_ray.store.layout import MANIFEST, TOPK
from msif_ray.store.storage import RunDir

PASSES = ["factors/finetune/covariance", "factors/finetune/lambdas", "factors/pretrain/covariance",
          "factors/pretrain/lambdas", "scores"]


def run(world, run_dir: Path, **overrides) -> dict:
    config = config_from_dict(world.config(run_dir, **overrides), base_dir=world.root)
    Pipeline(config, log=lambda line: None).run()
    return pq.read_table(run_dir / TOPK).to_pydict()


def assert_same_scores(a: dict, b: dict) -> None:
    assert a["query_id"] == b["query_id"] and a["rank"] == b["rank"] and a["doc_id"] == b["doc_id"]
    assert a["score"] == pytest.approx(b["score"], rel=1e-4, abs=1e-6)


@pytest.fixture(scope="module")
def reference(world, ray_session, tmp_path_factory):
    """The uninterrupted single-worker run every other run is compared with."""
    run_dir = tmp_path_factory.mktemp("reference")
    return run(world, run_dir), RunDir(str(run_dir)).read_json(MANIFEST)


def test_result_schema_and_order(reference):
    topk, manifest = reference
    assert list(topk) == ["query_id", "rank", "doc_id", "score"]
    assert sorted(set(topk["query_id"])) == ["q0", "q1"]
    for q in ("q0", "q1"):
        ranks = [r for qid, r in zip(topk["query_id"], topk["rank"]) if qid == q]
        scores = [s for qid, s in zip(topk["query_id"], topk["score"]) if qid == q]
        assert ranks == list(range(1, 6)) and scores == sorted(scores, reverse=True)
    assert all(manifest["stages"][s]["state"] == "done" for s in ("factors/finetune", "factors/pretrain", "queries", "scores"))


def test_top_k_above_corpus_size_holds_every_pair(world, ray_session, tmp_path):
    topk = run(world, tmp_path, **{"scoring.top_k": 1000, "method": "grad_dot"})
    assert len(topk["doc_id"]) == 2 * 14


def test_two_workers_match_one(world, ray_session, reference, tmp_path):
    assert_same_scores(run(world, tmp_path, **{"ray.num_workers": 2}), reference[0])


@pytest.mark.slow
@pytest.mark.parametrize("pass_name", PASSES)
def test_worker_killed_mid_pass(pass_name, world, ray_session, reference, tmp_path, monkeypatch):
    """A worker process dies (os._exit) on a shard of ``pass_name``: the run completes, equal to
    the reference, and every shard is counted exactly once in the manifest."""
    monkeypatch.setenv(FAULT_ENV, pass_name)
    topk = run(world, tmp_path, **{"ray.num_workers": 2})
    assert (tmp_path / "_faults" / pass_name.replace("/", "_")).exists(), "the fault was not injected"
    assert_same_scores(topk, reference[0])
    manifest = RunDir(str(tmp_path)).read_json(MANIFEST)
    stage, _, name = pass_name.rpartition("/")
    record = manifest["stages"][stage or "scores"]["passes"][name or "scores"]
    reference_record = reference[1]["stages"][stage or "scores"]["passes"][name or "scores"]
    assert record["retried_after_crash"], "the crash was not seen by the driver"
    assert sorted(record["per_shard"]) == sorted(reference_record["per_shard"])
    assert record["tokens"] == reference_record["tokens"] and record["documents"] == reference_record["documents"]


@pytest.mark.slow
def test_worker_killed_in_a_reduce_job(world, ray_session, reference, tmp_path, monkeypatch):
    """A worker dies in a reduce job (the eigendecompositions run on the pool's actors): the job
    is handed out again and the run equals the reference."""
    monkeypatch.setenv(FAULT_ENV, "reduce")
    topk = run(world, tmp_path, **{"ray.num_workers": 2})
    assert (tmp_path / "_faults" / "reduce").exists(), "the fault was not injected"
    assert_same_scores(topk, reference[0])


@pytest.mark.slow
@pytest.mark.parametrize("pass_name", ["factors/pretrain/covariance", "scores"])
def test_hung_worker_is_restarted_at_its_deadline(pass_name, world, ray_session, reference, tmp_path, monkeypatch,
                                                   caplog):
    """A worker hangs (sleeps, alive) on a shard of ``pass_name``: past ``ray.task_timeout_s`` the pool
    kills it, Ray restarts it, the shard is handed out again, and the run equals the reference with
    every shard counted once; the warning names the job."""
    monkeypatch.setenv(FAULT_ENV, f"{pass_name}:hang")
    with caplog.at_level("WARNING", logger="msif_ray.distributed.pool"):
        topk = run(world, tmp_path, **{"ray.num_workers": 2, "ray.task_timeout_s": 15})
    assert RunDir(str(tmp_path)).read_json(f"_faults/{pass_name.replace('/', '_')}")["fault"] == "hang"
    assert_same_scores(topk, reference[0])
    stage, _, name = pass_name.rpartition("/")
    record = RunDir(str(tmp_path)).read_json(MANIFEST)["stages"][stage or "scores"]["passes"][name or "scores"]
    reference_record = reference[1]["stages"][stage or "scores"]["passes"][name or "scores"]
    assert len(record["retried_after_crash"]) == 1
    assert record["documents"] == reference_record["documents"] and record["tokens"] == reference_record["tokens"]
    assert any("ran past its deadline of 15 s" in r.getMessage() and record["retried_after_crash"][0] in r.getMessage()
               for r in caplog.records)


def test_self_influence_of_appended_shards_only(world, ray_session, tmp_path):
    """``scoring.normalize`` on a grown corpus: the self_influence stage computes the appended
    file's shards alone (reusing the others' files), and the result equals a fresh run's."""
    import pyarrow as pa

    extra = tmp_path / "extra.parquet"
    pq.write_table(pa.table({"id": ["new-0", "new-1", "new-2"],
                             "text": ["Mira Tolsen walked to Elsk.", "Otto Fenn sold bread.", "The hills were quiet."]}), extra)
    settings = {"method": "grad_dot", "scoring.normalize": "self", "scoring.top_k": 100}
    run(world, tmp_path / "grown", **settings)
    grown = run(world, tmp_path / "grown", **settings, **{"data.corpus.paths": [str(world.corpus), str(extra)]})
    fresh = run(world, tmp_path / "fresh", **settings, **{"data.corpus.paths": [str(world.corpus), str(extra)]})
    assert_same_scores(grown, fresh)
    assert grown["raw_score"] == pytest.approx(fresh["raw_score"], rel=1e-4, abs=1e-6)
    passes = RunDir(str(tmp_path / "grown")).read_json(MANIFEST)["stages"]["self_influence"]["passes"]["self_influence"]
    fresh_passes = RunDir(str(tmp_path / "fresh")).read_json(MANIFEST)["stages"]["self_influence"]["passes"]["self_influence"]
    assert passes["computed"] == 1 and passes["reused"] == fresh_passes["shards_total"] - 1  # one shard of 3 rows


@pytest.mark.slow
def test_worker_killed_in_the_self_influence_pass(world, ray_session, tmp_path, monkeypatch):
    """``scoring.normalize: self``: a worker dies on a shard of the self_influence pass; the run
    equals an uninterrupted one (scores and raw scores) and counts every shard once."""
    settings = {"scoring.normalize": "self", "ray.num_workers": 2}
    reference_topk = run(world, tmp_path / "reference", **settings)
    reference_record = RunDir(str(tmp_path / "reference")).read_json(MANIFEST)["stages"]["self_influence"]
    monkeypatch.setenv(FAULT_ENV, "self_influence")
    topk = run(world, tmp_path / "faulted", **settings)
    assert (tmp_path / "faulted" / "_faults" / "self_influence").exists(), "the fault was not injected"
    assert_same_scores(topk, reference_topk)
    assert topk["raw_score"] == pytest.approx(reference_topk["raw_score"], rel=1e-4, abs=1e-6)
    record = RunDir(str(tmp_path / "faulted")).read_json(MANIFEST)["stages"]["self_influence"]["passes"]["self_influence"]
    assert record["retried_after_crash"], "the crash was not seen by the driver"
    assert record["documents"] == reference_record["passes"]["self_influence"]["documents"]
    assert sorted(record["per_shard"]) == sorted(reference_record["passes"]["self_influence"]["per_shard"])


@pytest.fixture(scope="module")
def one_row_shards(world, ray_session, tmp_path_factory):
    """Settings with one document per shard, and the uninterrupted run of them."""
    settings = {"data.rows_per_shard": 1, "ray.checkpoint_seconds": 0}
    return settings, run(world, tmp_path_factory.mktemp("uninterrupted"), **settings)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["factors", "scores"])
def test_driver_killed_then_resumed(phase, world, ray_session, one_row_shards, tmp_path):
    """SIGKILL a ``msif run`` subprocess mid-pass; the rerun recomputes no finished shard.

    ``factors``: killed once the pre-training covariance pass has committed checkpoints (one per
    shard, checkpoint_seconds 0); ``scores``: once some scoring shards are done.
    """
    settings, uninterrupted = one_row_shards
    config_path = tmp_path / "config.yaml"
    run_dir = tmp_path / "run"
    config_path.write_text(yaml.safe_dump(world.config(run_dir, **settings)))
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address)
    command = [sys.executable, "-m", "msif_ray.cli", "run", str(config_path)]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    folder = run_dir / "factors" / "pretrain"
    if phase == "factors":
        done = lambda: len({s for m in folder.glob("*/covariance/g0/*.json")  # noqa: E731
                            for s in _read_json(m).get("shards", {})})
    else:
        done = lambda: len(list(run_dir.glob("scores/*/*/*.done.json")))  # noqa: E731
    deadline = time.monotonic() + 240
    while done() < 3 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(2)  # Ray kills the dead driver's actors; let any write in flight land first
    done_before = done()
    assert 0 < done_before < 14, f"the driver was not killed mid-{phase}"
    assert not (run_dir / TOPK).exists()

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    manifest = RunDir(str(run_dir)).read_json(MANIFEST)
    skipped = ("factors/finetune",) if phase == "factors" else ("factors/finetune", "factors/pretrain", "queries")
    for stage in skipped:
        assert "up to date, skipped" in resumed.stdout.split(f"[{stage}]", 1)[1].splitlines()[0]
    if phase == "factors":
        record = manifest["stages"]["factors/pretrain"]["passes"]["covariance"]
    else:
        record = manifest["stages"]["scores"]["passes"]["scores"]
    assert record["reused"] >= done_before and record["reused"] + record["computed"] == 14
    assert record["tokens"] == sum(s["tokens"] for s in record["per_shard"].values())
    assert len(record["per_shard"]) == 14
    assert_same_scores(pq.read_table(run_dir / TOPK).to_pydict(), uninterrupted)


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # a marker being replaced right now
        return {}


@pytest.mark.parametrize("method, overrides", [
    ("multi_stage", {"budget.query_batch_size": 1, "budget.query_group_size": 1, "budget.layer_groups": 3}),
    ("single_stage", {"scoring.query_rank": 2}),
    ("grad_dot", {}),
    ("multi_stage", {"budget.layer_groups": 3, "scoring.normalize": "unit"}),
    ("single_stage", {"scoring.normalize": "self"}),
    ("grad_dot", {"scoring.normalize": "unit"}),
])
def test_pipeline_equals_python_api(method, overrides, world, ray_session, tmp_path):
    """Every (document, query) score of the distributed pipeline equals the in-process API's.

    The multi_stage run uses query batches of 1, one query per scoring pass (two corpus passes) and
    three layer groups; single_stage uses rank-2 query vectors. With ``scoring.normalize``, both the
    normalised score and the raw one beside it equal the API's (``Scores.normalized``). The API is
    given the config's default pre-training damping (its own default is the engine's ``auto``). Empirical Fisher, so that factors
    do not depend on how labels are seeded. Float32 models and sums in another order (per shard and
    worker vs one pass): each score within 1e-4 of the largest score's magnitude (small scores are
    differences of large terms, so a relative tolerance on each would measure cancellation).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from msif_ray.store.data import read_pairs
    from msif_ray.engine.influence import Chain
    from msif_ray.engine.api import Examples, TrackedLM
    from world import corpus_documents

    settings = {"method": method, "factors.fisher": "empirical", "scoring.top_k": 1000, **overrides}
    topk = run(world, tmp_path, **settings)
    manifest = RunDir(str(tmp_path)).read_json(MANIFEST)
    if "budget.query_group_size" in overrides:
        assert manifest["plan"]["layer_groups"] == 3 and manifest["plan"]["query_group_size"] == 1
        assert manifest["stages"]["scores"]["passes"]["scores"]["groups"] == 2
        assert manifest["stages"]["factors/pretrain"]["passes"]["covariance"]["groups"] == 3

    tokenizer = AutoTokenizer.from_pretrained(world.finetuned)
    load = lambda path: TrackedLM(AutoModelForCausalLM.from_pretrained(path), tokenizer, max_length=32,  # noqa: E731
                                  batch_size=4)
    query_lm = load(world.finetuned)
    corpus_lm = load(world.pretrained) if method == "multi_stage" else query_lm
    docs = corpus_documents()
    documents = Examples.documents([d["text"] for d in docs])
    pt = ft = None
    if method != "grad_dot":
        pt = corpus_lm.fit_factors(documents, fisher="empirical")
    if method == "multi_stage":
        pairs = read_pairs([str(world.finetune)], "prompt", "completion")
        ft = query_lm.fit_factors(Examples.pairs([p.prompt for p in pairs], [p.completion for p in pairs]),
                                  fisher="empirical")
    queries = read_pairs([str(world.queries)], "prompt", "completion", "id")
    vectors = query_lm.query_vectors(Examples.pairs([q.prompt for q in queries], [q.completion for q in queries],
                                                    [q.id for q in queries]),
                                     Chain.of(method, pt, ft, DEFAULT_DAMPING_PRETRAIN), rank=overrides.get("scoring.query_rank", 32))
    scores = corpus_lm.score(documents, vectors)
    normalize = overrides.get("scoring.normalize", "none")
    self_influence = corpus_lm.self_influence(documents, pt, DEFAULT_DAMPING_PRETRAIN)
    expected = {"score": scores.normalized(normalize, self_influence, vectors)}
    if normalize != "none":  # the ranking's score, and the raw one beside it
        expected["raw_score"] = scores.total
    else:
        assert "raw_score" not in topk
    for column, want in expected.items():
        got = {(q, d): s for q, d, s in zip(topk["query_id"], topk["doc_id"], topk[column])}
        assert len(got) == len(docs) * len(queries)
        scale = float(want.abs().max())
        for i, doc in enumerate(docs):
            for j, query in enumerate(queries):
                assert got[(query.id, doc["id"])] == pytest.approx(float(want[i, j]), rel=1e-4, abs=1e-4 * scale)
    if normalize == "unit":  # cosines
        assert max(abs(s) for s in topk["score"]) <= 1 + 1e-6


def test_zero_quota_shards_are_not_visited(world, ray_session, tmp_path):
    run(world, tmp_path, method="single_stage", **{"factors.max_examples": 2, "data.rows_per_shard": 2})
    manifest = RunDir(str(tmp_path)).read_json(MANIFEST)
    covariance = manifest["stages"]["factors/pretrain"]["passes"]["covariance"]
    assert covariance["shards_total"] == 2 and covariance["documents"] == 2  # of 7 shards, 2 hold the sample


def test_rerun_skips_every_stage(world, ray_session, tmp_path):
    lines: list[str] = []
    config = config_from_dict(world.config(tmp_path, method="grad_dot"), base_dir=world.root)
    Pipeline(config, log=lambda line: None).run()
    before = (tmp_path / TOPK).stat().st_mtime_ns
    Pipeline(config, log=lines.append).run()
    assert any("[scores] up to date, skipped" in line for line in lines)
    assert (tmp_path / TOPK).stat().st_mtime_ns == before


@pytest.mark.slow
def test_corpus_and_run_dir_on_s3(world, ray_session, s3_bucket, tmp_path):
    """The same run with its corpus and run directory in (moto) S3 gives the same result."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(world.corpus), f"{s3_bucket}/corpus/part-0.parquet")
    # The empirical Fisher: sampled labels are seeded by shard id, which follows a remote file's ETag (and a
    # local one's bytes), so a local and a remote copy of one file get different labels.
    settings = {"method": "single_stage", "factors.fisher": "empirical"}
    local = run(world, tmp_path / "local", **settings)
    config = config_from_dict(world.config(f"{s3_bucket}/run", **settings,
                                           **{"data.corpus.paths": [f"{s3_bucket}/corpus/*.parquet"]}), base_dir=world.root)
    Pipeline(config, log=lambda line: None).run()
    store = RunDir(f"{s3_bucket}/run")
    on_s3 = store.read_parquet(TOPK).to_pydict()
    assert on_s3["doc_id"] == local["doc_id"]
    assert on_s3["score"] == pytest.approx(local["score"], rel=1e-9)
    assert store.read_json(MANIFEST)["stages"]["scores"]["state"] == "done"
