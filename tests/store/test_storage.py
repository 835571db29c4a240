"""The run directory, locally and on S3 (a moto server), and the data readers on s3://."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from msif_ray.store.data import check_columns, expand_paths, plan_shards, read_documents, read_pairs
from msif_ray.store.storage import RunDir
from s3_fixture import s3_bucket, s3_server  # noqa: F401  (pytest fixtures)


def exercise_run_dir(store: RunDir) -> None:
    """Every RunDir operation, the same on any filesystem."""
    assert not store.exists("manifest.json")
    store.write_json("manifest.json", {"stages": {"scores": {"state": "done"}}})
    assert store.read_json("manifest.json") == {"stages": {"scores": {"state": "done"}}}

    tensors = {"layer/A": torch.randn(3, 3, dtype=torch.float64), "count": torch.tensor(7),
               "half": torch.ones(2, dtype=torch.bfloat16)}
    store.save_tensors("factors/pretrain.safetensors", tensors, {"model": "pt", "layers": "[\"layer\"]"})
    loaded, metadata = store.load_tensors("factors/pretrain.safetensors")
    assert metadata == {"model": "pt", "layers": "[\"layer\"]"}
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)

    table = pa.table({"query_id": pa.array(["q"], pa.string()), "rank": pa.array([1], pa.int32()),
                      "doc_id": pa.array(["d"], pa.string()), "score": pa.array([0.5], pa.float64())})
    store.write_parquet("scores/topk.parquet", table)
    assert store.read_parquet("scores/topk.parquet").equals(table)

    store.write_bytes("scores/part/s1.parquet.done.json", b"{}")
    store.write_bytes("scores/part/s1.parquet.done.json", b'{"again": 1}')  # an overwrite
    assert store.read_json("scores/part/s1.parquet.done.json") == {"again": 1}
    assert store.list("scores") == ["scores/part/s1.parquet.done.json", "scores/topk.parquet"]
    assert store.list() == ["factors/pretrain.safetensors", "manifest.json", "scores/part/s1.parquet.done.json",
                            "scores/topk.parquet"]
    assert store.list("missing") == []

    store.remove("scores/part")
    store.remove("scores/part")  # removing what is gone is fine
    assert store.list("scores") == ["scores/topk.parquet"]
    assert RunDir(store.url()).read_json("manifest.json") == {"stages": {"scores": {"state": "done"}}}
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        store.read_bytes("nothing.json")


def test_run_dir_on_a_local_path(tmp_path: Path) -> None:
    store = RunDir(tmp_path / "run")
    exercise_run_dir(store)
    assert store.url("scores/topk.parquet") == str(tmp_path / "run" / "scores" / "topk.parquet")
    assert pq.read_table(store.url("scores/topk.parquet")).num_rows == 1


def test_a_relative_run_dir_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert RunDir("runs/x").url() == str(tmp_path / "runs" / "x")


def test_local_writes_leave_no_temporary_file_even_when_they_fail(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store = RunDir(tmp_path)
    store.write_bytes("a/b.json", b"old")
    assert os.listdir(tmp_path / "a") == ["b.json"]

    def crash(source: str, target: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.write_bytes("a/b.json", b"new")
    assert os.listdir(tmp_path / "a") == ["b.json"] and store.read_bytes("a/b.json") == b"old"


def test_metadata_is_optional(tmp_path: Path) -> None:
    store = RunDir(tmp_path)
    store.save_tensors("t.safetensors", {"x": torch.zeros(2)})
    assert store.load_tensors("t.safetensors")[1] == {}


@pytest.mark.parametrize("name", ["../escape.json", "/etc/passwd", "a/../../b"])
def test_names_must_stay_inside_the_run_dir(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="inside the run directory"):
        RunDir(tmp_path).write_bytes(name, b"x")


def test_run_dir_and_data_readers_on_s3(s3_bucket: str) -> None:
    store = RunDir(f"{s3_bucket}/runs/nightly")
    exercise_run_dir(store)
    assert store.url("manifest.json") == f"{s3_bucket}/runs/nightly/manifest.json"

    fs, _ = fsspec.core.url_to_fs(s3_bucket)
    rows = [{"id": i, "text": f"document {i}" if i != 4 else " "} for i in range(11)]
    with fs.open(f"{s3_bucket}/corpus/part-0.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f, row_group_size=3)
    fs.pipe_file(f"{s3_bucket}/corpus/part-1.jsonl",
                 b"".join(json.dumps({"id": f"j{i}", "text": f"line {i}"}).encode() + b"\n" for i in range(5)))
    fs.pipe_file(f"{s3_bucket}/queries.jsonl", b'{"id": "q1", "prompt": "Q:", "completion": " A"}\n')

    paths = expand_paths([f"{s3_bucket}/corpus/*"])
    assert paths == [f"{s3_bucket}/corpus/part-0.parquet", f"{s3_bucket}/corpus/part-1.jsonl"]
    check_columns(paths, ["id", "text"])
    shards = plan_shards(paths, 4)
    assert [(s.row_start, s.row_stop) for s in shards] == [(0, 4), (4, 8), (8, 11), (0, 4), (4, 5)]
    read = [read_documents(s, "id", "text") for s in shards]
    assert [d.doc_id for documents, _ in read for d in documents] == (
        [str(i) for i in range(11) if i != 4] + [f"j{i}" for i in range(5)])
    assert sum(skipped for _, skipped in read) == 1
    assert [q.id for q in read_pairs([f"{s3_bucket}/queries.jsonl"], "prompt", "completion", "id")] == ["q1"]


def test_a_file_written_elsewhere_after_a_listing_is_read(s3_bucket: str) -> None:
    """s3fs answers a file's size from a listing of its folder cached before another process (a
    worker) wrote the file: "not found". A whole read asks for the size first, so the driver failed
    to read a rerank output that existed. RunDir drops the cached listing of a name it reads."""
    import s3fs

    store = RunDir(f"{s3_bucket}/run")
    store.write_bytes("out/a.bin", b"a")
    assert set(store.sizes("out")) == {"out/a.bin"}  # the folder's listing, now cached
    worker = s3fs.S3FileSystem(skip_instance_cache=True)  # another process's client
    worker.pipe_file(f"{s3_bucket.removeprefix('s3://')}/run/out/b.bin", b"b" * 10)
    assert store.size("out/b.bin") == 10
    assert store.read_bytes("out/b.bin") == b"b" * 10
