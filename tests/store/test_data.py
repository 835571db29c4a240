"""Input files: globs, shard planning, documents, prompt/completion pairs, sampling, and the errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from msif_ray.store.data import DataError, Document, PromptCompletion, check_columns, expand_paths, plan_shards, read_documents, read_pair_shard, read_pairs, sample_documents, sample_quotas


def write_parquet(path: Path, rows: list[dict], row_group_size: int | None = None) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return str(path)


def write_jsonl(path: Path, rows: list[object], blank_after: tuple[int, ...] = ()) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps(row) + "\n" + ("\n" if i in blank_after else ""))
    return str(path)


def docs(n: int, prefix: str = "d") -> list[dict]:
    return [{"id": f"{prefix}{i}", "text": f"document number {i}"} for i in range(n)]


def read_all(paths: list[str], rows_per_shard: int) -> list[Document]:
    return [d for shard in plan_shards(paths, rows_per_shard) for d in read_documents(shard, "id", "text")[0]]


# --------------------------------------------------------------------------- files


def test_expand_paths_sorts_each_glob_and_drops_duplicates(tmp_path: Path) -> None:
    for name in ("b.parquet", "a.parquet", "c.jsonl"):
        (tmp_path / name).write_text("")
    found = expand_paths([str(tmp_path / "c.jsonl"), str(tmp_path / "*.parquet"), str(tmp_path / "a.parquet")])
    assert found == [str(tmp_path / n) for n in ("c.jsonl", "a.parquet", "b.parquet")]


def test_expand_paths_names_a_pattern_that_matches_nothing(tmp_path: Path) -> None:
    pattern = str(tmp_path / "corpus" / "*.parquet")
    with pytest.raises(DataError, match=re.escape(pattern)):
        expand_paths([pattern])


def test_an_unknown_extension_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "corpus.csv"
    path.write_text("id,text\n1,hello\n")
    with pytest.raises(DataError) as error:
        plan_shards([str(path)], 10)
    assert str(path) in str(error.value) and ".parquet" in str(error.value) and ".jsonl" in str(error.value)


def test_check_columns_names_file_column_and_available_columns(tmp_path: Path) -> None:
    parquet = write_parquet(tmp_path / "c.parquet", [{"doc": "1", "body": "x"}])
    jsonl = write_jsonl(tmp_path / "c.jsonl", [{"id": "1", "content": "x"}])
    for path, available in ((parquet, "doc, body"), (jsonl, "id, content")):
        with pytest.raises(DataError) as error:
            check_columns([path], ["id", "text"])
        message = str(error.value)
        assert path in message and available in message
        assert "'id'" in message or "'text'" in message
    check_columns([parquet], ["doc", "body"])


# --------------------------------------------------------------------------- shards


def test_parquet_shards_cut_across_row_groups_and_cover_every_row_once(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "corpus.parquet", docs(23), row_group_size=5)
    assert pq.ParquetFile(path).num_row_groups == 5
    shards = plan_shards([path], 4)
    assert [(s.row_start, s.row_stop) for s in shards] == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20), (20, 23)]
    assert [d.doc_id for d in read_all([path], 4)] == [f"d{i}" for i in range(23)]
    assert [d.doc_id for d in read_all([path], 7)] == [f"d{i}" for i in range(23)]
    assert [d.doc_id for d in read_all([path], 100)] == [f"d{i}" for i in range(23)]


def test_parquet_shard_within_one_row_group(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "corpus.parquet", docs(3000), row_group_size=2500)
    shard = plan_shards([path], 1000)[2]
    documents, skipped = read_documents(shard, "id", "text")
    assert [d.doc_id for d in documents] == [f"d{i}" for i in range(2000, 3000)] and skipped == 0


def test_jsonl_shards_start_at_their_byte_offset_and_ignore_blank_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "corpus.jsonl", docs(11), blank_after=(2, 3, 10))
    shards = plan_shards([path], 3)
    assert [(s.row_start, s.row_stop) for s in shards] == [(0, 3), (3, 6), (6, 9), (9, 11)]
    lines = Path(path).read_bytes()
    for shard in shards:
        assert json.loads(lines[shard.byte_offset:].split(b"\n", 1)[0])["id"] == f"d{shard.row_start}"
    assert [d.doc_id for d in read_all([path], 3)] == [f"d{i}" for i in range(11)]


def test_shard_plans_are_deterministic_with_unique_filesystem_safe_ids(tmp_path: Path) -> None:
    (tmp_path / "a b").mkdir()
    paths = [write_parquet(tmp_path / "a b" / "part:0.parquet", docs(10), row_group_size=3),
             write_jsonl(tmp_path / "part:0.jsonl", docs(10))]
    shards = plan_shards(paths, 4)
    assert shards == plan_shards(list(paths), 4)
    ids = [s.shard_id for s in shards]
    assert len(set(ids)) == len(ids) == 6
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", i) and not i.startswith(".") for i in ids)


def test_files_without_rows_are_an_empty_corpus_error(tmp_path: Path) -> None:
    parquet = str(tmp_path / "empty.parquet")
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), parquet)
    jsonl = tmp_path / "empty.jsonl"
    jsonl.write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        plan_shards([parquet, str(jsonl)], 10)


def test_an_empty_file_among_others_gives_no_shard(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    full = write_jsonl(tmp_path / "full.jsonl", docs(2))
    assert [s.path for s in plan_shards([str(empty), full], 10)] == [full]


# --------------------------------------------------------------------------- documents


def test_empty_texts_are_skipped_and_counted_and_ids_become_strings(tmp_path: Path) -> None:
    rows = [{"id": 1, "text": "one"}, {"id": 2, "text": ""}, {"id": 3, "text": " \n\t"}, {"id": 4, "text": None},
            {"id": 5, "text": "five"}]
    path = write_parquet(tmp_path / "c.parquet", rows)
    documents, skipped = read_documents(plan_shards([path], 10)[0], "id", "text")
    assert documents == [Document("1", "one", row=0), Document("5", "five", row=4)] and skipped == 3


@pytest.mark.parametrize("bad_row, message", [
    ({"id": "x", "text": 42}, "not text"),
    ({"id": "x", "text": ["a"]}, "not text"),
    ({"id": None, "text": "fine"}, "'id'"),
])
def test_a_bad_document_names_file_and_row(tmp_path: Path, bad_row: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "ok"}, bad_row])
    with pytest.raises(DataError) as error:
        read_documents(plan_shards([path], 10)[0], "id", "text")
    assert f"{path}, row 1" in str(error.value) and message in str(error.value)


def test_non_utf8_bytes_name_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(DataError) as error:
        read_documents(plan_shards([str(path)], 10)[0], "id", "text")
    assert f"{path}, row 1" in str(error.value) and "UTF-8" in str(error.value)


def test_a_lone_surrogate_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "half \\ud800 a pair"}\n')
    with pytest.raises(DataError, match="row 0.*UTF-8"):
        read_documents(plan_shards([str(path)], 10)[0], "id", "text")


@pytest.mark.parametrize("line, message", [("{not json", "not valid JSON"), ('["a", "b"]', "JSON object")])
def test_a_malformed_jsonl_line_names_file_and_row(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a", "text": "ok"}\n' + line + "\n")
    with pytest.raises(DataError) as error:
        read_documents(plan_shards([str(path)], 10)[0], "id", "text")
    assert f"{path}, row 1" in str(error.value) and message in str(error.value)


def test_a_jsonl_record_without_the_column_names_row_and_available_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "ok"}, {"id": "b", "body": "x"}])
    with pytest.raises(DataError) as error:
        read_documents(plan_shards([path], 10)[0], "id", "text")
    assert f"{path}, row 1" in str(error.value) and "'text'" in str(error.value) and "id, body" in str(error.value)


def test_a_parquet_file_without_the_column_fails_before_reading(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "c.parquet", [{"id": "a", "body": "x"}])
    with pytest.raises(DataError, match="no column 'text'"):
        read_documents(plan_shards([path], 10)[0], "id", "text")


# --------------------------------------------------------------------------- sampling


def test_sample_quotas_add_up_to_max_examples(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "c.parquet", docs(103))
    shards = plan_shards([path], 10)
    quotas = sample_quotas(shards, 25)
    assert sum(quotas.values()) == 25
    assert all(0 <= quotas[s.shard_id] <= s.num_rows for s in shards)
    assert set(sample_quotas(shards, None).values()) == {None} == set(sample_quotas(shards, 103).values())


def test_sample_documents_is_seeded_ordered_and_per_shard(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "c.parquet", docs(40))
    first, second = plan_shards([path], 20)
    documents = read_documents(first, "id", "text")[0]
    sample = sample_documents(documents, 5, seed=0, shard=first)
    assert sample == sample_documents(documents, 5, seed=0, shard=first)
    assert len(sample) == 5 and set(sample) <= set(documents)
    assert sample == sorted(sample, key=documents.index)
    assert sample != sample_documents(documents, 5, seed=1, shard=first)
    assert sample != sample_documents(documents, 5, seed=0, shard=second)
    assert sample_documents(documents, None, seed=0, shard=first) == documents


# --------------------------------------------------------------------------- prompt + completion pairs


def test_read_pairs_with_and_without_an_id_column(tmp_path: Path) -> None:
    rows = [{"id": 7, "prompt": "Q: a? A:", "completion": " yes"}, {"id": 8, "prompt": "", "completion": " no"}]
    jsonl = write_jsonl(tmp_path / "q.jsonl", rows)
    parquet = write_parquet(tmp_path / "q.parquet", [{"p": "x", "c": " y"}])
    assert read_pairs([jsonl], "prompt", "completion", "id") == [
        PromptCompletion("7", "Q: a? A:", " yes"), PromptCompletion("8", "", " no")]
    assert [p.id for p in read_pairs([jsonl], "prompt", "completion")] == ["0", "1"]
    assert read_pairs([parquet], "p", "c") == [PromptCompletion("0", "x", " y")]


def test_an_empty_completion_names_file_row_and_id(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"id": "q1", "prompt": "a", "completion": " b"},
                                              {"id": "q2", "prompt": "c", "completion": ""}])
    with pytest.raises(DataError) as error:
        read_pairs([path], "prompt", "completion", "id")
    message = str(error.value)
    assert f"{path}, row 1" in message and "'q2'" in message and "empty completion" in message


def test_duplicate_ids_name_both_places(tmp_path: Path) -> None:
    first = write_jsonl(tmp_path / "a.jsonl", [{"id": "q1", "prompt": "a", "completion": " b"}])
    second = write_parquet(tmp_path / "b.parquet", [{"id": "q0", "prompt": "a", "completion": " b"},
                                                    {"id": "q1", "prompt": "c", "completion": " d"}])
    with pytest.raises(DataError) as error:
        read_pairs([first, second], "prompt", "completion", "id")
    message = str(error.value)
    assert "duplicate id 'q1'" in message and f"{first}, row 0" in message and f"{second}, row 1" in message


def test_a_non_text_prompt_names_file_row_and_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": 3, "completion": " b"}])
    with pytest.raises(DataError, match=rf"{re.escape(path)}, row 0: column 'prompt'"):
        read_pairs([path], "prompt", "completion")


def test_read_pair_shard_ids_are_rows_of_the_file(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(7)]
    path = write_parquet(tmp_path / "ft.parquet", rows, row_group_size=2)
    shards = plan_shards([path], 3)
    assert [p.id for p in read_pair_shard(shards[1], "prompt", "completion")] == ["3", "4", "5"]
    pairs = [p for s in shards for p in read_pair_shard(s, "prompt", "completion")]
    assert pairs == read_pairs([path], "prompt", "completion")
