"""Stages ``index`` and ``scores`` in index mode: the corpus gradient index, then scores by it.

The index holds each corpus document's largest gradient terms at θ_pt, in the pre-training
eigenbasis (``engine/index.py``),
one file per content-named shard, so appended shards are indexed alone and every run of the same
base model reuses it. Scoring scans it (a matrix product per shard and query batch), keeps each
query's best ``scoring.rerank`` candidates, and re-scores them exactly: ``topk.parquet`` holds
exact scores. Every output is per (query batch, shard), so new queries pay only for themselves.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import pyarrow as pa

from msif_ray.distributed.merge import tree_merge
from msif_ray.distributed.worker import Normalization, RerankJob, RotateJob, ScanJob, ShardJob, StoredFactors
from msif_ray.engine.index import TermBasis
from msif_ray.engine.topk import best_of, rank_within_groups, rerank_windows, top_changed
from msif_ray.pipeline.context import RunContext
from msif_ray.pipeline.inputs import Inputs
from msif_ray.pipeline.keys import check_identity, index_store
from msif_ray.pipeline.passes import pending_chunks
from msif_ray.pipeline.scores import check_documents, merge_result, publish, scores_done
from msif_ray.store import layout
from msif_ray.store.digests import digest
from msif_ray.store.storage import RunDir


def build_index(run: RunContext, inputs: Inputs, pretrain: str | None, identity: dict,
                self_influence_key: str | None = None) -> RunDir:
    """Index every corpus shard not in the index yet (a shard is named by its content). A new index
    first stores its basis, the eigenbasis of the pre-training factors under ``pretrain`` (None: the
    identity), then its identity. With ``self_influence_key`` (``scoring.normalize``), the pass
    also writes the self-influence of the shards it indexes, when its weights are the
    self-influence's (``fused_self_influence``): the ``self_influence`` stage then reuses them."""
    cfg = run.config
    store = index_store(cfg, run.store)
    check_identity(store, identity, "index.path")
    made_from = {"factors": pretrain or "", "damping": json.dumps(cfg.factors.damping_pretrain)}
    if not store.exists(layout.INDEX_IDENTITY):
        factors = StoredFactors(run.store, 0)  # keeps one layer's factors at a time
        for spec in inputs.layers:
            basis = TermBasis.of(None if pretrain is None else factors.layer(pretrain, spec.name),
                                 cfg.factors.damping_pretrain)
            store.save_tensors(layout.index_basis_layer(identity["basis"], spec.name), basis.tensors(), made_from)
        store.write_json(layout.INDEX_IDENTITY, identity)
    started = time.monotonic()
    corpus = cfg.data.corpus
    jobs = [ShardJob("index", s, layout.index_shard(s.shard_id), cfg.corpus_model, "documents",
                     corpus.columns) for s in inputs.corpus_shards]
    groups = tuple(tuple(g) for g in run.plan.layer_groups)
    fused = self_influence_key if self_influence_key and fused_self_influence(store, identity["basis"], inputs, made_from) else None
    stats = run.passes.map("index", "index", jobs, store.url(), identity["basis"], cfg.index.terms, groups, fused,
                           store=store)
    check_documents(stats)
    run.log(f"[index] {store.url()}: {stats['reused']} shards reused, {stats['computed']} indexed "
            f"({cfg.index.terms} terms per layer{', and their self-influence' if fused else ''}, {stats['seconds']:.1f}s)")
    outcome = "reused" if stats["computed"] == 0 else "computed"
    run.records.manifest["stages"]["index"] = {
        "inputs": identity, "outcome": outcome, "reason": f"{stats['computed']} of {stats['shards_total']} shards indexed"}
    run.records.finish("index", digest(identity, [j.job_id for j in jobs]), started, {"index": stats},
                       done_record=False)
    return store


def fused_self_influence(store: RunDir, folder: str, inputs: Inputs, made_from: dict[str, str]) -> bool:
    """Whether the index's term weights w = (Λ + λ)^(-1/2) are those of this run's self-influence: its
    basis (under ``folder``) was made from the same pre-training factors with the same λ (an index
    from before this was recorded: no)."""
    made = store.tensor_header(layout.index_basis_layer(folder, inputs.layers[0].name)).get("__metadata__", {})
    return {name: made.get(name) for name in made_from} == made_from


def index_scores(run: RunContext, inputs: Inputs, named: dict, query_files: list[str], index: RunDir,
                 identity: dict, norm: Normalization | None) -> None:
    """Each query's best candidates by a scan of the index, then the best ``scoring.rerank`` of them
    re-scored exactly (a forward and backward pass over those documents only), then more, round by
    round, while a round changes the query's top k (``rescore_candidates``). Estimates and exact
    scores are normalised alike under ``norm``."""
    cfg = run.config
    num_candidates = cfg.scoring.candidates
    scan_key = digest(identity, num_candidates) if norm is None else digest(identity, num_candidates, [norm.how, norm.key])
    key = named["key"]
    if scores_done(run, key, named):
        return
    started = time.monotonic()
    rotated, stats = rotate_batches(run, scan_key, query_files, index, identity)
    outputs = {(shard.shard_id, f): layout.scan_partial(scan_key, f, shard.shard_id)
               for shard in inputs.corpus_shards for f in query_files}
    finished = run.passes.finished(list(outputs.values()))
    jobs = []
    for shard in inputs.corpus_shards:
        here = {f: outputs[(shard.shard_id, f)] for f in query_files}
        for files in pending_chunks(query_files, here, run.plan.query_group_batches, finished):
            jobs.append(ScanJob(shard.shard_id, layout.index_shard(shard.shard_id), files,
                                tuple(rotated[f] for f in files), tuple(here[f] for f in files)))
    stats["scan"] = run.passes.map("scan", "scan", jobs, index.url(), num_candidates,
                                   tuple(s.name for s in inputs.layers), norm)
    candidates = {}
    for f in query_files:
        candidates[f] = layout.batch_candidates(scan_key, f, inputs.digests["data.corpus"])
        if not run.store.exists(candidates[f]):
            partials = [layout.scan_partial(scan_key, f, s.shard_id) for s in inputs.corpus_shards]
            tree_merge(run.store, partials, num_candidates,
                       lambda level, i: layout.candidates_merge_step(candidates[f], level, i), output=candidates[f],
                       run=run.passes.reduce)
    final = [candidates[f] for f in query_files]
    if cfg.scoring.rerank:
        final, passes, accounts = rescore_candidates(run, inputs, scan_key, query_files, candidates, norm)
        stats |= passes
    merge_result(run, key, final, cfg.scoring.top_k)
    if cfg.scoring.rerank:
        stats["candidates"] = candidate_summary(run, key, accounts)
    run.records.finish("scores", key, started, stats, publish=lambda: publish(run, key))


def rotate_batches(run: RunContext, scan_key: str, query_files: list[str], index: RunDir, identity: dict
                   ) -> tuple[dict[str, tuple[str, ...]], dict]:
    """Every query batch rotated into the index's basis once for the scan (``RotateJob``), one job
    per (query group, layer group): each layer's basis is read once per query group, where each
    scan worker would read it once per batch (~90 GiB for a 7B model). Returns each batch's rotated
    files (one per layer group) and the pass's stats."""
    groups = [tuple(g) for g in run.plan.layer_groups]
    rotated = {f: tuple(layout.rotated_batch(scan_key, f, digest(g)) for g in groups) for f in query_files}
    finished = run.passes.finished([name for files in rotated.values() for name in files])
    jobs = []
    for g, layers in enumerate(groups):
        outputs = {f: rotated[f][g] for f in query_files}
        for files in pending_chunks(query_files, outputs, run.plan.query_group_batches, finished):
            jobs.append(RotateJob(layers, files, tuple(outputs[f] for f in files)))
    return rotated, {"rotate": run.passes.map("rotate", "rotate", jobs, index.url(), identity["basis"])}


@dataclass
class QueryCandidates:
    """One query's candidates in the index's order (doc id, shard) and the exact scores found so far."""

    ranked: list[tuple[str, str]]
    exact: dict[str, float] = field(default_factory=dict)
    reached: int = 0  # candidates re-scored
    changing: bool = True  # the last round changed the top k


def rescore_candidates(run: RunContext, inputs: Inputs, scan_key: str, query_files: list[str],
                       candidates: dict[str, str], norm: Normalization | None
                       ) -> tuple[list[str], dict, dict[tuple[str, str], QueryCandidates]]:
    """Exact scores of the candidates, round by round (``topk.rerank_windows``): first each query's
    ``scoring.rerank`` best estimates (and its first ``top_k`` opponents), then, for the queries
    whose top k the round changed, as many again, up to ``scoring.candidates``. Returns the score
    files, the rounds' pass stats, and each (batch, query)'s candidates."""
    cfg = run.config
    top_k = cfg.scoring.top_k
    queries: dict[tuple[str, str], QueryCandidates] = {}
    opponents: dict[str, list[tuple[str, str, str]]] = {}  # batch -> (query, doc, shard)
    for f in query_files:
        table = run.store.read_parquet(candidates[f])
        columns = (table[c].to_pylist() for c in ("query_id", "doc_id", "side", "shard"))
        for (query, doc, side, shard), rank in zip(zip(*columns), rank_within_groups(table)):
            if side == "top":
                queries.setdefault((f, query), QueryCandidates([])).ranked.append((doc, shard))
            elif rank < top_k:
                opponents.setdefault(f, []).append((query, doc, shard))
    files, stats = [], {}
    for round_, (lo, hi) in enumerate(rerank_windows(cfg.scoring.rerank, cfg.scoring.candidates)):
        wanted = {fq: c.ranked[lo:hi] for fq, c in queries.items() if c.changing and c.ranked[lo:hi]}
        if not wanted:
            break
        pairs: dict[str, dict[str, list]] = {}  # shard id -> batch file -> its pairs in that shard
        for (f, query), found in wanted.items():
            for doc, shard in found:
                pairs.setdefault(shard, {}).setdefault(f, []).append((query, doc, "top"))
        for f, found in (opponents.items() if round_ == 0 else ()):
            for query, doc, shard in found:
                pairs.setdefault(shard, {}).setdefault(f, []).append((query, doc, "bottom"))
        outputs, stats["rerank" if round_ == 0 else f"rerank/{round_ + 1}"] = _rescore_pairs(run, inputs, scan_key,
                                                                                            query_files, pairs, norm)
        files += [output for _, output in outputs]
        for f, output in outputs:
            table = run.store.read_parquet(output)
            for query, doc, score, side in zip(*(table[c].to_pylist() for c in ("query_id", "doc_id", "score", "side"))):
                if side == "top":
                    queries[(f, query)].exact[doc] = score
        for fq, found in wanted.items():
            c = queries[fq]
            c.reached = lo + len(found)
            c.changing = top_changed(c.exact, {d for d, _ in found}, top_k)
    return files, stats, queries


def _rescore_pairs(run: RunContext, inputs: Inputs, scan_key: str, query_files: list[str],
                   pairs: dict[str, dict[str, list]], norm: Normalization | None) -> tuple[list[tuple[str, str]], dict]:
    """One round of exact re-scoring: the given (query, doc, side) pairs of each shard and batch.
    Returns (batch file, score file) of each output, and the pass's stats."""
    cfg = run.config
    corpus = cfg.data.corpus
    here = {shard: {f: tuple(sorted(p)) for f, p in batches.items()} for shard, batches in pairs.items()}
    outputs = {shard: {f: layout.rerank_partial(scan_key, f, shard, digest(p)) for f, p in batches.items()}
               for shard, batches in here.items()}
    finished = run.passes.finished([name for batches in outputs.values() for name in batches.values()])
    jobs, files = [], []
    for shard in (s for s in inputs.corpus_shards if s.shard_id in here):
        shard_pairs, shard_outputs = here[shard.shard_id], outputs[shard.shard_id]
        batches = [f for f in query_files if f in shard_pairs]
        files += [(f, shard_outputs[f]) for f in batches]
        # one job per batch: the documents scored together (their padding, their float sums) depend on that
        # batch's own candidates only, so a grown queries file re-scores its new batch as a fresh run does
        for chunk in pending_chunks(batches, shard_outputs, 1, finished):
            documents = frozenset(d for f in chunk for _, d, _ in shard_pairs[f])
            read = ShardJob("rerank", shard, "", cfg.corpus_model, "documents", corpus.columns, doc_ids=documents)
            jobs.append(RerankJob(read, chunk, tuple(shard_pairs[f] for f in chunk),
                                  tuple(shard_outputs[f] for f in chunk)))
    return files, run.passes.map("rerank", "rescore", jobs, norm)


def candidate_summary(run: RunContext, key: str, queries: dict[tuple[str, str], QueryCandidates]) -> dict:
    """How index mode found each query's top k, per query in ``scores/<key>/candidates.parquet`` and
    summed up for the manifest (``msif status``): how many candidates it re-scored, whether its last
    round still changed the top k (the index may have missed documents: raise
    ``scoring.rerank_max``), how many of the returned top k the index alone ranked in its first k,
    and the deepest index rank a returned document came from."""
    top_k = run.config.scoring.top_k
    rows: dict[str, list] = {"query_id": [], "rescored": [], "still_changing": [], "found_by_index": [],
                             "deepest_rank": []}
    for (_, query), c in queries.items():
        returned = best_of(c.exact, top_k)
        rank = {doc: r for r, (doc, _) in enumerate(c.ranked)}
        rows["query_id"].append(query)
        rows["rescored"].append(c.reached)
        rows["still_changing"].append(c.changing and len(c.ranked) >= run.config.scoring.candidates)
        rows["found_by_index"].append(sum(rank[d] < top_k for d in returned))
        rows["deepest_rank"].append(1 + max((rank[d] for d in returned), default=-1))
    run.store.write_parquet(layout.scores_result(key, "candidates"), pa.table(rows))
    n = max(len(rows["query_id"]), 1)
    return {"queries": len(rows["query_id"]), "top_k": top_k,
            "rescored_per_query": sum(rows["rescored"]) / n, "rescored_max": max(rows["rescored"], default=0),
            "still_changing": sum(rows["still_changing"]),
            "found_by_index_share": sum(rows["found_by_index"]) / (n * top_k),
            "deepest_rank_max": max(rows["deepest_rank"], default=0)}
