"""Poisoned documents (issue 20): a document whose loss is non-finite on finite weights is left out
of every sum and result and listed (``data.on_bad_document: skip``), or stops the run (``fail``).

The poison is real: the pre-trained model's input embedding of the token "~" is set to ±3e38, finite
but overflowing the first layer norm, so every window holding that token has NaN logits and every
other window is untouched. Two corpus documents hold it: a short one, and a long one whose "~" sits
in its second window, so that the factor passes meet it after its first window was summed (the
worker then drops its running sum and the driver sums those shards again)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from msif_ray.cli import EXIT_BAD_INPUT, main
from msif_ray.config import config_from_dict
from msif_ray.engine.api import Examples, TrackedLM
from msif_ray.engine.gradients import NonFiniteWindows, poisoned_examples
from msif_ray.ops.status import describe
from msif_ray.pipeline.run import Pipeline
from msif_ray.report.build import build_report
from msif_ray.store.layout import MANIFEST, REPORT_INDEX, TOPK
from msif_ray.store.storage import RunDir
from corrupt import GROUP, ROWS, corrupt_parquet
from tiny import load_tokenizer
from world import corpus_documents

POISON = "~"
SHORT = {"id": "poison-short", "text": f"The {POISON} sign was found here."}
LONG = {"id": "poison-long", "text": "The cat sat on the mat and looked at the town. " * 4 + f"Then {POISON} came."}
LONG_ROW = len(corpus_documents()) + 1


def poison_model(directory: Path) -> None:
    """Overflow the input embedding of the poison token: finite weights, NaN logits on its windows."""
    tokenizer = load_tokenizer(directory)
    [token] = tokenizer(POISON, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        row = model.get_input_embeddings().weight[token]
        row.copy_(torch.tensor([3e38 if i % 2 else -3e38 for i in range(row.numel())]))
    model.save_pretrained(directory)


@pytest.fixture(scope="module")
def poisoned(world, tmp_path_factory):
    """The test world with a poisoned pre-trained model, a corpus with the two poisoned documents
    (rows 2 and ``LONG_ROW``), and the same corpus without them."""
    root = tmp_path_factory.mktemp("poisoned")
    shutil.copytree(world.pretrained, root / "pt")
    poison_model(root / "pt")
    clean = corpus_documents()
    pq.write_table(pa.Table.from_pylist(clean[:2] + [SHORT] + clean[2:] + [LONG]), root / "corpus.parquet")
    pq.write_table(pa.Table.from_pylist(clean), root / "clean.parquet")
    return root


def config(world, poisoned: Path, run_dir: Path, corpus: str, **overrides) -> dict:
    """The world's config on the poisoned model and ``corpus``, with the empirical Fisher."""
    return world.config(run_dir, **{"models.pretrained": str(poisoned / "pt"), "data.corpus.paths": [str(poisoned / corpus)],
                                    "factors.fisher": "empirical", **overrides})


def test_a_poisoned_window_is_named_and_found_by_a_forward_pass(world, poisoned):
    lm = TrackedLM(AutoModelForCausalLM.from_pretrained(poisoned / "pt"), load_tokenizer(poisoned / "pt"), max_length=32)
    docs = Examples.documents(["The cat sat on the mat.", SHORT["text"], LONG["text"], "A town."])
    with pytest.raises(NonFiniteWindows) as raised:
        lm.gradients(docs)
    assert set(raised.value.examples) <= {1, 2}
    assert poisoned_examples(lm.model, lm.batches(docs)) == [1, 2]


def test_poisoned_documents_are_left_out_of_every_sum_and_listed(world, poisoned, ray_session, tmp_path):
    """multi_stage with self-normalised scores: the run on the poisoned corpus returns the clean
    corpus's top k (empirical Fisher: the factors are plain sums, so nothing but the two documents
    differs) and counts every other document exactly once in every pass; a rerun reuses everything
    and still lists them; msif status and the report list them."""
    settings = {"scoring.top_k": 100, "scoring.normalize": "self"}
    Pipeline(config_from_dict(config(world, poisoned, tmp_path / "clean", "clean.parquet", **settings), poisoned),
             log=lambda _: None).run()
    run_dir = tmp_path / "poisoned"
    lines: list[str] = []
    Pipeline(config_from_dict(config(world, poisoned, run_dir, "corpus.parquet", **settings), poisoned), log=lines.append).run()

    clean, dirty = (pq.read_table(d / TOPK).to_pylist() for d in (tmp_path / "clean", run_dir))
    assert [(r["query_id"], r["doc_id"]) for r in dirty] == [(r["query_id"], r["doc_id"]) for r in clean]
    # float32 sums over batches composed differently, then eigendecompositions: 1e-4 of each score, or 1e-5
    # of the largest for scores near zero (one of 28 was 4e-7 off, 6e-4 of itself)
    largest = max(abs(r["score"]) for r in clean)
    assert [r["score"] for r in dirty] == pytest.approx([r["score"] for r in clean], rel=1e-4, abs=1e-5 * largest)

    manifest = json.loads((run_dir / MANIFEST).read_text())
    left_out = {b["doc_id"]: b for b in manifest["quarantine"]}
    assert sorted(left_out) == ["poison-long", "poison-short"]
    assert (left_out["poison-short"]["row"], left_out["poison-long"]["row"]) == (2, LONG_ROW)
    assert left_out["poison-short"]["path"].endswith("corpus.parquet") and "non-finite loss" in left_out["poison-short"]["reason"]
    clean_manifest = json.loads((tmp_path / "clean" / MANIFEST).read_text())
    for stage, pass_name in [("factors/pretrain", "covariance"), ("factors/pretrain", "lambdas"),
                             ("self_influence", "self_influence"), ("scores", "scores")]:
        counted, expected = (m["stages"][stage]["passes"][pass_name] for m in (manifest, clean_manifest))
        assert (counted["documents"], counted["tokens"]) == (expected["documents"], expected["tokens"]), (stage, pass_name)
    assert any("2 bad document(s) left out" in line for line in lines)

    rerun: list[str] = []
    Pipeline(config_from_dict(config(world, poisoned, run_dir, "corpus.parquet", **settings), poisoned), log=rerun.append).run()
    assert json.loads((run_dir / MANIFEST).read_text())["quarantine"] == manifest["quarantine"]
    assert pq.read_table(run_dir / TOPK).to_pylist() == dirty

    status = describe(str(run_dir))
    assert "left out  2 bad document(s)" in status and "document 'poison-long'" in status and f"row {LONG_ROW}" in status
    build_report(str(run_dir), log=lambda _: None)
    page = (run_dir / REPORT_INDEX).read_text()
    assert "Left out: 2 bad documents" in page and "poison-short" in page


def test_on_bad_document_fail_stops_the_run_with_the_list(world, poisoned, ray_session, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config(world, poisoned, tmp_path / "run", "corpus.parquet",
                                          **{"data.on_bad_document": "fail"})))
    capsys.readouterr()
    assert main(["run", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "bad document(s) (data.on_bad_document: fail)" in err and "non-finite loss" in err
    assert "poison-short" in err or "poison-long" in err
    assert not RunDir(str(tmp_path / "run")).list("quarantine")


def test_a_corrupt_data_page_is_left_out_of_a_whole_run(world, ray_session, tmp_path, monkeypatch):
    """A Parquet corpus with one corrupt data page: validation's scan finds its row group, the run
    (multi_stage, the world's models) leaves those rows out of every pass and lists them."""
    monkeypatch.setenv("MSIF_CACHE", str(tmp_path / "cache"))
    corpus = corrupt_parquet(tmp_path / "corpus.parquet")
    run_dir = tmp_path / "run"
    Pipeline(config_from_dict(world.config(run_dir, **{"data.corpus.paths": [corpus]}), world.root),
             log=lambda _: None).run()
    manifest = json.loads((run_dir / MANIFEST).read_text())
    assert [(b["path"], b["row"]) for b in manifest["quarantine"]] == [(corpus, r) for r in range(GROUP, 2 * GROUP)]
    for stage, pass_name in [("factors/pretrain", "covariance"), ("scores", "scores")]:
        assert manifest["stages"][stage]["passes"][pass_name]["documents"] == ROWS - GROUP
    returned = set(pq.read_table(run_dir / TOPK)["doc_id"].to_pylist())
    assert returned and not returned & {f"d{i}" for i in range(GROUP, 2 * GROUP)}
    build_report(str(run_dir), log=lambda _: None)  # reads the shards around the corrupt page again
    assert "Left out: 10 bad documents" in (run_dir / REPORT_INDEX).read_text()
