"""``msif report RUN_DIR``: a self-contained HTML report of a finished run, under ``<run_dir>/report/``.

    report/index.html            the run (models, data, method, dampings, stages with timings and
                                 reuse) and every query, with a search box over their text
    report/queries/<id>.html     one page per query: prompt and completion, the score distribution,
                                 the top proponents and opponents with their text, each token
                                 shaded by its share of the score, and each score split over layers
    report/breakdowns.parquet    the shown documents' numbers: query_id, side (top | bottom), rank,
                                 doc_id, score, layer_scores (per tracked layer), token_scores and
                                 token_offsets (per token, credited to the predicted token)
    report/report.json           what the report pass did (queries, documents, tokens, seconds, layers)

Proponents and opponents come from the scoring pass (``scores/topk.parquet`` and
``scores/bottomk.parquet``). The breakdowns are recomputed for the shown documents only, by a
small Ray pass (``msif_ray.distributed.report_pass``) that reads just the corpus shards holding
them (found through the scoring pass's per-shard top/bottom k files, ``scores/<key>/g<group>/
<shard>.parquet``; a shard whose file is gone has its ids read instead), so a report costs
seconds to minutes, never another pass over the corpus. The histogram
shows the scores the scoring pass kept: every document's when ``top_k`` covers the corpus, else
the top and bottom k (the page says which).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import defaultdict
from datetime import datetime, timezone
from typing import Callable

import pyarrow as pa

from msif_ray.config import Config, config_from_dict
from msif_ray.store.data import expand_paths, plan_shards, read_documents, read_pairs
from msif_ray.distributed.faults import FAULT_ENV
from msif_ray.distributed.pool import Deadline, WorkerPool
from msif_ray.distributed.report_pass import ExplainJob, ReportError, ReportSettings, ReportWorker
from msif_ray.store.digests import digest
from msif_ray.store import layout
from msif_ray.store.layout import BOTTOMK, BREAKDOWNS, MANIFEST, REPORT_INDEX, REPORT_STATS, TOPK
from msif_ray.progress import Progress, format_duration
from msif_ray.report.html import QueryView, RunView, ShownDocument, index_page, query_page
from msif_ray.store.storage import RunDir
from msif_ray.ops.summary import stage_rows

REPORT_VERSION = 3  # bump when the pages change, so that reruns of msif run / demo rebuild them
Rows = dict[str, list[tuple[int, str, float]]]  # query id -> [(rank, doc_id, score)] in rank order


def build_report(run_dir: str, show: int = 5, log: Callable[[str], None] = print, reuse: bool = False) -> str:
    """Write the report of the run in ``run_dir``; returns the URL of its index page.

    ``show``: proponents and opponents per query shown with their text and breakdowns.
    ``reuse``: keep an existing report of the same scores and settings (``msif run`` / ``demo``).
    """
    if show < 1:
        raise ReportError(f"show: at least one document per side must be shown, got {show}")
    started = time.monotonic()
    store = RunDir(run_dir)
    manifest = _finished_manifest(store)
    key = digest(manifest["stages"]["scores"]["fingerprint"], show, REPORT_VERSION)
    if reuse and store.exists(REPORT_STATS) and store.read_json(REPORT_STATS).get("fingerprint") == key:
        log("[report] up to date, skipped")
        return store.url(REPORT_INDEX)
    config = config_from_dict(manifest["config"], base_dir=".")
    top, bottom = _rows(store, TOPK), _rows(store, BOTTOMK)
    raw = _raw_scores(store)
    q = config.data.queries
    texts = {p.id: p for p in read_pairs(expand_paths(q.paths), q.prompt_column, q.completion_column, q.id_column)}
    query_ids = [i for i in texts if i in top] + sorted(set(top) - set(texts))

    wanted: dict[str, set[str]] = defaultdict(set)  # doc id -> the queries it is shown for
    for query_id in query_ids:
        for _, doc_id, _ in top[query_id][:show] + bottom.get(query_id, [])[:show]:
            wanted[doc_id].add(query_id)
    layers, explained, tokens, worker_seconds = _explain(store, config, manifest, wanted, log)

    pages = _page_names(query_ids)
    num_documents = manifest["stages"]["scores"].get("passes", {}).get("scores", {}).get("documents")
    views = []
    for query_id in query_ids:
        pair, tops, bottoms = texts.get(query_id), top[query_id], bottom.get(query_id, [])
        distribution, note = _distribution(tops, bottoms, num_documents, config.scoring.top_k)
        views.append(QueryView(
            query_id, pair.prompt if pair else "(not in the query files any more)", pair.completion if pair else "",
            pages[query_id], _shown(tops[:show], explained, query_id, raw), _shown(bottoms[:show], explained, query_id, raw),
            tops, bottoms, distribution, note))

    seconds = time.monotonic() - started
    run = RunView(store.url(), manifest["config"], stage_rows(manifest), layers,
                  f"This report: {len(explained)} shown documents re-scored per token and per layer "
                  f"({tokens:,} tokens) in {format_duration(seconds)}.",
                  f"generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", views, manifest.get("quarantine", []))
    store.remove(layout.REPORT_DIR)  # pages of queries that are gone must not linger
    for number, view in enumerate(views):
        previous = views[number - 1] if number > 0 else None
        following = views[number + 1] if number + 1 < len(views) else None
        page = query_page(view, layers, previous, following, number + 1, len(views))
        store.write_bytes(layout.report_page(view.page), page.encode("utf-8"))
    store.write_bytes(REPORT_INDEX, index_page(run).encode("utf-8"))
    store.write_parquet(BREAKDOWNS, breakdowns_table(views))
    store.write_json(REPORT_STATS, {
        "fingerprint": key, "queries": len(views), "documents": len(explained), "tokens": tokens, "show": show,
        "layers": layers, "worker_seconds": round(worker_seconds, 3), "seconds": round(time.monotonic() - started, 3)})
    log(f"[report] {len(views)} queries, {len(explained)} documents explained: {store.url(REPORT_INDEX)}")
    return store.url(REPORT_INDEX)


def breakdowns_table(views: list[QueryView]) -> pa.Table:
    """One row per shown (query, document): the numbers behind the pages, for notebooks and tests."""
    rows = [(v.query_id, side, d) for v in views for side, docs in (("top", v.proponents), ("bottom", v.opponents)) for d in docs]
    return pa.table({
        "query_id": pa.array([q for q, _, _ in rows], pa.string()),
        "side": pa.array([side for _, side, _ in rows], pa.string()),
        "rank": pa.array([d.rank for _, _, d in rows], pa.int32()),
        "doc_id": pa.array([d.doc_id for _, _, d in rows], pa.string()),
        "score": pa.array([d.score for _, _, d in rows], pa.float64()),
        "raw_score": pa.array([d.score if d.raw is None else d.raw for _, _, d in rows], pa.float64()),
        "layer_scores": pa.array([d.layers for _, _, d in rows], pa.list_(pa.float64())),
        "token_scores": pa.array([d.tokens for _, _, d in rows], pa.list_(pa.float64())),
        "token_offsets": pa.array([[list(o) for o in d.offsets] for _, _, d in rows], pa.list_(pa.list_(pa.int32()))),
        "segment_starts": pa.array([d.starts for _, _, d in rows], pa.list_(pa.int32())),
        "segment_scores": pa.array([d.segments for _, _, d in rows], pa.list_(pa.float64())),
    })


def _finished_manifest(store: RunDir) -> dict:
    if not store.exists(MANIFEST):
        raise ReportError(f"{store.url()}: no {MANIFEST}; is this a run directory? (run msif run first)")
    manifest = store.read_json(MANIFEST)
    if manifest.get("stages", {}).get("scores", {}).get("state") != "done" or not store.exists(TOPK):
        raise ReportError(f"{store.url()}: the scores stage has not finished; run (or resume) msif run first")
    return manifest


def _rows(store: RunDir, name: str) -> Rows:
    rows: Rows = defaultdict(list)
    if store.exists(name):
        for r in store.read_parquet(name).to_pylist():
            rows[r["query_id"]].append((r["rank"], r["doc_id"], r["score"]))
    return rows


def _raw_scores(store: RunDir) -> dict[tuple[str, str], float]:
    """(query id, doc id) -> the raw score, when the run's scores are normalised (``raw_score``); else empty."""
    raw = {}
    for name in (TOPK, BOTTOMK):
        table = store.read_parquet(name) if store.exists(name) else None
        if table is not None and "raw_score" in table.column_names:
            raw |= {(q, d): r for q, d, r in zip(*(table[c].to_pylist() for c in ("query_id", "doc_id", "raw_score")))}
    return raw


def _page_names(query_ids: list[str]) -> dict[str, str]:
    """A file name per query: its id when that is a safe name, else a safe stem plus a hash of the id."""
    names = {}
    for query_id in query_ids:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", query_id)[:60].lstrip(".") or "query"
        if stem != query_id or stem.lower() in {n.lower() for n in names.values()}:
            stem += "-" + hashlib.sha256(query_id.encode("utf-8")).hexdigest()[:8]
        names[query_id] = stem + ".html"
    return names


def _distribution(top: list, bottom: list, num_documents: int | None, top_k: int) -> tuple[list[float], str]:
    """The scores a histogram can show, and a caption saying which scores they are."""
    if num_documents is not None and len(top) >= num_documents:
        return [s for _, _, s in top], f"Scores of all {num_documents:,} scored documents."
    kept = {doc: s for _, doc, s in top + bottom}
    of = f" of {num_documents:,} scored documents" if num_documents is not None else ""
    return list(kept.values()), (
        f"Only the top and bottom k = {top_k} scores{of} are kept by the scoring pass, so this shows those "
        f"{len(kept)}; the middle of the distribution is not recorded (raise scoring.top_k to see more).")


def _shown(rows: list[tuple[int, str, float]], explained: dict[str, dict], query_id: str,
           raw: dict[tuple[str, str], float]) -> list[ShownDocument]:
    """The shown documents of one side of one query, with their breakdowns from the report pass (which
    split the raw score, ``raw`` when the scores are normalised)."""
    shown = []
    for rank, doc_id, score in rows:
        doc = explained[doc_id]
        breakdown = doc["queries"][query_id]
        shown.append(ShownDocument(rank, doc_id, score, doc["text"], [tuple(o) for o in doc["offsets"]],
                                   breakdown["tokens"], breakdown["layers"], doc["starts"], breakdown["segments"],
                                   raw.get((query_id, doc_id))))
    return shown


# --------------------------------------------------------------------------- the Ray pass


def _explain(store: RunDir, config: Config, manifest: dict, wanted: dict[str, set[str]],
             log: Callable[[str], None]) -> tuple[list[str], dict[str, dict], int, float]:
    """Per-token and per-layer breakdowns of the wanted documents, one job per shard holding some.

    Returns (tracked layer names, {doc id: the worker's document record}, tokens processed,
    seconds the workers spent on the jobs, model loading included, actor start-up not).
    """
    corpus = config.data.corpus
    shards = plan_shards(expand_paths(corpus.paths), config.data.rows_per_shard, corpus.layout)
    if [s.shard_id for s in shards] != manifest.get("shards", {}).get("corpus"):
        raise ReportError(f"data.corpus: the files at {list(corpus.paths)} are not the ones this run scored "
                         "(their shards differ); rerun msif run before the report")
    partials: dict[str, list[str]] = {}  # shard id -> its partial top/bottom k files (one per query group)
    for name in store.list(layout.stage_dir("scores", manifest["stages"]["scores"]["fingerprint"])):
        shard = layout.score_partial_shard(name)
        if shard is not None:
            partials.setdefault(shard, []).append(name)
    jobs, remaining = [], set(wanted)
    for shard in shards:
        if not remaining:
            break
        here = remaining & _doc_ids(store, partials.get(shard.shard_id, []), shard, corpus.columns)
        if here:
            jobs.append(ExplainJob(shard, corpus.columns,
                                   tuple((doc, tuple(sorted(wanted[doc]))) for doc in sorted(here))))
            remaining -= here
    if remaining:
        raise ReportError(f"data.corpus: documents {sorted(remaining)[:5]} of the scores are not in the corpus any more; "
                         "rerun msif run before the report")
    cfg = config.ray
    settings = ReportSettings(store.url(), config.corpus_model, config.tokenizer, config.modules.include,
                              config.modules.exclude, config.data.max_length, cfg.batch_size, cfg.num_cpus_per_worker,
                              cfg.num_gpus_per_worker, config.models.trust_remote_code, os.environ.get(FAULT_ENV))
    pool = WorkerPool(ReportWorker, max(1, min(cfg.num_workers, len(jobs))), cfg.num_cpus_per_worker,
                      cfg.num_gpus_per_worker, settings)
    progress = Progress("report", len(jobs), log)
    layers, explained, tokens, seconds = [], {}, 0, 0.0
    try:
        for _, result in pool.map("explain", jobs, deadline=Deadline(cfg.task_timeout_s)):
            layers = result["layers"]
            explained.update({d["doc_id"]: d for d in result["documents"]})
            tokens += result["tokens"]
            seconds += result["seconds"]
            progress.update(result["tokens"], len(result["documents"]))
    finally:
        pool.shutdown()
    return layers, explained, tokens, seconds


def _doc_ids(store: RunDir, partials: list[str], shard, columns: tuple[str | None, ...]) -> set[str]:
    """The ids a shard may hold among the scored ones: from its partial top/bottom k when stored, else its rows."""
    if partials:
        return {d for name in partials for d in store.read_parquet(name).column("doc_id").to_pylist()}
    return {d.doc_id for d in read_documents(shard, *columns, bad=[])[0]}  # bad rows: quarantined, never scored
