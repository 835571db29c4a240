"""``msif query RUN_DIR``: ad hoc queries against a finished index-mode run, in one process, no Ray.

A query is preconditioned with the run's stored factors, by the run's chain (method, dampings,
rank); scanned against the corpus gradient index (a sparse product per index shard); and its best
candidates (``scoring.rerank``, at least ``top_k``) are re-scored exactly by a forward and backward
pass over those documents only. So the printed scores are exact, as ``topk.parquet``'s are, and a
query gets the top documents ``msif run`` would give it in index mode. The steps call the engine
functions the pipeline's workers call (``precondition_queries``, ``index.scan``, ``score``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

import torch

from msif_ray.config import Config, config_from_dict
from msif_ray.pipeline.keys import index_store
from msif_ray.distributed.worker import (ChainSpec, Normalization, StoredFactors, document_examples, normalized_scores,
                                        read_index_basis)
from msif_ray.engine.api import Examples, TrackedLM
from msif_ray.engine.index import IndexRows, rotate_queries, scan
from msif_ray.engine.influence import precondition_queries
from msif_ray.engine.topk import best_of, rerank_windows, top_changed
from msif_ray.engine.vectors import QueryVectors
from msif_ray.errors import UserError
from msif_ray.store import layout
from msif_ray.store.data import Document, PromptCompletion, expand_paths, plan_shards, read_documents
from msif_ray.store.models import load_model, load_tokenizer, pick_device, weight_dtype
from msif_ray.store.storage import RunDir

FACTOR_CACHE_BYTES = 1 << 30


class QueryError(UserError, ValueError):
    """The run directory cannot answer ad hoc queries (not an index-mode run, or not finished)."""


@dataclass
class Ranked:
    rank: int
    doc_id: str
    score: float
    text: str


@dataclass
class Answer:
    """One query's top documents by exact score, and what it took to find them."""

    query_id: str
    top: list[Ranked]
    candidates: int  # documents re-scored exactly
    seconds: dict[str, float]


def ask(run_dir: str, queries: list[PromptCompletion], show: int | None = None,
        log: Callable[[str], None] = print) -> list[Answer]:
    """The top ``show`` (default: the run's ``scoring.top_k``) documents of each query, exact scores.

    The candidates are re-scored as the run does: its ``scoring.rerank`` (at least ``top_k``) best
    estimates, then more round by round while a round changes the top k (``topk.rerank_windows``),
    so that the answer is the run's top k, whatever ``show`` is."""
    store = RunDir(run_dir)
    manifest = layout.read_manifest(store)
    config = _index_run_config(store, manifest)
    top_k = config.scoring.top_k
    show = show or top_k
    device = pick_device(config.ray.num_gpus_per_worker)
    dtype = weight_dtype(config.ray.precision, device)
    tokenizer = load_tokenizer(config.tokenizer, trust_remote_code=config.models.trust_remote_code)
    seconds: dict[str, float] = {}

    started = time.monotonic()
    vectors = _precondition(store, manifest, config, tokenizer, device, dtype, queries)
    seconds["precondition"] = time.monotonic() - started

    norm = None if config.scoring.normalize == "none" else Normalization(
        config.scoring.normalize, manifest["stages"]["self_influence"]["fingerprint"])
    started = time.monotonic()
    candidates = _scan(index_store(config, store), manifest["shards"]["corpus"], vectors, config.scoring.candidates,
                       store, norm)
    seconds["scan"] = time.monotonic() - started

    started = time.monotonic()
    lm = _tracked(config, config.corpus_model, tokenizer, device, dtype)
    exact: list[dict[str, float]] = [{} for _ in candidates]
    changing = [True] * len(candidates)
    documents: dict[str, Document] = {}
    for lo, hi in rerank_windows(config.scoring.rerank or top_k, config.scoring.candidates):
        wanted = [dict(found[lo:hi]) if changing[q] else {} for q, found in enumerate(candidates)]
        if not any(wanted):
            break
        found, read = _rescore(config, lm, vectors, wanted, store, norm)
        documents |= read
        for q, scores in enumerate(found):
            exact[q] |= scores
            changing[q] = changing[q] and bool(wanted[q]) and top_changed(exact[q], set(wanted[q]), top_k)
    seconds["rerank"] = time.monotonic() - started
    answers = []
    for q, query_id in enumerate(vectors.ids):
        order = best_of(exact[q], show)
        top = [Ranked(r + 1, doc, exact[q][doc], _shown_text(documents[doc], tokenizer)) for r, doc in enumerate(order)]
        answers.append(Answer(query_id, top, len(exact[q]), seconds))
    log(f"[query] {len(queries)} queries: preconditioned in {seconds['precondition']:.1f}s, index scanned in "
        f"{seconds['scan']:.1f}s, {sum(len(e) for e in exact)} candidates re-scored in {seconds['rerank']:.1f}s")
    return answers


def _index_run_config(store: RunDir, manifest: dict) -> Config:
    scores = manifest.get("stages", {}).get("scores", {})
    if "config" not in manifest or scores.get("state") != "done":
        raise QueryError(f"{store.url()}: no finished run here; run msif run on an index-mode config first")
    config = config_from_dict(manifest["config"], base_dir=".")
    if config.scoring.mode != "index":
        raise QueryError(f"{store.url()}: this run scored in scoring.mode: {config.scoring.mode}; msif query scans the "
                         "corpus gradient index, so it needs a run with scoring.mode: index")
    return config


def _precondition(store: RunDir, manifest: dict, config: Config, tokenizer, device, dtype,
                  queries: list[PromptCompletion]) -> QueryVectors:
    """Ṽ_q of the queries by the run's chain, its factors read from the run directory."""
    folders = {stage: layout.factors_dir(stage, manifest["stages"][stage]["fingerprint"])
               for stage in ("factors/pretrain", "factors/finetune") if stage in manifest["stages"]}
    spec = ChainSpec(config.method, folders.get("factors/pretrain"), folders.get("factors/finetune"),
                     config.factors.damping_pretrain, config.factors.damping_finetune, config.scoring.query_rank)
    lm = _tracked(config, config.query_model, tokenizer, device, dtype)
    ids = [q.id for q in queries]
    batches = lm.batches(Examples.pairs([q.prompt for q in queries], [q.completion for q in queries], ids))
    chain = StoredFactors(store, FACTOR_CACHE_BYTES).chain(spec)
    return precondition_queries(lm.model, lm.taps, batches, len(ids), chain, spec.rank, ids)


def _scan(index: RunDir, shard_ids: list[str], vectors: QueryVectors, wanted: int, store: RunDir,
          norm: Normalization | None) -> list[list[tuple[str, str]]]:
    """Per query, its ``wanted`` best documents by the index's estimate, best first: (doc id, shard id)
    (the top candidates ``msif run`` re-scores exactly and ranks the top k among)."""
    identity = index.read_json(layout.INDEX_IDENTITY)
    layers = [name for name, _, _ in identity["modules"]]  # the order of the rows' blocks
    rotated = rotate_queries(vectors, read_index_basis(index, identity["basis"], layers), layers)
    best = [(torch.empty(0, dtype=torch.float64), []) for _ in vectors.ids]
    for shard in shard_ids:
        tensors, metadata = index.load_tensors(layout.index_shard(shard))
        doc_ids = json.loads(metadata["doc_ids"])
        estimates = normalized_scores(scan(IndexRows.from_tensors(tensors), rotated, layers), norm, store, shard, doc_ids,
                                      vectors.whitened_norms())
        here = [(d, shard) for d in doc_ids]
        for q, (values, found) in enumerate(best):
            merged, pairs = torch.cat([values, estimates[:, q]]), found + here
            keep = torch.topk(merged, min(wanted, merged.numel())).indices.tolist()
            best[q] = merged[keep], [pairs[i] for i in keep]
    return [found for _, found in best]


def _rescore(config: Config, lm: TrackedLM, vectors: QueryVectors, candidates: list[dict[str, str]], store: RunDir,
             norm: Normalization | None) -> tuple[list[dict[str, float]], dict[str, Document]]:
    """Exact scores of each query's candidates ({doc id: score} per query, normalised as the run's),
    and the documents read."""
    corpus = config.data.corpus
    shards = {s.shard_id: s for s in plan_shards(expand_paths(corpus.paths), config.data.rows_per_shard, corpus.layout)}
    by_shard: dict[str, set[str]] = {}
    for found in candidates:
        for doc, shard in found.items():
            by_shard.setdefault(shard, set()).add(doc)
    missing = sorted(set(by_shard) - set(shards))
    if missing:
        raise QueryError(f"data.corpus: shards {missing[:3]} of the index are not in the corpus files any more; "
                         "rerun msif run")
    documents: dict[str, Document] = {}
    totals: dict[str, torch.Tensor] = {}
    for shard_id, wanted in by_shard.items():
        docs = [d for d in read_documents(shards[shard_id], *corpus.columns, bad=[])[0] if d.doc_id in wanted]
        scores = normalized_scores(lm.score(document_examples(docs), vectors).total, norm, store, shard_id,
                                   [d.doc_id for d in docs], vectors.whitened_norms())  # [N, Q]
        for k, doc in enumerate(docs):
            documents[doc.doc_id], totals[doc.doc_id] = doc, scores[k]
    exact = [{doc: float(totals[doc][q]) for doc in found if doc in totals} for q, found in enumerate(candidates)]
    return exact, documents


def _tracked(config: Config, model_path: str, tokenizer, device, dtype) -> TrackedLM:
    model = load_model(model_path, device, config.models.trust_remote_code, dtype)
    return TrackedLM(model, tokenizer, config.modules.include, config.modules.exclude, config.data.max_length,
                     config.ray.batch_size)


def _shown_text(doc: Document, tokenizer) -> str:
    return doc.text if doc.text is not None else tokenizer.decode(list(doc.input_ids))


def format_answers(answers: list[Answer], width: int = 100) -> str:
    """The answers as a person reads them: per query, rank, exact score, document id and the start of its text."""
    lines = []
    for a in answers:
        lines.append(f"query {a.query_id}: top {len(a.top)} of {a.candidates} candidates re-scored exactly")
        for r in a.top:
            text = " ".join(r.text.split())
            lines.append(f"  {r.rank:>3}  {r.score:+.4e}  {r.doc_id}  {text[:width]}{'…' if len(text) > width else ''}")
    return "\n".join(lines)
