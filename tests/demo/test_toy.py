"""The built-in toy world: files, gold documents, held-out entities, models, caching."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from msif_ray.demo import toy
from msif_ray.demo.toy import ToySpec, ToyWorld, build_toy_world

SPEC = ToySpec.small()
NAME = re.compile(r"\b([A-Z][a-z]+ [A-Z][a-z]+)\b")  # "Where was Zorbel Quint born?" -> "Zorbel Quint"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[ToyWorld, float, list[str], int]:
    """The small world, the seconds its build took, its log lines, and the torch thread count before it."""
    lines: list[str] = []
    threads = torch.get_num_threads()
    started = time.perf_counter()
    world = build_toy_world(tmp_path_factory.mktemp("toy"), SPEC, seed=0, log=lines.append)
    return world, time.perf_counter() - started, lines, threads


@pytest.fixture(scope="module")
def world(built) -> ToyWorld:
    return built[0]


def corpus_of(world: ToyWorld) -> dict[str, str]:
    return {row["id"]: row["text"] for row in pq.read_table(world.corpus_path).to_pylist()}


def queries_of(world: ToyWorld) -> list[dict]:
    return [json.loads(line) for line in world.queries_path.read_text().splitlines()]


def test_build_is_fast_logs_and_restores_threads(built):
    world, seconds, lines, threads = built
    assert seconds < 15
    assert any("pre-trained" in line for line in lines) and any("built in" in line for line in lines)
    assert torch.get_num_threads() == threads
    stats = world.stats()
    assert stats["pretrain_loss"] < stats["pretrain_loss_initial"] / 2
    assert stats["finetune_loss"] < stats["finetune_loss_initial"]


def test_files_and_columns(world):
    corpus = pq.read_table(world.corpus_path)
    assert corpus.schema.field("id").type == pa.string() and corpus.schema.field("text").type == pa.string()
    ids = corpus.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 12 * 2 * SPEC.paraphrases_per_fact + SPEC.num_filler_docs
    assert all(text.strip() for text in corpus.column("text").to_pylist())

    finetune = pq.read_table(world.finetune_path)
    assert finetune.column_names == ["prompt", "completion"]
    for row in finetune.to_pylist():
        assert row["prompt"].startswith("Q: ") and row["prompt"].endswith(" A:")
        assert row["completion"].startswith(" ") and row["completion"].strip()

    queries = queries_of(world)
    assert len(queries) == SPEC.num_query_entities * len(toy.RELATIONS)
    assert len({q["id"] for q in queries}) == len(queries)
    for q in queries:
        assert set(q) == {"id", "prompt", "completion", "gold_doc_ids"}
        assert q["prompt"].endswith(" A:") and q["completion"].startswith(" ")
    assert world.gold() == {q["id"]: q["gold_doc_ids"] for q in queries}


def test_gold_documents_state_the_fact(world):
    texts = corpus_of(world)
    for q in queries_of(world):
        name, value = NAME.search(q["prompt"]).group(1), q["completion"].strip()
        gold = q["gold_doc_ids"]
        assert len(gold) == SPEC.paraphrases_per_fact and set(gold) <= set(texts)
        assert len({texts[d] for d in gold}) == len(gold)  # distinct documents, not copies
        # The gold documents are exactly the documents that name the entity and its value.
        assert sorted(gold) == sorted(d for d, text in texts.items() if name in text and value in text)


def test_finetune_entities_are_not_query_entities(world):
    finetune = pq.read_table(world.finetune_path).to_pylist()
    ft_names = {NAME.search(row["prompt"]).group(1) for row in finetune}
    query_names = {NAME.search(q["prompt"]).group(1) for q in queries_of(world)}
    assert len(ft_names) == 12 - SPEC.num_query_entities and len(query_names) == SPEC.num_query_entities
    assert not ft_names & query_names
    # ...while the corpus states the facts of both.
    corpus_text = " ".join(corpus_of(world).values())
    assert all(name in corpus_text for name in ft_names | query_names)


@pytest.mark.parametrize("which", ["pretrained_dir", "finetuned_dir"])
def test_models_and_tokenizers_reload(world, which):
    directory = getattr(world, which)
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert model.config.model_type == "gpt_neox"
    assert tokenizer.eos_token is not None and tokenizer.pad_token is not None
    assert len(tokenizer) <= model.get_input_embeddings().num_embeddings
    q = queries_of(world)[0]
    prompt_ids = tokenizer(q["prompt"])["input_ids"]
    ids = tokenizer(q["prompt"] + q["completion"])["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids and len(ids) > len(prompt_ids)
    texts = list(corpus_of(world).values())
    longest = max(len(x) for x in tokenizer(texts)["input_ids"])
    assert longest <= 64  # the demo's max_length: no document is split into windows
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert torch.isfinite(logits).all()


def test_fine_tuning_moved_the_weights(world):
    pt = AutoModelForCausalLM.from_pretrained(world.pretrained_dir).state_dict()
    ft = AutoModelForCausalLM.from_pretrained(world.finetuned_dir).state_dict()
    assert pt.keys() == ft.keys()
    assert any(not torch.equal(pt[k], ft[k]) for k in pt)


def test_second_call_reuses_the_cache(world):
    files = [world.corpus_path, world.finetune_path, world.queries_path, world.pretrained_dir / "model.safetensors",
             world.finetuned_dir / "model.safetensors"]
    before = {f: f.stat().st_mtime_ns for f in files}
    lines: list[str] = []
    started = time.perf_counter()
    again = build_toy_world(world.root, SPEC, seed=0, log=lines.append)
    assert time.perf_counter() - started < 1
    assert again == world and any("reusing" in line for line in lines)
    assert {f: f.stat().st_mtime_ns for f in files} == before


def test_a_different_spec_or_seed_does_not_match(world):
    key = {"version": toy.TOY_VERSION, "seed": 0, "spec": dataclasses.asdict(SPEC)}
    assert toy._is_complete(world, key)
    assert not toy._is_complete(world, {**key, "seed": 1})
    assert not toy._is_complete(world, {**key, "version": toy.TOY_VERSION + 1})
    assert not toy._is_complete(world, {**key, "spec": dataclasses.asdict(ToySpec())})


def test_an_incomplete_world_is_rebuilt(world, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(world.root, root)
    (root / "finetuned" / "model.safetensors").unlink()
    lines: list[str] = []
    rebuilt = build_toy_world(root, SPEC, seed=0, log=lines.append)
    assert any("building" in line for line in lines)
    assert (rebuilt.finetuned_dir / "model.safetensors").is_file()
    assert rebuilt.gold() == world.gold()  # same seed, same world
    assert not list(root.glob(".staging-*"))


def test_a_crashed_build_leaves_no_world(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(toy, "train", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_toy_world(tmp_path, SPEC, log=lambda line: None)
    assert not (tmp_path / "world.json").exists()
    assert not list(tmp_path.glob(".staging-*"))


def test_text_is_deterministic_from_the_seed():
    def documents(seed: int) -> list[tuple[str, str]]:
        rng = random.Random(seed)
        return [(d["id"], d["text"]) for d in toy.make_corpus(toy.make_facts(SPEC, rng), SPEC, rng)]

    assert documents(0) == documents(0)
    assert documents(0) != documents(1)
