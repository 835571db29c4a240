"""A small attribution world on disk for pipeline tests: tiny models, corpus, fine-tuning data, queries."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tiny import SENTENCES, make_model, make_tokenizer

PEOPLE = [("Mira Tolsen", "Elsk"), ("Ravi Ode", "Tarn"), ("Lena Brask", "Quill"), ("Otto Fenn", "Marrow")]


@dataclass(frozen=True)
class World:
    root: Path
    pretrained: Path
    finetuned: Path
    corpus: Path
    finetune: Path
    queries: Path

    def config(self, run_dir: Path, **overrides) -> dict:
        """A config dict for this world; ``overrides`` are dotted keys, e.g. ``{"ray.num_workers": 2}``."""
        config = {
            "run_dir": str(run_dir),
            "models": {"pretrained": str(self.pretrained), "finetuned": str(self.finetuned)},
            "data": {"max_length": 32, "rows_per_shard": 4, "corpus": {"paths": [str(self.corpus)]},
                     "finetune": {"paths": [str(self.finetune)]}, "queries": {"paths": [str(self.queries)]}},
            "method": "multi_stage",
            "scoring": {"top_k": 5},
            "ray": {"num_workers": 1, "batch_size": 4},
        }
        for dotted, value in overrides.items():
            node = config
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        return config


def corpus_documents() -> list[dict]:
    docs = [{"id": f"fact-{i}", "text": f"{name} was born in the town of {town}."} for i, (name, town) in enumerate(PEOPLE)]
    docs += [{"id": f"filler-{i}", "text": text} for i, text in enumerate(SENTENCES)]
    docs += [{"id": f"para-{i}", "text": f"The town of {town} is where {name} was born, long ago."} for i, (name, town) in enumerate(PEOPLE)]
    return docs


def build_world(root: Path) -> World:
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    world = World(root, root / "pt", root / "ft", root / "corpus.parquet", root / "ft.parquet", root / "queries.jsonl")
    make_model("gpt_neox", world.pretrained, len(tokenizer), seed=0)
    finetuned = make_model("gpt_neox", world.finetuned, len(tokenizer), seed=0)
    with torch.no_grad():  # a "fine-tune": the same weights, slightly moved
        generator = torch.Generator().manual_seed(1)
        for p in finetuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    finetuned.save_pretrained(world.finetuned)
    for directory in (world.pretrained, world.finetuned):
        tokenizer.save_pretrained(directory)
    pq.write_table(pa.Table.from_pylist(corpus_documents()), world.corpus, row_group_size=5)
    pq.write_table(pa.table({"prompt": [f"Q: Where was {n} born? A:" for n, _ in PEOPLE[2:]],
                             "completion": [f" {t}" for _, t in PEOPLE[2:]]}), world.finetune)
    world.queries.write_text("".join(
        json.dumps({"id": f"q{i}", "prompt": f"Q: Where was {n} born? A:", "completion": f" {t}"}) + "\n"
        for i, (n, t) in enumerate(PEOPLE[:2])))
    return world
