"""One corpus written in every form the readers take (``store/formats/``): the same documents, the
same scores, and bad input named before any heavy pass.

Document-level forms (Parquet, JSON Lines plain / gzip / zstd, a ``save_to_disk`` folder, a
token column) must read as the same documents as the Parquet text, and give the same top-k bit for
bit: the runs use one shard per file (``rows_per_shard`` above the corpus size), one worker and
the empirical Fisher, so that no sum depends on which file the rows came from (sampled-Fisher
labels are seeded by shard ids, which follow each file's bytes). The packed forms (a Megatron
pair, a ``.npy`` array, a raw array) hold fixed-length training sequences that cross document
boundaries; they must equal a Parquet token column holding the same sequences.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard

from msif_ray.config import config_from_dict
from msif_ray.engine.api import Examples, TrackedLM
from msif_ray.errors import UserError
from msif_ray.pipeline.run import Pipeline
from msif_ray.store.data import DataError, expand_paths, plan_shards, read_documents
from msif_ray.store.formats.megatron import MAGIC
from msif_ray.store.layout import TOPK
from msif_ray.store.models import load_tokenizer
from msif_ray.store.quarantine import BadDocumentsError
from world import corpus_documents

SEQUENCE = 8  # tokens per packed training sequence


def write_megatron(prefix: Path, sequences: list[list[int]], dtype=np.uint16, code: int = 8) -> None:
    """A Megatron indexed dataset, as ``store/formats/megatron.py`` documents it."""
    arrays = [np.asarray(s, dtype) for s in sequences]
    sizes = np.array([len(a) for a in arrays], np.int32)
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1]) * np.dtype(dtype).itemsize]).astype(np.int64)
    documents = np.arange(len(arrays) + 1, dtype=np.int64)
    prefix.with_suffix(".bin").write_bytes(b"".join(a.tobytes() for a in arrays))
    prefix.with_suffix(".idx").write_bytes(MAGIC + struct.pack("<QBQQ", 1, code, len(arrays), len(documents))
                                           + sizes.tobytes() + pointers.tobytes() + documents.tobytes())


@pytest.fixture(scope="module")
def forms(world, tmp_path_factory) -> dict[str, Path]:
    """The world's corpus in every document-level form, and its token stream packed in every packed form."""
    root = tmp_path_factory.mktemp("forms")
    docs = corpus_documents()
    tokenizer = load_tokenizer(str(world.pretrained))
    ids = [tokenizer(d["text"])["input_ids"] for d in docs]
    lines = "".join(json.dumps(d) + "\n" for d in docs).encode()
    out = {"parquet": world.corpus}
    (root / "c.jsonl").write_bytes(lines)
    (root / "c.jsonl.gz").write_bytes(gzip.compress(lines))
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    datasets.Dataset.from_list(docs).save_to_disk(str(root / "saved"))
    pq.write_table(pa.table({"id": [d["id"] for d in docs], "input_ids": ids}), root / "tokens.parquet")
    out |= {"jsonl": root / "c.jsonl", "gz": root / "c.jsonl.gz", "zst": root / "c.jsonl.zst", "saved": root / "saved",
            "tokens": root / "tokens.parquet"}
    stream = [t for seq in ids for t in seq + [tokenizer.eos_token_id]]
    packed = np.array(stream[: len(stream) // SEQUENCE * SEQUENCE], np.uint16).reshape(-1, SEQUENCE)
    write_megatron(root / "packed", packed.tolist())
    np.save(root / "packed.npy", packed)
    (root / "raw.bin").write_bytes(packed.tobytes())
    names = {"megatron": "packed", "npy": "packed.npy", "raw": "raw.bin"}
    for form, name in names.items():  # the reference of each packed form: a token column of the same sequences
        pq.write_table(pa.table({"id": [f"{name}:{r}" for r in range(len(packed))], "input_ids": packed.tolist()}),
                       root / f"packed-{form}.parquet")
    return out | {"megatron": root / "packed.bin", "npy": root / "packed.npy", "raw": root / "raw.bin",
                  "megatron-ref": root / "packed-megatron.parquet", "npy-ref": root / "packed-npy.parquet",
                  "raw-ref": root / "packed-raw.parquet"}


def documents(path: Path, token_column: str | None = None, layout: str | None = None) -> list:
    shards = plan_shards(expand_paths([str(path)]), 5, layout)
    return [d for s in shards for d in read_documents(s, "id", "text", token_column)[0]]


@pytest.mark.parametrize("form", ["jsonl", "gz", "zst", "saved"])
def test_every_text_form_reads_the_same_documents(forms, form):
    assert documents(forms[form]) == documents(forms["parquet"])


def test_a_token_column_carries_the_tokenizer_ids(world, forms):
    tokenizer = load_tokenizer(str(world.pretrained))
    text = documents(forms["parquet"])
    tokens = documents(forms["tokens"], token_column="input_ids")
    assert [d.doc_id for d in tokens] == [d.doc_id for d in text]
    assert [list(d.input_ids) for d in tokens] == [tokenizer(d.text)["input_ids"] for d in text]


@pytest.mark.parametrize("form", ["megatron", "npy", "raw"])
def test_packed_forms_read_as_a_token_column_of_the_same_sequences(forms, form):
    layout = f"uint16x{SEQUENCE}" if form == "raw" else None
    packed = documents(forms[form], layout=layout)
    assert packed == documents(forms[f"{form}-ref"], token_column="input_ids")
    shards = plan_shards([str(forms[form])], 5, layout)
    assert sum(s.num_tokens for s in shards) == SEQUENCE * len(packed)  # from metadata alone


def test_compressed_files_are_one_shard_each(forms):
    assert [(s.row_start, s.row_stop) for s in plan_shards([str(forms["zst"])], 5)] == [(0, 14)]
    assert len(plan_shards([str(forms["jsonl"])], 5)) == 3


def test_a_zstd_file_of_several_frames_reads_whole(forms, tmp_path):
    lines = Path(forms["jsonl"]).read_bytes().splitlines(keepends=True)
    frames = [zstandard.ZstdCompressor().compress(b"".join(part)) for part in (lines[:5], lines[5:9], lines[9:])]
    (tmp_path / "frames.jsonl.zst").write_bytes(b"".join(frames))
    assert documents(tmp_path / "frames.jsonl.zst") == documents(forms["parquet"])


def test_token_documents_score_exactly_as_their_text(world, forms):
    """The engine on token ids read as they are gives the scores of the text they tokenize to, bit for bit."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(world.pretrained))
    lm = TrackedLM(AutoModelForCausalLM.from_pretrained(world.pretrained).eval(), tokenizer, max_length=16)
    text = [d.text for d in documents(forms["parquet"])]
    ids = [d.input_ids for d in documents(forms["tokens"], token_column="input_ids")]
    queries = {n: torch.randn(2, *g.shape[1:], dtype=torch.float64) for n, g in lm.gradients(Examples.documents(text[:1])).items()}
    assert torch.equal(lm.score(Examples.documents(text), queries).total, lm.score(Examples.tokens(ids), queries).total)
    dataset = datasets.Dataset.from_dict({"text": text, "input_ids": [list(i) for i in ids]})
    assert Examples.from_dataset(dataset) == Examples.documents(text)
    assert Examples.from_dataset(dataset, token_column="input_ids") == Examples.tokens(ids)


# --------------------------------------------------------------------------- end to end


def topk(world, tmp_path: Path, corpus: Path, **corpus_keys) -> dict:
    run_dir = tmp_path / corpus.name.replace(".", "-")
    config = world.config(run_dir, **{"data.corpus.paths": [str(corpus)], "data.rows_per_shard": 1000,
                                      "factors.fisher": "empirical", "scoring.top_k": 100,
                                      **{f"data.corpus.{k}": v for k, v in corpus_keys.items()}})
    Pipeline(config_from_dict(config, base_dir=world.root), log=lambda line: None).run()
    return pq.read_table(run_dir / TOPK).to_pydict()


@pytest.mark.parametrize("form", ["zst", "tokens", "megatron"])
def test_forms_give_the_same_top_k(world, ray_session, forms, tmp_path, form):
    """Bit for bit: the same documents (ids), ranks and float64 scores as the reference form."""
    keys = {"token_column": "input_ids"} if form == "tokens" else {}
    reference = topk(world, tmp_path, forms["megatron-ref" if form == "megatron" else "parquet"],
                     **({"token_column": "input_ids"} if form == "megatron" else {}))
    assert topk(world, tmp_path, forms[form], **keys) == reference


@pytest.mark.slow
@pytest.mark.parametrize("form", ["jsonl", "gz", "saved", "npy", "raw"])
def test_every_other_form_gives_the_same_top_k(world, ray_session, forms, tmp_path, form):
    packed = form in ("npy", "raw")
    keys = {"sequence_length": SEQUENCE} if form == "raw" else {}
    reference = topk(world, tmp_path, forms[f"{form}-ref" if packed else "parquet"],
                     **({"token_column": "input_ids"} if packed else {}))
    assert topk(world, tmp_path, forms[form], **keys) == reference


# --------------------------------------------------------------------------- bad input, named early


def validate(world, tmp_path: Path, corpus: Path, on_bad_document: str = "skip", **corpus_keys) -> None:
    config = world.config(tmp_path / "run", **{"data.corpus.paths": [str(corpus)], "data.on_bad_document": on_bad_document,
                                               **{f"data.corpus.{k}": v for k, v in corpus_keys.items()}})
    Pipeline(config_from_dict(config, base_dir=world.root), log=lambda line: None).validate()


def test_token_id_beyond_the_vocabulary_names_file_and_row(world, tmp_path):
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "input_ids": [[1, 2, 3], [4, 10_000]]}), path)
    with pytest.raises(DataError, match=r"big.parquet, row 1: token id 10000 .* vocabulary size"):
        validate(world, tmp_path, path, token_column="input_ids")


def test_a_token_column_that_is_not_a_list_is_named(world, tmp_path):
    path = tmp_path / "text.parquet"
    pq.write_table(pa.table({"id": ["a"], "input_ids": ["not tokens"]}), path)
    with pytest.raises(DataError, match=r"text.parquet, row 0: column 'input_ids' holds str"):
        read_documents(plan_shards([str(path)], 10)[0], "id", "text", "input_ids")
    with pytest.raises(BadDocumentsError, match=r"document 'a' \(.*text.parquet, row 0\): column 'input_ids' holds str"):
        validate(world, tmp_path, path, token_column="input_ids", on_bad_document="fail")


def test_truncated_compressed_files_are_named(world, forms, tmp_path):
    for name in ("c.jsonl.zst", "c.jsonl.gz"):
        path = tmp_path / name
        data = Path(forms["zst" if name.endswith("zst") else "gz"]).read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(DataError, match=rf"{name}: the compressed stream is truncated or corrupt"):
            validate(world, tmp_path, path)


def test_a_truncated_megatron_pair_is_named(world, forms, tmp_path):
    prefix = tmp_path / "cut"
    write_megatron(prefix, [[1, 2, 3], [4, 5]])
    idx = prefix.with_suffix(".idx")
    idx.write_bytes(idx.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"cut.idx: truncated Megatron index"):
        validate(world, tmp_path, prefix.with_suffix(".bin"))
    write_megatron(prefix, [[1, 2, 3], [4, 5]])
    prefix.with_suffix(".bin").write_bytes(b"\x01\x00")
    with pytest.raises(DataError, match=r"cut.bin: 2 bytes, but its index points to 10"):
        validate(world, tmp_path, prefix.with_suffix(".idx"))


def test_a_raw_array_needs_its_layout(world, forms, tmp_path):
    with pytest.raises(DataError, match=r"raw.bin: a raw array of token ids .* data.corpus.sequence_length"):
        validate(world, tmp_path, forms["raw"])
    with pytest.raises(DataError, match=r"raw.bin: \d+ bytes is not a whole number of sequences of 7"):
        validate(world, tmp_path, forms["raw"], sequence_length=7)


def test_an_unknown_format_is_refused_with_the_supported_ones(world, tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text("id,text\na,hello\n")
    with pytest.raises(UserError, match=r"corpus.csv: unknown file format; use Parquet .* Megatron"):
        validate(world, tmp_path, path)


def test_plan_counts_tokens_from_metadata(world, forms, tmp_path):
    config = world.config(tmp_path / "run", **{"data.corpus.paths": [str(forms["megatron"])]})
    pipeline = Pipeline(config_from_dict(config, base_dir=world.root), log=lambda line: None)
    inputs = pipeline.validate()
    line = pipeline.resource_plan(inputs).summary_lines()[0]
    rows = sum(s.num_rows for s in inputs.corpus_shards)
    assert line == f"corpus: {rows:,} documents, {rows * SEQUENCE:,} tokens (from the files' metadata)"


# --------------------------------------------------------------------------- packed sequences, split per source document


def packed_with_starts(world, root: Path) -> tuple[Path, list[list[int]], list[list[int]]]:
    """The corpus's documents packed two by two into training sequences, with the token offset where
    each source document starts (a boundary column)."""
    tokenizer = load_tokenizer(str(world.pretrained))
    ids = [tokenizer(d["text"])["input_ids"] for d in corpus_documents()]
    sequences, starts = [], []
    for a, b in zip(ids[0::2], ids[1::2]):
        sequences.append(a + b)
        starts.append([0, len(a)])
    path = root / "packed-with-starts.parquet"
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(len(sequences))], "input_ids": sequences,
                             "starts": starts}), path)
    return path, sequences, starts


def test_the_parts_of_a_packed_sequence_add_up_to_its_score(world, tmp_path):
    from transformers import AutoModelForCausalLM

    from msif_ray.engine.scoring import credit_predicted_tokens, segment_scores

    _, sequences, starts = packed_with_starts(world, tmp_path)
    lm = TrackedLM(AutoModelForCausalLM.from_pretrained(world.pretrained).eval(),
                   load_tokenizer(str(world.pretrained)), max_length=64)
    queries = {n: torch.randn(3, *g.shape[1:]) for n, g in lm.gradients(Examples.tokens(sequences[:1])).items()}
    totals = lm.score(Examples.tokens(sequences), queries).total
    for k, (sequence, first) in enumerate(zip(sequences, starts)):
        ids, per_position = lm.token_scores(sequence, queries)
        parts = segment_scores(credit_predicted_tokens(per_position), first)
        assert ids == sequence and parts.shape == (2, 3)
        # float32 per-token terms against the float64 sum of per-window scores: 1e-5 relative
        assert torch.allclose(parts.sum(0).double(), totals[k], rtol=1e-5, atol=1e-7)


def test_document_starts_are_read_and_checked(world, tmp_path):
    path, _, starts = packed_with_starts(world, tmp_path)
    shards = plan_shards([str(path)], 100)
    docs = read_documents(shards[0], "id", "text", "input_ids", "starts")[0]
    assert [list(d.starts) for d in docs] == starts
    bad = tmp_path / "bad-starts.parquet"
    pq.write_table(pa.table({"id": ["a"], "input_ids": [[1, 2, 3]], "starts": [[0, 5]]}), bad)
    with pytest.raises(DataError, match=r"bad-starts.parquet, row 0: column 'starts' must hold increasing token offsets"):
        read_documents(plan_shards([str(bad)], 100)[0], "id", "text", "input_ids", "starts")
    with pytest.raises(DataError, match=r"boundary_column needs token documents"):
        read_documents(plan_shards([str(world.corpus)], 100)[0], "id", "text", None, "starts")


@pytest.mark.slow
def test_the_report_splits_a_packed_sequence_over_its_source_documents(world, ray_session, tmp_path):
    from msif_ray.report.build import build_report
    from msif_ray.store.layout import BREAKDOWNS

    path, _, starts = packed_with_starts(world, tmp_path)
    run_dir = tmp_path / "run"
    config = world.config(run_dir, **{"data.corpus.paths": [str(path)], "data.corpus.token_column": "input_ids",
                                      "data.corpus.boundary_column": "starts", "data.max_length": 64})
    Pipeline(config_from_dict(config, base_dir=world.root), log=lambda line: None).run()
    build_report(str(run_dir), show=3, log=lambda line: None)
    rows = pq.read_table(run_dir / BREAKDOWNS).to_pylist()
    assert rows and all(r["segment_starts"] == starts[int(r["doc_id"][1:])] for r in rows)
    for r in rows:
        assert sum(r["segment_scores"]) == pytest.approx(r["score"], rel=1e-4, abs=1e-6)
    page = next((run_dir / "report" / "queries").iterdir()).read_text()
    assert "source documents in this training sequence: tokens 0–" in page


def test_finetuning_data_and_queries_take_the_same_forms(world, tmp_path):
    """Prompt/completion pairs from a save_to_disk folder and from gzip JSON Lines read as from Parquet."""
    from msif_ray.store.data import read_pairs

    pairs = pq.read_table(world.finetune).to_pylist()
    datasets.Dataset.from_list(pairs).save_to_disk(str(tmp_path / "ft"))
    (tmp_path / "ft.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(p) + "\n" for p in pairs).encode()))
    reference = read_pairs([str(world.finetune)], "prompt", "completion")
    for source in (tmp_path / "ft", tmp_path / "ft.jsonl.gz"):
        assert read_pairs(expand_paths([str(source)]), "prompt", "completion") == reference
    validate(world, tmp_path, world.corpus)  # and a run takes them as data.finetune
    config = world.config(tmp_path / "run2", **{"data.finetune.paths": [str(tmp_path / "ft")]})
    inputs = Pipeline(config_from_dict(config, base_dir=world.root), log=lambda line: None).validate()
    assert sum(s.num_rows for s in inputs.finetune_shards) == len(pairs)
