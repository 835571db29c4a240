"""The built-in toy world of ``msif demo``: made-up facts, a tiny GPT-NeoX, and queries with known answers.

Everything is built locally from a seed, with no download:

1. A corpus of short documents. Each *fact* (an entity's birthplace or occupation) is stated by
   several documents, each in a different paraphrase and wrapped in filler sentences; pure filler
   documents are mixed in, and optionally distractors that name an entity or a value without
   stating a fact (``ToySpec.entity_distractors``, ``value_distractors``; none in the demo).
   Entity names, cities and filler are all made up. Optionally (``ToySpec.alias_links``; off in
   the demo) every person also has an alias: the fact documents name the alias only, and separate
   *link* documents say that the alias and the name are the same person, so that the questions,
   which use the name, share no word with their sources but the answer (see ``make_facts``).
2. A byte-level BPE tokenizer trained on that text (``tokenizers``), wrapped as a
   ``PreTrainedTokenizerFast`` whose eos token doubles as pad.
3. A tiny GPT-NeoX pre-trained from scratch on the corpus: the "pretrained" model.
4. A full-parameter fine-tune of it on question-answer pairs ("Q: Where was X born? A:" -> " C") about
   every entity except the query entities, with loss on completion tokens only: the answer
   format is learned in fine-tuning, the facts only in pre-training.
5. Queries in the same format about the held-out entities, each with its gold documents: the
   corpus documents that state that fact.

On disk, under ``root``::

    world.json          spec, seed, version, and the build's stats (timings, losses, accuracy)
    corpus.parquet      id: string, text: string
    finetune.parquet    prompt: string, completion: string
    queries.jsonl       {"id", "prompt", "completion", "gold_doc_ids": [...]}
    pretrained/  finetuned/   save_pretrained model + tokenizer directories

A build is staged in a temporary folder and moved into place; ``world.json`` is written last, so
a world whose ``world.json`` matches the spec and seed is complete and is reused as is.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

# Bump when the generated world changes for the same spec and seed, so old caches are rebuilt.
TOY_VERSION = 1
EOS = "<|endoftext|>"

Log = Callable[[str], None]

# --------------------------------------------------------------------------- the world's vocabulary

SYLLABLES = ("zor", "bel", "quin", "var", "tel", "mis", "dra", "kon", "ul", "fen", "rax", "bri", "sol", "nim",
             "pe", "tha", "gor", "lis", "mo", "ren", "ka", "vey", "dun", "ori", "sab", "ith", "lo", "mar")
CITIES = ("Vantor", "Quellis", "Osk", "Tirrin", "Marrowby", "Halvane", "Brisk", "Yelmouth", "Corran", "Dunmere",
          "Pellow", "Skarn")
JOBS = ("baker", "weaver", "ferryman", "potter", "clockmaker", "beekeeper", "locksmith", "cartographer",
        "glassblower", "shepherd", "tailor", "miller")

# relation -> (attribute values, question, statement paraphrases). Every statement names both.
RELATIONS: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "birthplace": (CITIES, "Where was {name} born?", (
        "{name} was born in the city of {value}.",
        "{name} was born in {value}.",
        "The birthplace of {name} is {value}.",
        "{value} is the birthplace of {name}.",
        "Records show that {name} was born in {value}.",
        "{name} came into the world in {value}.",
    )),
    "occupation": (JOBS, "What is the occupation of {name}?", (
        "{name} works as a {value}.",
        "{name} earns a living as a {value}.",
        "By trade, {name} is a {value}.",
        "{name} has been a {value} for many years.",
        "People know {name} as a skilled {value}.",
        "The job of {name} is {value}.",
    )),
}

FILLER_ADJECTIVES = ("old", "quiet", "narrow", "bright", "wooden", "crowded", "empty", "painted", "stone", "tall")
FILLER_NOUNS = ("bridge", "market", "orchard", "lantern", "harbour", "library", "meadow", "tower", "garden", "mill")
# Distractors: a sentence that names an entity without a fact, or a value without an entity.
ENTITY_DISTRACTORS = ("{name} visited the {noun} last week.", "A letter from {name} mentions the {noun}.",
                      "{name} often walks past the {adj} {noun}.", "Nobody remembers when {name} first saw the {noun}.")
VALUE_DISTRACTORS = {
    "birthplace": ("Many travellers pass through {value}.", "The {noun} in {value} is {adj}.",
                   "Maps of {value} show a {adj} {noun}."),
    "occupation": ("Every village needs a good {value}.", "The {value} kept a shop near the {noun}.",
                   "A {value} needs patience and a {adj} workbench."),
}
# Alias worlds: a link document says that a person's alias and name are the same person, and
# states no fact. Most templates put the name first, the direction a question (which gives the
# name) has to follow; none uses a word of the fact templates ("born", "works").
LINK_TEMPLATES = ("{name} is better known as {alias}.", "{name} goes by the name {alias}.",
                  "{name} and {alias} are the same person.", "Friends of {name} call them {alias}.",
                  "{alias} is the name that {name} uses.", "{alias} was once called {name}.")
FILLER_PREDICATES = ("was repaired last spring", "stays open until dusk", "floods after heavy rain",
                     "is visited by many travellers", "looks golden in the evening", "was built long ago",
                     "smells of bread and smoke", "is closed on rainy days", "leans a little to the east",
                     "draws a crowd at the festival")


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class ToySpec:
    """Sizes of a toy world. ``ToySpec()`` is the demo's; ``ToySpec.small()`` builds in seconds for tests.

    One torch thread: for a model this small it is as fast as two on a quiet 2-core machine
    (~31 s vs ~36 s of default pre-training), and it stays fast while another process keeps a core
    busy, where two threads were measured ~8x slower (OpenMP threads waiting on each other).
    """

    num_entities: int = 48           # people; each has one fact per relation
    num_query_entities: int = 12     # held out of fine-tuning; the queries are about them
    paraphrases_per_fact: int = 4    # corpus documents stating each fact (distinct templates, <= 6)
    num_filler_docs: int = 60        # documents with no fact at all
    entity_distractors: int = 0      # per entity: documents naming the entity but none of its values
    value_distractors: int = 0       # per attribute value: documents naming the value but no entity
    alias_links: int = 0             # per entity: link documents (distinct templates, <= 6); > 0 gives
                                     # every entity an alias that the fact documents use instead of its name
    vocab_size: int = 1024           # BPE target size (the trained vocab may be smaller)
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    pretrain_steps: int = 400
    pretrain_batch_size: int = 32
    pretrain_lr: float = 3e-3
    finetune_steps: int = 120
    finetune_batch_size: int = 16
    finetune_lr: float = 3e-4
    num_threads: int = 1             # torch CPU threads during the build, restored afterwards

    @classmethod
    def small(cls) -> "ToySpec":
        """A world for tests: a dozen entities, a 64-wide model, a few seconds of training."""
        return cls(num_entities=12, num_query_entities=4, paraphrases_per_fact=3, num_filler_docs=10,
                   hidden_size=64, pretrain_steps=250, pretrain_batch_size=16, finetune_steps=60,
                   finetune_batch_size=8, finetune_lr=1e-3)


@dataclass(frozen=True)
class ToyWorld:
    """Paths of a built toy world (see the module docstring for the layout)."""

    root: Path
    corpus_path: Path
    finetune_path: Path
    queries_path: Path
    pretrained_dir: Path
    finetuned_dir: Path

    @classmethod
    def at(cls, root: Path) -> "ToyWorld":
        return cls(root, root / "corpus.parquet", root / "finetune.parquet", root / "queries.jsonl",
                   root / "pretrained", root / "finetuned")

    def gold(self) -> dict[str, list[str]]:
        """Query id -> ids of the corpus documents that state the queried fact."""
        return {q["id"]: q["gold_doc_ids"] for q in _read_jsonl(self.queries_path)}

    def stats(self) -> dict:
        """What the build measured: timings, losses, answer accuracy."""
        return json.loads((self.root / "world.json").read_text())["stats"]


def build_toy_world(root: Path | str, spec: ToySpec = ToySpec(), seed: int = 0, log: Log = print) -> ToyWorld:
    """Build the toy world under ``root``, or reuse the one already there if it has the same spec and seed."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    world = ToyWorld.at(root)
    key = {"version": TOY_VERSION, "seed": seed, "spec": asdict(spec)}
    with _locked(root / ".lock"):
        if _is_complete(world, key):
            log(f"toy world: reusing {root}")
            return world
        (root / "world.json").unlink(missing_ok=True)  # from here on the world on disk is incomplete
        staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
        try:
            with _torch_threads(spec.num_threads), torch.random.fork_rng(devices=[]), _quiet_saves():
                stats = _build(ToyWorld.at(staging), spec, seed, log)
            for name in ("corpus.parquet", "finetune.parquet", "queries.jsonl", "pretrained", "finetuned"):
                _move_into_place(staging / name, root / name)
            _write_atomic(root / "world.json", json.dumps({**key, "stats": stats}, indent=2) + "\n")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return world


# --------------------------------------------------------------------------- the build


def _build(out: ToyWorld, spec: ToySpec, seed: int, log: Log) -> dict:
    """Write every artifact of the world into ``out``; return the build's stats."""
    log(f"toy world: building (seed {seed}, torch threads: {spec.num_threads})")
    started = time.perf_counter()
    rng = random.Random(seed)
    torch.manual_seed(seed)

    t = time.perf_counter()
    facts = make_facts(spec, rng)
    corpus = make_corpus(facts, spec, rng)
    query_entities = {f.entity for f in facts if f.held_out}
    finetune = [qa_pair(f) for f in facts if not f.held_out]
    queries = make_queries(facts, corpus)
    _write_parquet(out.corpus_path, {"id": [d["id"] for d in corpus], "text": [d["text"] for d in corpus]})
    _write_parquet(out.finetune_path, {"prompt": [p for p, _ in finetune], "completion": [c for _, c in finetune]})
    out.queries_path.write_text("".join(json.dumps(q) + "\n" for q in queries))
    log(f"toy world: {len(corpus)} documents ({len(facts)} facts x {spec.paraphrases_per_fact} paraphrases "
        f"+ {spec.num_filler_docs} filler{_extras_note(corpus)}), {len(finetune)} fine-tuning pairs, {len(queries)} queries about "
        f"{len(query_entities)} held-out entities ({time.perf_counter() - t:.1f}s)")

    t = time.perf_counter()
    tokenizer = train_tokenizer([d["text"] for d in corpus] + [p + c for p, c in finetune], spec.vocab_size)
    doc_examples = [_document_example(tokenizer, d["text"]) for d in corpus]
    ft_examples = [_completion_example(tokenizer, p, c) for p, c in finetune]
    max_tokens = max(len(ids) for ids, _ in doc_examples + ft_examples)
    log(f"toy world: tokenizer of {len(tokenizer)} tokens, longest example {max_tokens} tokens "
        f"({time.perf_counter() - t:.1f}s)")

    t = time.perf_counter()
    model = GPTNeoXForCausalLM(model_config(spec, tokenizer, max_tokens))
    pt_initial = mean_loss(model, doc_examples)
    pt_final = train(model, doc_examples, spec.pretrain_steps, spec.pretrain_batch_size, spec.pretrain_lr, rng)
    pt_eval = mean_loss(model, doc_examples)
    cloze = cloze_accuracy(model, tokenizer, facts)
    # Only alias worlds report the first hop, so that other worlds' stats stay as they were.
    alias_stats = {"pretrain_alias_cloze_accuracy": alias_cloze_accuracy(model, tokenizer, facts)} if spec.alias_links else {}
    pt_time = time.perf_counter() - t
    log(f"toy world: pre-trained {_count(model)} parameters, {spec.pretrain_steps} steps: corpus loss "
        f"{pt_initial:.2f} -> {pt_eval:.2f}, fact cloze accuracy {cloze:.2f}"
        + "".join(f", alias cloze accuracy {v:.2f}" for v in alias_stats.values()) + f" ({pt_time:.1f}s)")
    _save(model, tokenizer, out.pretrained_dir)

    t = time.perf_counter()
    ft_initial = mean_loss(model, ft_examples)
    ft_final = train(model, ft_examples, spec.finetune_steps, spec.finetune_batch_size, spec.finetune_lr, rng)
    ft_eval = mean_loss(model, ft_examples)
    train_accuracy = answer_accuracy(model, tokenizer, finetune)
    query_accuracy = answer_accuracy(model, tokenizer, [(q["prompt"], q["completion"]) for q in queries])
    ft_time = time.perf_counter() - t
    log(f"toy world: fine-tuned {spec.finetune_steps} steps: completion loss {ft_initial:.2f} -> {ft_eval:.2f}, "
        f"greedy answers right on {train_accuracy:.2f} of fine-tuning pairs and {query_accuracy:.2f} of queries "
        f"({ft_time:.1f}s)")
    _save(model, tokenizer, out.finetuned_dir)

    total = time.perf_counter() - started
    log(f"toy world: built in {total:.1f}s")
    return {
        "num_documents": len(corpus), "num_finetune_pairs": len(finetune), "num_queries": len(queries),
        "vocab_size": len(tokenizer), "num_parameters": _count(model), "num_threads": spec.num_threads,
        "pretrain_loss_initial": pt_initial, "pretrain_loss_last_steps": pt_final, "pretrain_loss": pt_eval,
        "pretrain_cloze_accuracy": cloze, **alias_stats,
        "finetune_loss_initial": ft_initial, "finetune_loss_last_steps": ft_final, "finetune_loss": ft_eval,
        "finetune_answer_accuracy": train_accuracy, "query_answer_accuracy": query_accuracy,
        "pretrain_seconds": pt_time, "finetune_seconds": ft_time, "total_seconds": total,
    }


# --------------------------------------------------------------------------- facts, corpus, questions


@dataclass(frozen=True)
class Fact:
    entity: str                # the name the questions use
    relation: str
    value: str
    held_out: bool             # a query entity: never in the fine-tuning data
    alias: str | None = None   # in an alias world, the name the fact documents use instead

    @property
    def subject(self) -> str:
        """The name the corpus states this fact under: the alias if there is one, else the name."""
        return self.alias or self.entity


def make_names(count: int, rng: random.Random, avoid: frozenset[str] = frozenset()) -> list[str]:
    """``count`` distinct made-up "First Last" names, none equal to a city, no word of them in ``avoid``."""
    names: set[str] = set()
    while len(names) < count:
        first = "".join(rng.sample(SYLLABLES, 2)).capitalize()
        last = "".join(rng.sample(SYLLABLES, 2)).capitalize()
        if first != last and first not in CITIES and last not in CITIES and not {first, last} & avoid:
            names.add(f"{first} {last}")
    return sorted(names)


def make_facts(spec: ToySpec, rng: random.Random) -> list[Fact]:
    """One fact per entity and relation; the last ``num_query_entities`` entities are held out.

    With ``spec.alias_links`` every entity also gets an alias, drawn after the names from words
    that no name uses, so that an alias shares no word with any name: a fact document (which
    names the alias) and its question (which names the entity) then share only the answer.
    """
    if not 0 < spec.num_query_entities < spec.num_entities:
        raise ValueError("ToySpec: need 0 < num_query_entities < num_entities")
    if not 0 < spec.paraphrases_per_fact <= min(len(r[2]) for r in RELATIONS.values()):
        raise ValueError("ToySpec: paraphrases_per_fact must be between 1 and the number of templates")
    if not 0 <= spec.alias_links <= len(LINK_TEMPLATES):
        raise ValueError("ToySpec: alias_links must be between 0 and the number of link templates")
    names = make_names(spec.num_entities, rng)
    rng.shuffle(names)
    held_out = set(names[-spec.num_query_entities:])
    aliases: dict[str, str | None] = dict.fromkeys(names)
    if spec.alias_links:  # no draw otherwise, so worlds without aliases are drawn as before they existed
        words = frozenset(word for name in names for word in name.split())
        aliases = dict(zip(names, make_names(spec.num_entities, rng, avoid=words)))
    return [Fact(name, relation, rng.choice(values), name in held_out, aliases[name])
            for name in names for relation, (values, _, _) in RELATIONS.items()]


def filler_sentence(rng: random.Random, avoid: Sequence[str] = ()) -> str:
    """A made-up sentence about a place; sometimes names a city (never one in ``avoid``)."""
    subject = f"The {rng.choice(FILLER_ADJECTIVES)} {rng.choice(FILLER_NOUNS)}"
    if rng.random() < 0.3:
        subject += f" in {rng.choice([c for c in CITIES if c not in avoid])}"
    return f"{subject} {rng.choice(FILLER_PREDICATES)}."


def make_corpus(facts: Sequence[Fact], spec: ToySpec, rng: random.Random) -> list[dict]:
    """Fact documents (one statement between filler sentences), filler documents, and alias links
    and distractors when the spec asks for them, shuffled, with ids.

    Each document carries its fact (or None) under ``fact``, for the queries' gold ids; only
    ``id`` and ``text`` are written. Filler around a fact never names a value of that entity, so
    the documents that name both an entity's subject (its alias, else its name) and one of its
    values are exactly the ones stating it.
    """
    values: dict[str, list[str]] = {}
    for fact in facts:
        values.setdefault(fact.entity, []).append(fact.value)
    docs: list[dict] = []
    for fact in facts:
        for template in rng.sample(RELATIONS[fact.relation][2], spec.paraphrases_per_fact):
            before = [filler_sentence(rng, values[fact.entity]) for _ in range(rng.randint(0, 1))]
            after = [filler_sentence(rng, values[fact.entity]) for _ in range(rng.randint(1, 2))]
            statement = template.format(name=fact.subject, value=fact.value)
            docs.append({"text": " ".join(before + [statement] + after), "fact": fact})
    for _ in range(spec.num_filler_docs):
        docs.append({"text": " ".join(filler_sentence(rng) for _ in range(rng.randint(2, 4))), "fact": None})
    docs += link_documents(facts, values, spec, rng)
    docs += distractor_documents(facts, values, spec, rng)
    rng.shuffle(docs)
    width = len(str(len(docs) - 1))
    for i, doc in enumerate(docs):
        doc["id"] = f"doc-{i:0{width}d}"
    return docs


def link_documents(facts: Sequence[Fact], values: dict[str, list[str]], spec: ToySpec,
                   rng: random.Random) -> list[dict]:
    """Per entity with an alias, ``spec.alias_links`` documents saying that the alias and the name
    are the same person (distinct templates, filler that avoids the entity's values); none otherwise.

    Each carries ``fact`` None and ``link`` (the entity's name) for the benchmarks' analysis. They
    are the only documents that name both the entity and its alias: the bridge a model must cross
    to answer a question about the name from documents that state the fact under the alias.
    """
    docs: list[dict] = []
    aliases = {f.entity: f.alias for f in facts if f.alias}
    for entity in sorted(aliases):
        for template in rng.sample(LINK_TEMPLATES, spec.alias_links):
            statement = template.format(name=entity, alias=aliases[entity])
            after = [filler_sentence(rng, values[entity]) for _ in range(rng.randint(1, 2))]
            docs.append({"text": " ".join([statement] + after), "fact": None, "link": entity})
    return docs


def distractor_documents(facts: Sequence[Fact], values: dict[str, list[str]], spec: ToySpec,
                         rng: random.Random) -> list[dict]:
    """Documents that share a query's entity or its value but state no fact (none when the spec asks for none).

    An entity distractor names the entity's subject (the name its facts are stated under: its
    alias in an alias world) among filler that avoids the entity's values; a value distractor
    names a value (a city or a job) and no entity. Each carries ``fact`` None and ``distractor``
    ("entity" with the entity's name, or "value" with the value) for the benchmarks' analysis.
    """
    subjects = {f.entity: f.subject for f in facts}
    docs: list[dict] = []
    for entity in (sorted(values) if spec.entity_distractors else []):
        for _ in range(spec.entity_distractors):
            sentence = rng.choice(ENTITY_DISTRACTORS).format(
                name=subjects[entity], noun=rng.choice(FILLER_NOUNS), adj=rng.choice(FILLER_ADJECTIVES))
            after = [filler_sentence(rng, values[entity]) for _ in range(rng.randint(1, 2))]
            docs.append({"text": " ".join([sentence] + after), "fact": None, "distractor": ("entity", entity)})
    for relation, (attribute_values, _, _) in (RELATIONS.items() if spec.value_distractors else []):
        for value in attribute_values:
            for _ in range(spec.value_distractors):
                sentence = rng.choice(VALUE_DISTRACTORS[relation]).format(
                    value=value, noun=rng.choice(FILLER_NOUNS), adj=rng.choice(FILLER_ADJECTIVES))
                docs.append({"text": " ".join([sentence, filler_sentence(rng)]), "fact": None,
                             "distractor": ("value", value)})
    return docs


def _extras_note(corpus: Sequence[dict]) -> str:
    """" + N alias links + M distractors" for the build log, or nothing when the world has none (the demo)."""
    counts = {"alias links": sum("link" in d for d in corpus), "distractors": sum("distractor" in d for d in corpus)}
    return "".join(f" + {count} {kind}" for kind, count in counts.items() if count)


def qa_pair(fact: Fact) -> tuple[str, str]:
    """The (prompt, completion) asking for a fact; the completion starts with a space."""
    question = RELATIONS[fact.relation][1].format(name=fact.entity)
    return f"Q: {question} A:", f" {fact.value}"


def make_queries(facts: Sequence[Fact], corpus: Sequence[dict]) -> list[dict]:
    """A query per held-out fact, with the ids of the documents stating it."""
    queries = []
    for fact in (f for f in facts if f.held_out):
        prompt, completion = qa_pair(fact)
        gold = [d["id"] for d in corpus if d["fact"] == fact]
        queries.append({"id": f"q-{len(queries):03d}", "prompt": prompt, "completion": completion, "gold_doc_ids": gold})
    return queries


# --------------------------------------------------------------------------- tokenizer and model


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts``; ``<|endoftext|>`` is eos, bos and pad; no special tokens added."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def model_config(spec: ToySpec, tokenizer: PreTrainedTokenizerFast, max_tokens: int) -> GPTNeoXConfig:
    """A tiny GPT-NeoX whose embedding holds exactly the tokenizer's vocabulary."""
    eos = tokenizer.eos_token_id
    return GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, intermediate_size=4 * spec.hidden_size,
        max_position_embeddings=max(128, 2 ** math.ceil(math.log2(max_tokens))),
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False)


Example = tuple[list[int], list[bool]]  # token ids, and which tokens carry loss


def _document_example(tokenizer: PreTrainedTokenizerFast, text: str) -> Example:
    ids = tokenizer(text)["input_ids"]
    return ids, [False] + [True] * (len(ids) - 1)


def _completion_example(tokenizer: PreTrainedTokenizerFast, prompt: str, completion: str) -> Example:
    """prompt + completion tokenized once; a token carries loss if it ends inside the completion."""
    enc = tokenizer(prompt + completion, return_offsets_mapping=True)
    return enc["input_ids"], [end > len(prompt) for _, end in enc["offset_mapping"]]


def _collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 where no loss)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100)
    for row, (ids, mask) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
        labels[row, :len(ids)] = torch.where(torch.tensor(mask), torch.tensor(ids), -100)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _batches(examples: Sequence[Example], batch_size: int, rng: random.Random) -> Iterator[list[Example]]:
    """Endless shuffled epochs of ``batch_size`` examples."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start:start + batch_size]]


def train(model: GPTNeoXForCausalLM, examples: Sequence[Example], steps: int, batch_size: int, lr: float,
          rng: random.Random) -> float:
    """AdamW with warmup and cosine decay; returns the mean training loss of the last 10% of steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    model.train()
    losses = []
    for _, batch in zip(range(steps), _batches(examples, batch_size, rng)):
        loss = model(**_collate(batch, model.config.pad_token_id)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-max(1, steps // 10):]
    return sum(tail) / len(tail)


@torch.no_grad()
def mean_loss(model: GPTNeoXForCausalLM, examples: Sequence[Example], batch_size: int = 64) -> float:
    """Mean cross-entropy per loss-carrying token over all ``examples``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = _collate(examples[start:start + batch_size], model.config.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="sum").item()
        count += int((labels != -100).sum())
    return total / count


@torch.no_grad()
def greedy_continuation(model: GPTNeoXForCausalLM, ids: list[int], num_tokens: int) -> list[int]:
    """The ``num_tokens`` tokens the model picks greedily after ``ids``."""
    ids = list(ids)
    for _ in range(num_tokens):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-num_tokens:]


def answer_accuracy(model: GPTNeoXForCausalLM, tokenizer: PreTrainedTokenizerFast,
                    pairs: Sequence[tuple[str, str]]) -> float:
    """Share of (prompt, completion) pairs whose greedy continuation of the prompt is exactly the completion."""
    right = 0
    for prompt, completion in pairs:
        ids, mask = _completion_example(tokenizer, prompt, completion)
        answer = [i for i, m in zip(ids, mask) if m]
        right += greedy_continuation(model, ids[:len(ids) - len(answer)], len(answer)) == answer
    return right / len(pairs)


def cloze_accuracy(model: GPTNeoXForCausalLM, tokenizer: PreTrainedTokenizerFast, facts: Sequence[Fact]) -> float:
    """Share of facts the pre-trained model completes right from the first paraphrase's prefix.

    E.g. "Zorbel Quint was born in the city of" -> " Vantor" (the alias in an alias world): a
    check that the facts were learned as the corpus states them.
    """
    pairs = []
    for fact in facts:
        prefix, _ = RELATIONS[fact.relation][2][0].split(" {value}")
        pairs.append((prefix.format(name=fact.subject), f" {fact.value}"))
    return answer_accuracy(model, tokenizer, pairs)


def alias_cloze_accuracy(model: GPTNeoXForCausalLM, tokenizer: PreTrainedTokenizerFast,
                         facts: Sequence[Fact]) -> float:
    """Share of entities whose alias the pre-trained model completes right from the first link
    template's prefix ("Zorbel Quint is better known as" -> " Mislo Karen"): the first hop learned."""
    aliases = {f.entity: f.alias for f in facts if f.alias}
    prefix, _ = LINK_TEMPLATES[0].split(" {alias}")
    return answer_accuracy(model, tokenizer, [(prefix.format(name=e), f" {a}") for e, a in aliases.items()])


def _save(model: GPTNeoXForCausalLM, tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- files and caching


def _is_complete(world: ToyWorld, key: dict) -> bool:
    """True when ``world.json`` matches ``key`` and every artifact is there."""
    try:
        saved = json.loads((world.root / "world.json").read_text())
    except (OSError, ValueError):
        return False
    if {k: saved.get(k) for k in key} != key:
        return False
    files = [world.corpus_path, world.finetune_path, world.queries_path]
    for directory in (world.pretrained_dir, world.finetuned_dir):
        files += [directory / "config.json", directory / "model.safetensors", directory / "tokenizer.json"]
    return all(f.is_file() for f in files)


def _write_parquet(path: Path, columns: dict[str, list[str]]) -> None:
    table = pa.table({name: pa.array(values, type=pa.string()) for name, values in columns.items()})
    pq.write_table(table, path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _move_into_place(source: Path, target: Path) -> None:
    """Replace ``target`` (file or directory) by ``source``; both are in the same filesystem."""
    if target.is_dir():
        shutil.rmtree(target)
    os.replace(source, target)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``, so that two processes never build the same world at once."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Run with ``count`` torch CPU threads, then restore the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _quiet_saves() -> Iterator[None]:
    """No transformers progress bars while saving the models (the build logs its own lines)."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
