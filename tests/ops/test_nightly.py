"""``msif nightly``: nights on the toy world (local Ray, 2 CPUs), published under ``nights/``.

One run directory goes through the nights in order (the module fixture): a first night computes
everything; a second with nothing new recomputes nothing and publishes the same result; a night
whose queries file is corrupt fails (exit 2), is in the history as failed, and leaves ``latest``
on the good night. Then a night whose queries file gained a query recomputes queries and scores
only, and equals a fresh run. A night refused by the lock exits 3 naming the holder.

In index mode (``scoring.mode: index``, k = 4), on run directories of their own: a night after a
corpus file was appended indexes only that file's shards and keeps the pre-training factors, and
its scores are exact mode's with the same factors and queries; a night after new weights were
saved at the fine-tuned model's path reuses the pre-training factors and the index, and equals a
fresh run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from lock_holder import held_by_another_thread

from msif_ray.store import layout
from msif_ray.cli import EXIT_BAD_INPUT, EXIT_LOCKED, main
from msif_ray.config import config_from_dict
from msif_ray.ops.nightly import history, latest
from msif_ray.store.layout import MANIFEST
from msif_ray.pipeline.run import Pipeline
from msif_ray.store.storage import RunDir

FIRST, SECOND, BROKEN, GAINED = "2026-11-28", "2026-11-29", "2026-11-30", "2026-12-01"
STAGES = ["factors/finetune", "factors/pretrain", "queries", "scores"]


def night(config: Path, date: str, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["nightly", str(config), "--date", date])
    out, err = capsys.readouterr()
    return code, out, err


def night_record(run_dir: Path | str, date: str) -> dict:
    return RunDir(run_dir).read_json(layout.night_record(date))


def table(path: Path) -> dict:
    return pq.read_table(path).to_pydict()


def without_outcome(stages: dict) -> dict:
    """Stage records less what the last run did with them (``outcome``, ``reason``)."""
    return {name: {k: v for k, v in record.items() if k not in ("outcome", "reason")} for name, record in stages.items()}


@pytest.fixture(scope="module")
def nights(world, ray_session, tmp_path_factory):
    """A run directory after three nights (good, nothing new, corrupt queries); its own copy of the queries file."""
    root = tmp_path_factory.mktemp("nightly")
    queries = root / "queries.jsonl"
    shutil.copy(world.queries, queries)
    config = root / "nightly.yaml"
    config.write_text(yaml.safe_dump(world.config(root / "run", **{"data.queries.paths": [str(queries)]})))
    run_dir = root / "run"
    results = {}
    for date in (FIRST, SECOND):
        code = main(["nightly", str(config), "--date", date])
        assert code == 0, date
        results[date] = json.loads(json.dumps(RunDir(run_dir).read_json(MANIFEST)["stages"]))
    good = queries.read_text()
    queries.write_text(good + '{"id": "q-bad", "prompt": "Where\n')  # a truncated JSON line
    results["broken_code"] = main(["nightly", str(config), "--date", BROKEN])
    queries.write_text(good)
    return {"root": root, "config": config, "run_dir": run_dir, "queries": queries, "manifests": results}


def test_first_night_computes_everything_and_publishes_it(nights):
    run_dir = nights["run_dir"]
    record = night_record(run_dir, FIRST)
    assert record["date"] == FIRST and record["status"] == "ok" and record["seconds"] > 0
    assert record["started"].endswith("Z") and record["finished"] >= record["started"]
    assert list(record["stages"]) == STAGES
    for name, stage in record["stages"].items():
        assert stage["recomputed"] and stage["fingerprint"] == nights["manifests"][FIRST][name]["fingerprint"]
        assert stage["passes"] and all(p["computed"] == p["shards_total"] > 0 and p["reused"] == 0
                                       for p in stage["passes"].values()), name
    folder = run_dir / layout.night_dir(FIRST)
    assert sorted(p.name for p in folder.iterdir()) == ["bottomk.parquet", "night.json", "topk.parquet"]
    assert table(folder / "topk.parquet")["doc_id"] and table(folder / "bottomk.parquet")["doc_id"]


def test_second_night_with_nothing_new_recomputes_nothing(nights):
    run_dir = nights["run_dir"]
    first, second = nights["manifests"][FIRST], nights["manifests"][SECOND]
    assert without_outcome(second) == without_outcome(first)  # no stage record changed: every stage was skipped
    assert all(record["outcome"] == "reused" for record in second.values())
    record = night_record(run_dir, SECOND)
    for name, stage in record["stages"].items():
        assert not stage["recomputed"] and stage["seconds"] == 0, name
        assert stage["fingerprint"] == first[name]["fingerprint"]
        assert all(p["computed"] == 0 and p["reused"] == p["shards_total"] > 0 for p in stage["passes"].values()), name
    assert table(run_dir / layout.night_topk(SECOND)) == table(run_dir / layout.night_topk(FIRST))
    assert table(run_dir / layout.night_bottomk(SECOND)) == table(run_dir / layout.night_bottomk(FIRST))


def test_failed_night_is_in_the_history_and_latest_stays_on_the_good_night(nights):
    run_dir = nights["run_dir"]
    assert nights["manifests"]["broken_code"] == EXIT_BAD_INPUT
    store = RunDir(run_dir)
    records = history(store)
    assert [(r["date"], r["status"]) for r in records] == [(FIRST, "ok"), (SECOND, "ok"), (BROKEN, "failed")]
    error = records[-1]["error"]
    assert str(nights["queries"]) in error and "\n" not in error
    assert not (run_dir / layout.night_dir(BROKEN)).exists()
    pointer = latest(store)
    assert pointer["date"] == SECOND and pointer["topk"] == layout.night_topk(SECOND)
    assert store.exists(pointer["night"]) and store.exists(pointer["bottomk"])


def test_status_lists_the_nights(nights, capsys):
    capsys.readouterr()
    assert main(["status", str(nights["run_dir"])]) == 0
    out = capsys.readouterr().out
    nights_part = out[out.index("nights   latest"):]
    assert f"latest {SECOND}" in nights_part
    lines = nights_part.splitlines()[1:]
    assert [line.split()[:2] for line in lines] == [[FIRST, "ok"], [SECOND, "ok"], [BROKEN, "failed"]]
    assert "recomputed: factors/finetune" in lines[0] and "recomputed: nothing" in lines[1]
    assert str(nights["queries"]) in lines[2]


def test_a_night_refused_by_the_lock_exits_3_naming_the_holder(nights, capsys):
    run_dir = nights["run_dir"]
    with held_by_another_thread(str(run_dir), "nightly"):
        code, _, err = night(nights["config"], "2026-11-27", capsys)
    assert code == EXIT_LOCKED
    assert "locked by `msif nightly` on host" in err and f"pid {os.getpid()}" in err, err
    failed = [r for r in history(RunDir(run_dir)) if r["date"] == "2026-11-27"]
    assert len(failed) == 1 and failed[0]["status"] == "failed" and f"pid {os.getpid()}" in failed[0]["error"]
    assert latest(RunDir(run_dir))["date"] == SECOND
    # a date run again overwrites its folder
    code, out, _ = night(nights["config"], SECOND, capsys)
    assert code == 0 and "nightly 2026-11-29" in out
    assert [r["date"] for r in history(RunDir(run_dir))].count(SECOND) == 2


@pytest.mark.slow
def test_a_night_with_new_queries_recomputes_queries_and_scores_only(nights, world, tmp_path, capsys):
    run_dir, queries = nights["run_dir"], nights["queries"]
    before = RunDir(run_dir).read_json(MANIFEST)["stages"]
    with queries.open("a") as f:
        f.write(json.dumps({"id": "q-new", "prompt": "Q: Where was Lena Brask born? A:", "completion": " Quill"}) + "\n")
    code, _, err = night(nights["config"], GAINED, capsys)
    assert code == 0, err
    record = night_record(run_dir, GAINED)
    assert {name for name, s in record["stages"].items() if s["recomputed"]} == {"queries", "scores"}
    after = RunDir(run_dir).read_json(MANIFEST)["stages"]
    assert after["factors/pretrain"] == before["factors/pretrain"] and after["factors/finetune"] == before["factors/finetune"]
    topk = table(run_dir / layout.night_topk(GAINED))
    assert "q-new" in topk["query_id"]

    fresh_dir = tmp_path / "fresh"
    config = config_from_dict(yaml.safe_load(nights["config"].read_text()) | {"run_dir": str(fresh_dir)},
                              base_dir=nights["root"])
    Pipeline(config, log=lambda line: None).run()
    fresh = table(fresh_dir / layout.TOPK)
    assert topk["query_id"] == fresh["query_id"] and topk["doc_id"] == fresh["doc_id"]
    assert topk["score"] == pytest.approx(fresh["score"], rel=1e-4, abs=1e-6)


def test_publishing_on_s3_and_the_history_in_start_order(s3_bucket):
    """On an object store (moto): the copies, night.json, history records and latest.json; a failed attempt
    keeps latest; a date run again replaces its folder's files; the history lists attempts in start order."""
    from msif_ray.ops.nightly import Night, status_lines

    store = RunDir(f"{s3_bucket}/run")
    stages = {"queries": {"fingerprint": "q1", "state": "done", "seconds": 1.0,
                          "passes": {"precondition": {"shards_total": 1, "computed": 1, "reused": 0}}},
              "scores": {"fingerprint": "s1", "state": "done", "seconds": 2.0,
                         "passes": {"scores": {"shards_total": 4, "computed": 4, "reused": 0}}}}
    store.write_bytes(layout.TOPK, b"top-1")
    store.write_bytes(layout.BOTTOMK, b"bottom-1")
    Night(store.url(), FIRST).publish("grad_dot", {}, stages)
    Night(store.url(), SECOND).fail(ValueError("data.queries: https://h/q.jsonl?token=abc is bad\nat row 3"))
    store.write_bytes(layout.TOPK, b"top-2")
    Night(store.url(), FIRST).publish("grad_dot", stages, stages)  # the same date again: nothing recomputed
    assert store.read_bytes(layout.night_topk(FIRST)) == b"top-2"
    assert store.read_bytes(layout.night_bottomk(FIRST)) == b"bottom-1"
    assert not any(s["recomputed"] for s in night_record(store.url(), FIRST)["stages"].values())
    assert [(r["date"], r["status"]) for r in history(store)] == [(FIRST, "ok"), (SECOND, "failed"), (FIRST, "ok")]
    assert history(store)[1]["error"] == "ValueError: data.queries: https://h/q.jsonl?token=REDACTED is bad at row 3"
    assert latest(store)["date"] == FIRST and latest(store)["url"] == store.url(layout.night_dir(FIRST))
    lines = status_lines(store)
    assert lines[0].strip().startswith(f"nights   latest {FIRST}") and len(lines) == 4
    assert "recomputed: queries (1/1 shards), scores (4/4 shards)" in lines[1] and "recomputed: nothing" in lines[3]


# --------------------------------------------------------------------------- index mode

INDEX = {"scoring.mode": "index", "index.terms": 16}


def index_config(world, root: Path, **overrides) -> Path:
    config = root / "nightly.yaml"
    config.write_text(yaml.safe_dump(world.config(root / "run", **INDEX, **overrides)))
    return config


def stages_now(run_dir: Path) -> dict:
    return RunDir(run_dir).read_json(MANIFEST)["stages"]


def recomputed(run_dir: Path, date: str) -> set[str]:
    return {name for name, s in night_record(run_dir, date)["stages"].items() if s["recomputed"]}


@pytest.mark.slow
def test_index_night_after_a_corpus_file_was_appended(world, ray_session, tmp_path, capsys):
    import pyarrow as pa

    run_dir = tmp_path / "run"
    config = index_config(world, tmp_path)
    code, _, err = night(config, FIRST, capsys)
    assert code == 0, err
    fitted = stages_now(run_dir)["factors/pretrain"]["fingerprint"]
    shards_before = set(RunDir(run_dir).read_json(MANIFEST)["shards"]["corpus"])
    index_files = {p: p.stat().st_mtime_ns for p in (run_dir / "index" / "shards").iterdir()}

    extra = tmp_path / "extra.parquet"
    pq.write_table(pa.table({"id": [f"extra-{i}" for i in range(5)],
                             "text": [f"Extra document number {i} about the town of Elsk." for i in range(5)]}), extra)
    config = index_config(world, tmp_path, **{"data.corpus.paths": [str(world.corpus), str(extra)]})
    code, out, err = night(config, SECOND, capsys)
    assert code == 0, err
    stages = stages_now(run_dir)
    new_shards = set(RunDir(run_dir).read_json(MANIFEST)["shards"]["corpus"]) - shards_before
    index = stages["index"]["passes"]["index"]
    assert len(new_shards) == 2 and (index["computed"], index["reused"]) == (2, len(shards_before))
    assert all(p.stat().st_mtime_ns == t for p, t in index_files.items())  # no old shard indexed again
    assert {p.name.split(".")[0] for p in (run_dir / "index" / "shards").glob("*.safetensors")} >= new_shards
    assert stages["factors/pretrain"]["fingerprint"] == fitted and stages["factors/pretrain"]["outcome"] == "reused"
    assert recomputed(run_dir, SECOND) == {"index", "scores"}
    assert night_record(run_dir, SECOND)["stages"]["index"]["passes"]["index"]["computed"] == 2
    topk = table(run_dir / layout.night_topk(SECOND))

    # Exact mode on the same run directory reuses the same (kept) factors and the same queries, and
    # scores every pair: the night's (re-scored) pairs must have exact mode's scores.
    exact_config = yaml.safe_load(config.read_text())
    exact_config["scoring"] |= {"mode": "exact", "top_k": 1000}
    Pipeline(config_from_dict(exact_config, base_dir=tmp_path), log=lambda line: None).run()
    after = stages_now(run_dir)
    assert after["factors/pretrain"]["fingerprint"] == fitted and after["factors/pretrain"]["outcome"] == "reused"
    assert after["queries"]["outcome"] == "reused"
    exact = table(run_dir / layout.TOPK)
    exact_scores = {(q, d): s for q, d, s in zip(exact["query_id"], exact["doc_id"], exact["score"])}
    from world import corpus_documents

    assert len(exact_scores) == 2 * (len(corpus_documents()) + 5)  # every pair
    assert any(d.startswith("extra-") for d in exact["doc_id"])
    for q, d, s in zip(topk["query_id"], topk["doc_id"], topk["score"]):
        assert s == pytest.approx(exact_scores[(q, d)], rel=1e-4, abs=1e-6), (q, d)


@pytest.mark.slow
def test_index_night_with_a_new_finetuned_checkpoint_equals_a_fresh_run(world, ray_session, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    finetuned = tmp_path / "ft"
    shutil.copytree(world.finetuned, finetuned)
    run_dir = tmp_path / "run"
    config = index_config(world, tmp_path, **{"models.finetuned": str(finetuned)})
    code, _, err = night(config, FIRST, capsys)
    assert code == 0, err
    before = stages_now(run_dir)

    model = AutoModelForCausalLM.from_pretrained(finetuned)
    with torch.no_grad():  # another fine-tune, saved at the same path
        generator = torch.Generator().manual_seed(2)
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(finetuned, safe_serialization=True)
    code, _, err = night(config, SECOND, capsys)
    assert code == 0, err
    after = stages_now(run_dir)
    assert after["index"]["passes"]["index"]["computed"] == 0
    assert after["factors/pretrain"]["outcome"] == "reused"
    assert after["factors/pretrain"]["fingerprint"] == before["factors/pretrain"]["fingerprint"]
    assert after["factors/finetune"]["fingerprint"] != before["factors/finetune"]["fingerprint"]
    assert recomputed(run_dir, SECOND) == {"factors/finetune", "queries", "scores"}
    topk = table(run_dir / layout.night_topk(SECOND))
    assert topk != table(run_dir / layout.night_topk(FIRST))

    fresh_dir = tmp_path / "fresh"
    fresh_config = yaml.safe_load(config.read_text()) | {"run_dir": str(fresh_dir)}
    Pipeline(config_from_dict(fresh_config, base_dir=tmp_path), log=lambda line: None).run()
    fresh = table(fresh_dir / layout.TOPK)
    assert topk["query_id"] == fresh["query_id"] and topk["rank"] == fresh["rank"] and topk["doc_id"] == fresh["doc_id"]
    assert topk["score"] == pytest.approx(fresh["score"], rel=1e-4, abs=1e-6)
