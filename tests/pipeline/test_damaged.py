"""Damaged artifacts between two runs: the rerun discards them and recomputes only them.

Each kind of artifact is truncated, emptied, or has one byte flipped between a first run and a
rerun that reads it; the rerun must end with the scores of a clean run, and the manifest must show
that only the damaged part was computed again. Three first runs serve every case (copied):

- ``finished``: a complete run, rerun with one more query (so the factor layers and the query
  batches are read again; query batches of one query, so the old ones are reused);
- the same, rerun as it is (the published ``topk.parquet``), or with its scores stage's record
  removed, as if the run had stopped before the merge (the score partials are read again);
- ``interrupted``: a run stopped before the Λ pass of ``factors/pretrain``, with its covariance
  checkpoints and eigen files in place. The eigen reduce always runs again before the Λ pass, so a
  damaged eigen file is rewritten before anything reads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from msif_ray.pipeline.passes import Passes
from msif_ray.store.layout import MANIFEST, TOPK
from test_pipeline import assert_same_scores, run
from world import PEOPLE

BASE = {"budget.query_batch_size": 1}
FACTORS_REUSED = {"factors/finetune": "reused", "factors/pretrain": "reused"}


class Interrupted(Exception):
    """Stops the first run before the pre-training Λ pass."""


@pytest.fixture(scope="module")
def more_queries(world, tmp_path_factory) -> dict:
    """The config overrides of the rerun with one more query."""
    path = tmp_path_factory.mktemp("queries") / "queries.jsonl"
    lines = world.queries.read_text().splitlines()
    name, town = PEOPLE[2]
    lines.append(json.dumps({"id": "q2", "prompt": f"Q: Where was {name} born? A:", "completion": f" {town}"}))
    path.write_text("\n".join(lines) + "\n")
    return BASE | {"data.queries.paths": [str(path)]}


@pytest.fixture(scope="module")
def finished(world, ray_session, tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("finished")
    return run_dir, run(world, run_dir, **BASE)


@pytest.fixture(scope="module")
def with_more_queries(world, ray_session, tmp_path_factory, more_queries) -> dict:
    """The clean run's scores with one more query."""
    return run(world, tmp_path_factory.mktemp("clean"), **more_queries)


@pytest.fixture(scope="module")
def interrupted(world, ray_session, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("interrupted")
    accumulate = Passes.accumulate

    def stop_before_pretrain_lambdas(self, stage, pass_name, *args):
        if (stage, pass_name) == ("factors/pretrain", "lambdas"):
            raise Interrupted
        return accumulate(self, stage, pass_name, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Passes, "accumulate", stop_before_pretrain_lambdas)
        with pytest.raises(Interrupted):
            run(world, run_dir, **BASE)
    return run_dir


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:
        data = bytearray(data)
        data[flip_offset(path)] ^= 0xFF
        path.write_bytes(bytes(data))


def flip_offset(path: Path) -> int:
    """A byte that only a verification notices: in tensor data, in a Parquet page's data, or the
    opening brace of a JSON marker."""
    if path.suffix == ".parquet":
        column = pq.ParquetFile(path).metadata.row_group(0).column(0)
        return (column.dictionary_page_offset or column.data_page_offset) + column.total_compressed_size - 1
    return -1 if path.suffix == ".safetensors" else 0


def first(run_dir: Path, pattern: str) -> Path:
    return sorted(run_dir.glob(pattern))[0]


# kind -> (first run, glob of the artifact damaged, what the rerun is)
KINDS = {
    "factor layer": ("finished", "factors/finetune/*/layers/*.safetensors", "more queries"),
    "query batch": ("finished", "queries/*/*.safetensors", "more queries"),
    "done marker": ("finished", "queries/*/*.safetensors.done.json", "more queries"),
    "topk": ("finished", "scores/topk.parquet", "same"),
    "score partial": ("finished", "scores/*/g0/*.parquet", "resume scores"),
    "eigen file": ("interrupted", "factors/pretrain/*/eigen/*.safetensors", "same"),
    "covariance checkpoint": ("interrupted", "factors/pretrain/*/covariance/g0/*.safetensors", "same"),
}


def expected(kind: str, how: str, manifest: dict) -> None:
    """Assert that the rerun computed again only what ``kind`` damaged ``how`` needs."""
    stages = manifest["stages"]
    outcomes = {stage: record["outcome"] for stage, record in stages.items()}
    precondition = stages["queries"]["passes"]["precondition"]
    if kind == "factor layer":  # read to precondition the new query: the fine-tuning factors are fitted again
        assert outcomes["factors/finetune"] == "recomputed" and outcomes["factors/pretrain"] == "reused"
        assert (precondition["computed"], precondition["reused"]) == (1, 2)
    elif kind in ("query batch", "done marker"):  # a size or marker found damaged: recomputed with the new one
        assert outcomes.items() >= FACTORS_REUSED.items()
        flipped = kind == "query batch" and how == "flip"  # found by the scores pass, then recomputed alone
        assert (precondition["computed"], precondition["reused"]) == ((1, 2) if flipped else (2, 1))
    elif kind == "topk":
        assert set(outcomes.values()) == {"reused"}
    elif kind == "score partial":
        assert outcomes.items() >= (FACTORS_REUSED | {"queries": "reused"}).items()
        scores = stages["scores"]["passes"]["scores"]
        assert (scores["computed"], scores["reused"]) == (1, scores["shards_total"] - 1)
    else:
        assert outcomes["factors/finetune"] == "reused"
        covariance = stages["factors/pretrain"]["passes"]["covariance"]
        # one worker: one checkpoint holds every shard, so a damaged one sums them all again
        assert covariance["computed"] == (0 if kind == "eigen file" else covariance["shards_total"])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "flip", "empty"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_damaged_artifact_is_recomputed_alone(kind, how, world, ray_session, request, more_queries, finished,
                                               tmp_path):
    source, pattern, rerun = KINDS[kind]
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0] if source == "finished" else request.getfixturevalue("interrupted"), run_dir)
    if rerun == "resume scores":
        manifest = json.loads((run_dir / MANIFEST).read_text())
        (run_dir / "scores" / manifest["stages"]["scores"]["fingerprint"] / "stage.json").unlink()
    damage(first(run_dir, pattern), how)
    overrides = more_queries if rerun == "more queries" else BASE
    topk = run(world, run_dir, **overrides)
    assert_same_scores(topk, request.getfixturevalue("with_more_queries") if rerun == "more queries" else finished[1])
    assert pq.read_table(run_dir / TOPK).num_rows == len(topk["doc_id"])
    expected(kind, how, json.loads((run_dir / MANIFEST).read_text()))
