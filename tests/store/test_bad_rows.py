"""Bad documents: rows that cannot be decoded and data pages that cannot be read are listed and left
out (``read_documents(..., bad=[])``), found by the validation scan (cached by content), and refused
(``data.on_bad_document: fail``) or quarantined (``skip``) before any heavy pass."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pytest

from msif_ray.config import config_from_dict
from msif_ray.pipeline.run import Pipeline
from msif_ray.store import scan
from msif_ray.store.data import DataError, plan_shards, read_documents
from msif_ray.store.quarantine import BadDocumentsError, quarantine_rows, read_quarantine
from msif_ray.store.storage import RunDir

from corrupt import GROUP, ROWS, corrupt_parquet


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder of this test's own: scans are cached by content across runs."""
    monkeypatch.setenv("MSIF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def broken_jsonl(path: Path) -> str:
    """Rows: 0 fine, 1 not JSON, 2 fine, 3 not UTF-8, 4 a number as text, 5 no id, 6 fine."""
    lines = [json.dumps({"id": "a", "text": "first"}).encode(), b'{"id": "b", "text": "cut',
             json.dumps({"id": "c", "text": "third"}).encode(), b'{"id": "d", "text": "caf\xe9"}',
             json.dumps({"id": "e", "text": 5}).encode(), json.dumps({"id": None, "text": "no id"}).encode(),
             json.dumps({"id": "g", "text": "last"}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def read_all(path: str, rows_per_shard: int) -> tuple[list[str], list]:
    ids, bad = [], []
    for shard in plan_shards([path], rows_per_shard):
        ids += [d.doc_id for d in read_documents(shard, "id", "text", bad=bad)[0]]
    return ids, bad


# --------------------------------------------------------------------------- read_documents


def test_a_corrupt_parquet_page_leaves_out_its_row_group_and_the_rest_is_read(tmp_path):
    path = corrupt_parquet(tmp_path / "c.parquet")
    ids, bad = read_all(path, rows_per_shard=7)  # shards cut across the row groups
    assert ids == [f"d{i}" for i in [*range(GROUP), *range(2 * GROUP, ROWS)]]
    assert [b.row for b in bad] == list(range(GROUP, 2 * GROUP))
    assert {(b.doc_id, b.path) for b in bad} == {(None, path)}
    assert all("row group 1" in b.reason and "checksum" in b.reason for b in bad)


def test_without_a_list_a_corrupt_page_raises_naming_file_and_rows(tmp_path):
    path = corrupt_parquet(tmp_path / "c.parquet")
    shard = plan_shards([path], ROWS)[0]
    with pytest.raises(DataError, match=re.escape(f"{path}, rows {GROUP} to {2 * GROUP - 1}: unreadable data in "
                                                  "row group 1")):
        read_documents(shard, "id", "text")


def test_bad_json_lines_are_listed_with_their_reasons_and_the_others_read(tmp_path):
    path = broken_jsonl(tmp_path / "b.jsonl")
    ids, bad = read_all(path, rows_per_shard=3)
    assert ids == ["a", "c", "g"]
    assert [(b.doc_id, b.row) for b in bad] == [(None, 1), (None, 3), ("e", 4), (None, 5)]
    reasons = [b.reason for b in bad]
    assert "not valid JSON" in reasons[0] and "not valid UTF-8" in reasons[1]
    assert "holds int, not text" in reasons[2] and "every row needs an id" in reasons[3]


def test_without_a_list_a_bad_line_raises_naming_file_and_row(tmp_path):
    path = broken_jsonl(tmp_path / "b.jsonl")
    shard = plan_shards([path], 100)[0]
    with pytest.raises(DataError, match=re.escape(f"{path}, row 1: not valid JSON")):
        read_documents(shard, "id", "text")


def test_duplicate_ids_still_raise_with_a_list(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(DataError, match="duplicate id 'a'"):
        read_all(str(path), 10)


# --------------------------------------------------------------------------- the validation scan


def test_the_scan_names_the_rows_of_corrupt_pages_and_bad_lines(tmp_path):
    parquet, jsonl = corrupt_parquet(tmp_path / "c.parquet"), broken_jsonl(tmp_path / "b.jsonl")
    bad = scan.scan_corpus(plan_shards([parquet, jsonl], 4), "id", "text", log=lambda line: None)
    assert [(b.path, b.row) for b in bad] == ([(parquet, r) for r in range(GROUP, 2 * GROUP)]
                                             + [(jsonl, r) for r in (1, 3, 4, 5)])


def test_the_scan_is_cached_by_content(tmp_path, cache, monkeypatch):
    path = corrupt_parquet(tmp_path / "c.parquet")
    first = scan.scan_corpus(plan_shards([path], 8), "id", "text", log=lambda line: None)
    assert len(list((cache / "scans").glob("*.json"))) == 1
    reads = []
    real = scan.read_documents
    monkeypatch.setattr(scan, "read_documents", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    moved = tmp_path / "elsewhere.parquet"
    Path(path).rename(moved)  # the same content elsewhere: not read again, its rows named at its new path
    again = scan.scan_corpus(plan_shards([str(moved)], 8), "id", "text", log=lambda line: None)
    assert reads == [] and [(b.row, b.reason) for b in again] == [(b.row, b.reason) for b in first]
    assert {b.path for b in again} == {str(moved)}
    corrupt_parquet(moved, rows=ROWS + 1)  # a changed file is scanned again
    changed = scan.scan_corpus(plan_shards([str(moved)], 8), "id", "text", log=lambda line: None)
    assert reads and [b.row for b in changed] == list(range(GROUP, 2 * GROUP))
    assert len(list((cache / "scans").glob("*.json"))) == 2


# --------------------------------------------------------------------------- validation and quarantine


def validate(world, tmp_path: Path, corpus: str, on_bad_document: str):
    config = world.config(tmp_path / "run", **{"data.corpus.paths": [corpus], "data.on_bad_document": on_bad_document})
    lines: list[str] = []
    inputs = Pipeline(config_from_dict(config, base_dir=world.root), log=lines.append).validate()
    return inputs, lines


def test_fail_refuses_bad_documents_at_validation_listing_them(world, tmp_path):
    path = corrupt_parquet(tmp_path / "c.parquet")
    with pytest.raises(BadDocumentsError) as error:
        validate(world, tmp_path, path, "fail")
    assert [b.row for b in error.value.bad] == list(range(GROUP, 2 * GROUP))
    message = str(error.value)
    assert message.startswith("data.corpus: 10 bad document(s)") and f"({path}, row {GROUP})" in message


def test_skip_keeps_them_on_the_inputs_and_the_run_quarantines_them_by_shard(world, tmp_path):
    path = corrupt_parquet(tmp_path / "c.parquet")
    inputs, lines = validate(world, tmp_path, path, "skip")
    assert [b.row for b in inputs.bad_documents] == list(range(GROUP, 2 * GROUP))
    assert any(line.startswith("warning: 10 corpus document(s) cannot be read") for line in lines)
    store = RunDir(tmp_path / "run")
    assert quarantine_rows(store, inputs.corpus_shards, inputs.bad_documents) == GROUP
    for shard in inputs.corpus_shards:  # world.config: 4 rows per shard
        rows = [b.row for b in read_quarantine(store, shard.shard_id)]
        assert rows == [r for r in range(GROUP, 2 * GROUP) if shard.row_start <= r < shard.row_stop]


def test_an_arrow_batch_that_fails_validation_is_listed_and_the_others_read(tmp_path):
    path = tmp_path / "data-00000-of-00001.arrow"
    table = pa.table({"id": [f"d{i}" for i in range(15)], "text": [f"document d{i}" for i in range(15)]})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=5):
            writer.write_batch(batch)
    data = path.read_bytes()
    at = data.index(b"document d7")
    path.write_bytes(data[:at] + b"\xff" + data[at + 1:])  # not UTF-8 any more, in the second batch
    ids, bad = read_all(str(path), rows_per_shard=4)
    assert ids == [f"d{i}" for i in [*range(5), *range(10, 15)]]
    assert [b.row for b in bad] == list(range(5, 10)) and all("Arrow batch" in b.reason for b in bad)
