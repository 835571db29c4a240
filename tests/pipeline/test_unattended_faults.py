"""Faults that bite unattended runs (issue 8), each mended: duplicate corpus ids, a second
``Pipeline.run()`` in one process, credentials in the manifest, any ValueError taken for bad input,
pickled model weights, a local run directory on a multi-node cluster."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from msif_ray.cli import main
from msif_ray.errors import user_error
from msif_ray.config import ConfigError, config_from_dict
from msif_ray.store.data import DataError, check_unique_ids, plan_shards, read_documents
from msif_ray.store.layout import MANIFEST, TOPK
from msif_ray.pipeline.run import Pipeline
from msif_ray.store.storage import RunDir, StorageError, check_run_dir_shared


def run_cli(tmp_path: Path, world, capsys, **overrides) -> tuple[int, str]:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(world.config(tmp_path / "run", **overrides)))
    capsys.readouterr()
    code = main(["run", str(config)])
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------- duplicate ids


def test_ids_equal_as_text_within_a_shard_are_duplicates(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}\n{"id": "1", "text": "c"}\n')
    [shard] = plan_shards([str(path)], 10)
    with pytest.raises(DataError, match=r"row 2: duplicate id '1'.*first at .*row 0 \(1, int, and '1', str"):
        read_documents(shard, "id", "text")


@pytest.mark.parametrize("ids_in_memory", [4_000_000, 3])  # one spill file; several (the bounded-memory path)
def test_duplicate_ids_across_shards_and_files(tmp_path, ids_in_memory):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(10)], "text": ["x"] * 10}), a)
    pq.write_table(pa.table({"id": [f"e{i}" for i in range(10)], "text": ["x"] * 10}), b)
    shards = plan_shards([str(a), str(b)], 4)
    check_unique_ids(shards, "id", ids_in_memory)  # no duplicate: passes
    pq.write_table(pa.table({"id": [f"e{i}" for i in range(9)] + ["d7"], "text": ["x"] * 10}), b)
    with pytest.raises(DataError, match=r"b\.parquet, row 9: duplicate id 'd7'.*first at .*a\.parquet, row 7"):
        check_unique_ids(plan_shards([str(a), str(b)], 4), "id", ids_in_memory)


def test_msif_run_refuses_a_corpus_listing_a_document_twice(tmp_path, world, capsys):
    corpus = tmp_path / "corpus.parquet"
    rows = pq.read_table(world.corpus).to_pylist()
    pq.write_table(pa.Table.from_pylist(rows + [rows[0]]), corpus)  # the first document again, in a later shard
    code, message = run_cli(tmp_path, world, capsys, **{"data.corpus.paths": [str(corpus)]})
    assert code == 2 and f"duplicate id {rows[0]['id']!r}" in message and "row 0" in message, message


# --------------------------------------------------------------------------- user errors


def test_only_the_projects_input_errors_are_reported_without_traceback():
    assert user_error(DataError("bad row")) is not None
    assert user_error(ConfigError("bad key")) is not None
    assert user_error(pa.ArrowInvalid("a bug in the engine's Arrow code")) is None  # a ValueError
    assert user_error(KeyError("layer")) is None
    assert user_error(FileNotFoundError("a lost partial result")) is None
    assert user_error(ValueError("anything else")) is None


# --------------------------------------------------------------------------- models


def test_a_model_with_pickled_weights_is_refused_before_loading(tmp_path, world, capsys):
    pickled = tmp_path / "pt-pickled"
    shutil.copytree(world.pretrained, pickled)
    model = AutoModelForCausalLM.from_pretrained(world.pretrained)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    code, message = run_cli(tmp_path, world, capsys, method="single_stage", **{
        "models.pretrained": str(pickled), "models.finetuned": None})
    assert code == 2, message
    assert f"models.pretrained: no safetensors weights in {str(pickled)!r}" in message
    assert "pytorch_model.bin" in message and "safe_serialization=True" in message


# --------------------------------------------------------------------------- cluster


def test_a_local_run_dir_is_refused_on_a_multi_node_cluster(tmp_path):
    check_run_dir_shared(str(tmp_path), "run_dir", 1)  # one node: its disk is everybody's
    check_run_dir_shared("s3://bucket/run", "run_dir", 8)
    with pytest.raises(StorageError, match=r"run_dir: .* is a local path, but the Ray cluster has 3 nodes.*s3://"):
        check_run_dir_shared(str(tmp_path), "run_dir", 3)


# --------------------------------------------------------------------------- pipeline


def test_second_run_in_one_process_and_no_credentials_in_the_manifest(world, ray_session, tmp_path):
    secret_address = "ray://admin:hunter2@127.0.0.1:10001?token=s3cret"  # not used: Ray is already up
    config = config_from_dict(world.config(tmp_path / "run", method="grad_dot", **{"ray.address": secret_address}),
                              world.root)
    pipeline = Pipeline(config, log=lambda _: None)
    pipeline.run()
    manifest = (tmp_path / "run" / MANIFEST).read_text()
    assert "hunter2" not in manifest and "s3cret" not in manifest
    assert json.loads(manifest)["config"]["ray"]["address"] == "ray://admin:REDACTED@127.0.0.1:10001?token=REDACTED"
    first = pq.read_table(tmp_path / "run" / TOPK)

    shutil.rmtree(tmp_path / "run" / "scores")  # every score shard must be computed again, by workers
    outcome = []
    second = threading.Thread(target=lambda: outcome.append(pipeline.run()), daemon=True)
    second.start()
    second.join(timeout=120)  # with the first run's dead actors it waited on them for minutes
    assert outcome, "the second run() of one Pipeline did not finish within 120 s"
    assert pq.read_table(tmp_path / "run" / TOPK).equals(first)


# --------------------------------------------------------------------------- resources


@pytest.fixture
def small_disk(tmp_path):
    """A real, small filesystem (a 320 KiB tmpfs; a run of the tiny world writes ~720 KiB), unmounted after."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"needs a small real filesystem, and this machine refuses to mount one: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_full_disk_is_named_and_the_rerun_resumes(world, ray_session, small_disk, tmp_path, capsys):
    """The run directory's disk fills up mid-run: exit 2 with one line naming the device's folder and
    what to do, no temporary file left; with room again, the rerun reuses what was finished and
    ends with the scores of a run that never ran out of room."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(world.config(small_disk / "run")))
    capsys.readouterr()
    assert main(["run", str(config)]) == 2
    message = capsys.readouterr().err
    assert message.startswith(f"msif: error: no space left on the device holding {small_disk}"), message
    assert "move the run directory (or index.path) to a larger volume" in message
    assert not list(small_disk.rglob("*.tmp"))
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    assert main(["run", str(config)]) == 0
    outcomes = {stage: record["outcome"] for stage, record in RunDir(str(small_disk / "run")).read_json(MANIFEST)["stages"].items()}
    assert {"reused", "resumed"} & set(outcomes.values()), outcomes  # what the full disk's run finished was kept
    (tmp_path / "roomy").mkdir()
    code, _ = run_cli(tmp_path / "roomy", world, capsys)
    assert code == 0
    assert pq.read_table(small_disk / "run" / TOPK).drop(["score"]) == pq.read_table(tmp_path / "roomy" / "run" / TOPK).drop(["score"])


@pytest.mark.slow
def test_a_worker_out_of_gpu_memory_stops_the_run_with_the_plans_advice(world, ray_session, tmp_path, capsys,
                                                                        monkeypatch):
    """torch's CUDA out-of-memory error, raised in a worker's scoring job, is recognised by its type: exit 2
    naming the pass and the knobs; the rerun keeps the finished stages."""
    from msif_ray.pipeline.run import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "scores:oom")
    code, message = run_cli(tmp_path, world, capsys)
    assert code == 2, message
    assert message.startswith("msif: error: [scores] a worker ran out of memory (")
    assert "CUDA out of memory" in message and "ray.batch_size" in message and "budget.worker_memory_gb" in message
    monkeypatch.delenv(FAULT_ENV)
    code, message = run_cli(tmp_path, world, capsys)
    assert code == 0, message
    stages = RunDir(str(tmp_path / "run")).read_json(MANIFEST)["stages"]
    assert stages["factors/pretrain"]["outcome"] == "reused" and stages["queries"]["outcome"] == "reused"


@pytest.mark.slow
@pytest.mark.parametrize("key", ["run_dir", "index.path"])
def test_a_worker_that_cannot_see_the_run_directory_stops_the_run_at_once(world, ray_session, tmp_path, monkeypatch,
                                                                          key):
    """A worker restarted on a node with a run directory (or index store) of its own (here: the
    driver's probe file is gone from it when the worker restarts, as it would be on another node's
    disk) fails its start; the run stops at once with one error naming the setting and the fix,
    instead of waiting for the worker."""
    import time

    from msif_ray.distributed.pool import WorkerStartError
    from msif_ray.pipeline.run import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "factors/finetune/covariance:hang")
    store = {"run_dir": tmp_path / "run", "index.path": tmp_path / "index"}[key]
    index = {"scoring.mode": "index", "index.path": str(tmp_path / "index")} if key == "index.path" else {}
    config = config_from_dict(world.config(tmp_path / "run", **{"ray.num_workers": 2, "ray.task_timeout_s": 10},
                                           **index), world.root)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            Pipeline(config, log=lambda _: None).run()
        except BaseException as err:  # noqa: BLE001 - checked below
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    marker = tmp_path / "run" / "_faults" / "factors_finetune_covariance"
    while not marker.exists() and thread.is_alive():
        time.sleep(0.2)
    shutil.rmtree(store / "_workers")  # the hung worker restarts (its deadline) where the probe is not
    started = time.monotonic()
    thread.join(timeout=300)
    assert not thread.is_alive() and outcome, "the run did not stop"
    assert time.monotonic() - started < 120
    assert isinstance(outcome[0], WorkerStartError), repr(outcome[0])
    assert str(outcome[0]).startswith("a worker could not start: ")
    assert f"{key}: {store} on this worker's node" in str(outcome[0]) and "s3://" in str(outcome[0])
