"""Stage keys, shard ids and seeds follow content, not paths (``digests.py``, ``pipeline.py``).

Pipeline runs use one worker, so that factor sums are added in one order and results of equal
inputs are bit-identical; the fine-tuning and pre-training factors use the sampled Fisher, whose
labels are seeded by shard id: equal results across directories show the seeds follow content.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from world import PEOPLE, World

from msif_ray.store import digests
from msif_ray.config import config_from_dict
from msif_ray.store.data import DataError, plan_shards
from msif_ray.store.digests import TOKENIZER_FILES, digest, file_digest, tree_digest
from msif_ray.store.layout import MANIFEST, TOPK
from msif_ray.pipeline.run import Pipeline
from msif_ray.store.storage import RunDir

STAGES = ("factors/finetune", "factors/pretrain", "queries", "scores")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A digest cache of this test's own (and an empty in-process memo of it)."""
    monkeypatch.setenv("MSIF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(digests, "_memo", {})
    return tmp_path / "cache" / digests.CACHE_NAME


def copy_world(world: World, root: Path) -> World:
    """A copy of the test world's inputs under ``root`` (plain copies: new paths, new mtimes)."""
    root.mkdir(parents=True)
    for directory in ("pt", "ft"):
        shutil.copytree(world.root / directory, root / directory, copy_function=shutil.copyfile)
    for name in ("corpus.parquet", "ft.parquet", "queries.jsonl"):
        shutil.copyfile(world.root / name, root / name)
    return World(root, root / "pt", root / "ft", root / "corpus.parquet", root / "ft.parquet", root / "queries.jsonl")


def run(world: World, run_dir: Path, **overrides) -> tuple[dict[str, str], dict]:
    """One ``msif run``: what each stage's log line said, and the manifest."""
    lines: list[str] = []
    config = config_from_dict(world.config(run_dir, **overrides), base_dir=world.root)
    Pipeline(config, log=lines.append).run()
    said = {}
    for stage in STAGES:
        said[stage] = next(line for line in lines if line.startswith(f"[{stage}] ") and "(key " in line)
    return said, RunDir(str(run_dir)).read_json(MANIFEST)


def reused(said: dict[str, str]) -> set[str]:
    return {stage for stage, line in said.items() if "up to date, skipped: reused (key" in line}


def write_queries(world: World, people) -> None:
    world.queries.write_text("".join(
        json.dumps({"id": f"q{i}", "prompt": f"Q: Where was {n} born? A:", "completion": f" {t}"}) + "\n"
        for i, (n, t) in enumerate(people)))


# --------------------------------------------------------------------------- digests


def test_file_digest_is_the_content_hash_memoised_by_size_and_mtime(tmp_path, cache):
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 1000)
    assert file_digest(str(path)) == hashlib.sha256(b"x" * 1000).hexdigest()
    assert not cache.exists()  # modified just now: hashed, not memoised (a rewrite could keep size and mtime)
    os.utime(path, ns=(10**18, 10**18))
    file_digest(str(path))
    assert str(path.resolve()) in json.loads(cache.read_text())

    # Same size and mtime, other bytes: the memo answers, so the file is not read again ...
    path.write_bytes(b"y" * 1000)
    os.utime(path, ns=(10**18, 10**18))
    digests._memo.clear()  # ... from the cache on disk
    assert file_digest(str(path)) == hashlib.sha256(b"x" * 1000).hexdigest()
    # An ordinary rewrite (new mtime) is seen.
    path.write_bytes(b"y" * 1000)
    assert file_digest(str(path)) == hashlib.sha256(b"y" * 1000).hexdigest()


def test_moved_files_and_directories_keep_their_digests(world, tmp_path, cache):
    moved = copy_world(world, tmp_path / "moved")
    for a, b in ((world.corpus, moved.corpus), (world.queries, moved.queries)):
        assert file_digest(str(a)) == file_digest(str(b))
    for a, b in ((world.pretrained, moved.pretrained), (world.finetuned, moved.finetuned)):
        assert tree_digest(str(a)) == tree_digest(str(b))
    assert [s.shard_id for s in plan_shards([str(world.corpus)], 4)] == \
        [s.shard_id for s in plan_shards([str(moved.corpus)], 4)]
    shard = plan_shards([str(moved.corpus)], 4)[0]
    assert re.fullmatch(r"[0-9a-f]{12}-0-4", shard.shard_id) and shard.path == str(moved.corpus)

    # New weights beside the tokenizer: the model's digest changes, the tokenizer's does not.
    before_model, before_tokenizer = tree_digest(str(moved.finetuned)), tree_digest(str(moved.finetuned), TOKENIZER_FILES)
    (moved.finetuned / "model.safetensors").write_bytes(b"other weights")
    assert tree_digest(str(moved.finetuned)) != before_model
    assert tree_digest(str(moved.finetuned), TOKENIZER_FILES) == before_tokenizer
    (moved.finetuned / "tokenizer.json").write_text("{}")
    assert tree_digest(str(moved.finetuned), TOKENIZER_FILES) != before_tokenizer
    assert digest("a", [1, 2]) == digest("a", [1, 2]) and len(digest("a")) == 16


def test_a_file_listed_twice_under_two_paths_is_refused_by_name(world, tmp_path, cache):
    copy = tmp_path / "again.parquet"
    shutil.copyfile(world.corpus, copy)
    with pytest.raises(DataError, match=r"again\.parquet: the same content as .*corpus\.parquet"):
        plan_shards([str(world.corpus), str(copy)], 4)


def test_remote_digests_follow_size_and_etag(s3_bucket, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    url = f"{s3_bucket}/data/a.parquet"
    fs.pipe(url, b"first")
    first = file_digest(url)
    fs.pipe(url, b"other")  # same size, new content: a new ETag
    fs.invalidate_cache()
    assert file_digest(url) != first
    fs.pipe(f"{s3_bucket}/model/config.json", b"{}")
    assert tree_digest(f"{s3_bucket}/model") == tree_digest(f"{s3_bucket}/model/")


# --------------------------------------------------------------------------- stages


@pytest.mark.slow
def test_queries_rewritten_in_place_recompute_queries_and_scores_only(world, ray_session, tmp_path, cache):
    inputs = copy_world(world, tmp_path / "inputs")
    said, _ = run(inputs, tmp_path / "run")
    assert all("computed (no earlier run)" in line for line in said.values())
    write_queries(inputs, PEOPLE[1:3])  # same path, other queries
    said, manifest = run(inputs, tmp_path / "run")
    assert reused(said) == {"factors/finetune", "factors/pretrain"}
    assert "recomputed because data.queries changed" in said["queries"]
    assert "recomputed because queries changed" in said["scores"]
    assert manifest["stages"]["queries"]["outcome"] == "recomputed"
    assert manifest["stages"]["queries"]["inputs"]["data.queries"] == digest(file_digest(str(inputs.queries)))
    run(inputs, tmp_path / "fresh")
    assert (tmp_path / "run" / TOPK).read_bytes() == (tmp_path / "fresh" / TOPK).read_bytes()


@pytest.mark.slow
def test_new_finetuning_data_or_weights_keep_the_pretraining_factors(world, ray_session, tmp_path, cache):
    inputs = copy_world(world, tmp_path / "inputs")
    run_dir = tmp_path / "run"
    run(inputs, run_dir)
    pq.write_table(pa.table({"prompt": [f"Q: Where was {n} born? A:" for n, _ in PEOPLE[1:]],
                             "completion": [f" {t}" for _, t in PEOPLE[1:]]}), inputs.finetune)
    said, _ = run(inputs, run_dir)
    assert reused(said) == {"factors/pretrain"}
    assert "recomputed because data.finetune changed" in said["factors/finetune"]
    assert "recomputed because factors/finetune changed" in said["queries"]
    new_data = (run_dir / TOPK).read_bytes()

    # New weights saved at the same fine-tuned path.
    original = tmp_path / "ft-original"
    shutil.copytree(inputs.finetuned, original)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(inputs.finetuned)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(7)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(inputs.finetuned)
    said, manifest = run(inputs, run_dir)
    assert reused(said) == {"factors/pretrain"}
    assert "recomputed because models.finetuned changed" in said["factors/finetune"]
    assert "recomputed because factors/finetune, models.finetuned changed" in said["queries"]
    assert manifest["stages"]["factors/pretrain"]["outcome"] == "reused"

    # Back to the earlier weights: every stage's outputs of that key are still there, and the
    # result is published again from them.
    shutil.rmtree(inputs.finetuned)
    shutil.copytree(original, inputs.finetuned)
    said, _ = run(inputs, run_dir)
    assert reused(said) == set(STAGES)
    assert (run_dir / TOPK).read_bytes() == new_data


def test_moved_inputs_recompute_nothing_and_give_identical_results(world, ray_session, tmp_path, cache):
    here = copy_world(world, tmp_path / "here")
    run_dir = tmp_path / "run"
    _, manifest = run(here, run_dir)
    published = (run_dir / TOPK).stat().st_mtime_ns
    there = copy_world(world, tmp_path / "elsewhere" / "there")
    said, moved_manifest = run(there, run_dir)
    assert reused(said) == set(STAGES)
    assert (run_dir / TOPK).stat().st_mtime_ns == published
    assert moved_manifest["shards"] == manifest["shards"]

    run(there, tmp_path / "fresh")
    assert (tmp_path / "fresh" / TOPK).read_bytes() == (run_dir / TOPK).read_bytes()
    fresh = RunDir(str(tmp_path / "fresh")).read_json(MANIFEST)
    assert {s: r["fingerprint"] for s, r in fresh["stages"].items()} == \
        {s: r["fingerprint"] for s, r in manifest["stages"].items()}


@pytest.mark.slow
def test_demo_in_two_directories_gives_identical_results(ray_session, tmp_path, cache, capsys):
    """``msif demo`` in two home directories: the same world files, so the same keys, seeds and results."""
    from msif_ray.demo.run import demo_run_dir, run_demo
    from msif_ray.demo.toy import ToySpec

    workdirs = [tmp_path / "home-a" / "demo", tmp_path / "elsewhere" / "home-b" / "demo"]
    metrics = [run_demo(w, num_workers=1, spec=ToySpec.small()) for w in workdirs]
    assert metrics[0] == metrics[1]
    runs = [demo_run_dir(w) for w in workdirs]
    manifests = [RunDir(str(r)).read_json(MANIFEST) for r in runs]
    assert manifests[0]["digests"] == manifests[1]["digests"]
    keys = [{s: r["fingerprint"] for s, r in m["stages"].items()} for m in manifests]
    assert keys[0] == keys[1]
    assert (runs[0] / TOPK).read_bytes() == (runs[1] / TOPK).read_bytes()
