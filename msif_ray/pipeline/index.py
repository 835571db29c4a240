"""Stages ``index`` and ``scores`` in index mode: the corpus gradient index, then scores by it.

The index holds each corpus document's whitened, projected gradient at θ_pt (``engine/index.py``),
one file per content-named shard, so appended shards are indexed alone and every run of the same
base model reuses it. Scoring scans it (a matrix product per shard and query batch), keeps each
query's best ``scoring.rerank`` candidates, and re-scores them exactly: ``topk.parquet`` holds
exact scores. Every output is per (query batch, shard), so new queries pay only for themselves.
"""

from __future__ import annotations

import time

from msif_ray.distributed.merge import tree_merge
from msif_ray.distributed.worker import RerankJob, ScanJob, ShardJob, StoredFactors
from msif_ray.engine.index import random_projections
from msif_ray.engine.topk import rank_within_groups
from msif_ray.pipeline.context import RunContext
from msif_ray.pipeline.inputs import Inputs
from msif_ray.pipeline.keys import check_identity, index_store
from msif_ray.pipeline.scores import check_documents, merge_result, publish, scores_done
from msif_ray.store import layout
from msif_ray.store.digests import digest
from msif_ray.store.storage import RunDir


def build_index(run: RunContext, inputs: Inputs, pretrain: str | None, identity: dict) -> RunDir:
    """Index every corpus shard not in the index yet (a shard is named by its content). A new index
    first stores its projections, whitened by the pre-training factors under ``pretrain`` (None:
    not whitened), then its identity."""
    cfg = run.config
    store = index_store(cfg, run.store)
    check_identity(store, identity, "index.path")
    if not store.exists(layout.INDEX_IDENTITY):
        factors = StoredFactors(run.store, 0)  # keeps one layer's factors at a time
        load = None if pretrain is None else (lambda layer: factors.layer(pretrain, layer))
        for spec in inputs.layers:
            projection = random_projections([spec], cfg.index.dim, cfg.index.seed, factors=load)[spec.name]
            store.save_tensors(layout.index_projection(identity["projections"], spec.name), projection.tensors())
        store.write_json(layout.INDEX_IDENTITY, identity)
    started = time.monotonic()
    corpus = cfg.data.corpus
    jobs = [ShardJob("index", s, layout.index_shard(s.shard_id), cfg.corpus_model, "documents",
                     corpus.columns) for s in inputs.corpus_shards]
    stats = run.passes.map("index", "index", jobs, store.url(), identity["projections"], store=store)
    check_documents(stats)
    run.log(f"[index] {store.url()}: {stats['reused']} shards reused, {stats['computed']} indexed "
            f"(k = {cfg.index.dim}, {stats['seconds']:.1f}s)")
    outcome = "reused" if stats["computed"] == 0 else "computed"
    run.records.manifest["stages"]["index"] = {
        "inputs": identity, "outcome": outcome, "reason": f"{stats['computed']} of {stats['shards_total']} shards indexed"}
    run.records.finish("index", digest(identity, [j.job_id for j in jobs]), started, {"index": stats},
                       done_record=False)
    return store


def index_scores(run: RunContext, inputs: Inputs, named: dict, query_files: list[str], index: RunDir,
                 identity: dict) -> None:
    """Each query's best candidates by a matrix product over the index, then ``scoring.rerank`` of
    them re-scored exactly (a forward and backward pass over those documents only)."""
    cfg = run.config
    top_k, rerank = cfg.scoring.top_k, cfg.scoring.rerank
    num_candidates = top_k if rerank == 0 else max(rerank, top_k)
    scan_key = digest(identity, num_candidates)
    key = named["key"]
    if scores_done(run, key, named):
        return
    started = time.monotonic()
    jobs = []
    for shard in inputs.corpus_shards:
        outputs = {f: layout.scan_partial(scan_key, f, shard.shard_id) for f in query_files}
        for files in run.passes.pending_chunks(query_files, outputs, run.plan.query_group_batches):
            jobs.append(ScanJob(shard.shard_id, layout.index_shard(shard.shard_id), files,
                                tuple(outputs[f] for f in files)))
    stats = {"scan": run.passes.map("scan", "scan", jobs, index.url(), identity["projections"], num_candidates,
                                    tuple(s.name for s in inputs.layers))}
    candidates = {}
    for f in query_files:
        candidates[f] = layout.batch_candidates(scan_key, f, inputs.digests["data.corpus"])
        if not run.store.exists(candidates[f]):
            partials = [layout.scan_partial(scan_key, f, s.shard_id) for s in inputs.corpus_shards]
            tree_merge(run.store, partials, num_candidates,
                       lambda level, i: layout.candidates_merge_step(candidates[f], level, i), output=candidates[f])
    final = [candidates[f] for f in query_files]
    if rerank:
        final, stats["rerank"] = rescore_candidates(run, inputs, scan_key, query_files, candidates)
    merge_result(run, key, final, top_k)
    run.records.finish("scores", key, started, stats, publish=lambda: publish(run, key))


def rescore_candidates(run: RunContext, inputs: Inputs, scan_key: str, query_files: list[str],
                       candidates: dict[str, str]) -> tuple[list[str], dict]:
    """Exact scores of each batch's candidate pairs, shard by shard; returns the files and the pass's stats.

    Every top candidate is re-scored; of the bottom (opponent) candidates only the first k,
    since only ``topk.parquet`` is the ranking asked for."""
    cfg = run.config
    corpus = cfg.data.corpus
    pairs: dict[str, dict[str, tuple]] = {}  # shard id -> batch file -> its candidate pairs in that shard
    for f in query_files:
        table = run.store.read_parquet(candidates[f])
        found: dict[str, list] = {}
        columns = (table[c].to_pylist() for c in ("query_id", "doc_id", "side", "shard"))
        for (query, doc, side, shard), rank in zip(zip(*columns), rank_within_groups(table)):
            if side == "top" or rank < cfg.scoring.top_k:
                found.setdefault(shard, []).append((query, doc, side))
        for shard, items in found.items():
            pairs.setdefault(shard, {})[f] = tuple(sorted(items))
    jobs, files = [], []
    for shard in inputs.corpus_shards:
        here = pairs.get(shard.shard_id, {})
        outputs = {f: layout.rerank_partial(scan_key, f, shard.shard_id, digest(p)) for f, p in here.items()}
        files += [outputs[f] for f in query_files if f in here]
        batches = [f for f in query_files if f in here]
        for chunk in run.passes.pending_chunks(batches, outputs, run.plan.query_group_batches):
            documents = frozenset(d for f in chunk for _, d, _ in here[f])
            read = ShardJob("rerank", shard, "", cfg.corpus_model, "documents", corpus.columns,
                            doc_ids=documents)
            jobs.append(RerankJob(read, chunk, tuple(here[f] for f in chunk), tuple(outputs[f] for f in chunk)))
    return files, run.passes.map("rerank", "rescore", jobs)
