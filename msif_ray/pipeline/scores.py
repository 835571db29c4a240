"""Stage ``scores`` in exact mode: every corpus document against each group of queries (one forward
and backward pass over the corpus per group), top and bottom k per shard, a tree of bounded merges.

``scores/topk.parquet`` and ``bottomk.parquet`` are copies of the current key's ``scores/<key>/``
tables, published again when another key wrote them or when they are damaged (``published``
reads and so verifies them: they are small); ``publish`` verifies the key's tables before copying.
"""

from __future__ import annotations

import time

from msif_ray.distributed.merge import tree_merge
from msif_ray.distributed.worker import Normalization, ShardJob
from msif_ray.pipeline.context import RunContext
from msif_ray.pipeline.inputs import Inputs
from msif_ray.pipeline.passes import combine_groups
from msif_ray.store import layout
from msif_ray.store.data import DataError
from msif_ray.store.storage import DamagedArtifactError


def scores_done(run: RunContext, key: str, named: dict) -> bool:
    """Whether the scores of ``key`` are done; they are then (re)published to ``scores/``."""
    if not published(run, key) and run.store.exists(layout.stage_record("scores", key)):
        publish(run, key)  # done for this key, but the result in scores/ is another key's, or damaged
    return run.records.is_done("scores", key, named)


def published(run: RunContext, key: str) -> bool:
    """Whether ``scores/`` holds the tables of ``key``, intact (a damaged one is reported)."""
    previous = run.records.manifest["stages"].get("scores", {})
    if previous.get("fingerprint") != key or previous.get("state") != "done":
        return False
    try:
        for name in (layout.TOPK, layout.BOTTOMK):
            run.store.read_parquet(name)
    except FileNotFoundError:
        return False
    except DamagedArtifactError as err:
        run.log(f"warning: {err}; publishing it again")
        return False
    return True


def publish(run: RunContext, key: str) -> None:
    """Copy the merged tables of ``key`` to ``scores/topk.parquet`` and ``scores/bottomk.parquet``,
    after reading them (``DamagedArtifactError`` when one is damaged: the pipeline merges again)."""
    for side, name in (("topk", layout.TOPK), ("bottomk", layout.BOTTOMK)):
        source = layout.scores_result(key, side)
        run.store.read_parquet(source)
        run.store.copy(source, name)


def merge_result(run: RunContext, key: str, partials: list[str], k: int) -> None:
    """The tree merge of per-shard (or per-batch) tables into the key's top and bottom k."""
    tree_merge(run.store, partials, k, lambda level, i: layout.merge_step(key, level, i),
               final=(layout.scores_result(key, "topk"), layout.scores_result(key, "bottomk")), run=run.passes.reduce)


def check_documents(stats: dict) -> None:
    """Refuse a corpus whose every document was empty (nothing was scored)."""
    if stats["documents"] == 0:
        raise DataError(f"data.corpus: every document is empty ({stats['skipped_empty']} rows skipped)")


def exact_scores(run: RunContext, inputs: Inputs, named: dict, query_files: list[str],
                 norm: Normalization | None) -> None:
    """Every document against every query group (normalised under ``norm``), merged into the key's tables."""
    cfg = run.config
    corpus = cfg.data.corpus
    key = named["key"]
    if scores_done(run, key, named):
        return
    started = time.monotonic()
    groups = query_groups(run, query_files)
    stats, partials = {}, []
    for g, files in enumerate(groups):
        jobs = [ShardJob("scores", s, layout.score_partial(key, g, s.shard_id), cfg.corpus_model, "documents",
                         corpus.columns) for s in inputs.corpus_shards]
        name = "scores" if len(groups) == 1 else f"scores/g{g}"
        stats[name] = run.passes.map(name, "scores", jobs, files, cfg.scoring.top_k, norm)
        partials += [j.output for j in jobs]
    check_documents({"documents": sum(s["documents"] for s in stats.values()),
                     "skipped_empty": next(iter(stats.values()))["skipped_empty"]})
    merge_result(run, key, partials, cfg.scoring.top_k)
    run.records.finish("scores", key, started, combine_groups(stats) if len(groups) > 1 else stats,
                       publish=lambda: publish(run, key))


def query_groups(run: RunContext, query_files: list[str]) -> list[tuple[str, ...]]:
    """The query batch files cut into the groups that fit the budget at once (one corpus pass each)."""
    per_group = run.plan.query_group_batches
    groups = [tuple(query_files[i : i + per_group]) for i in range(0, len(query_files), per_group)]
    if len(groups) > 1:
        run.log(f"[scores] the queries do not fit the budget at once: {len(groups)} query groups of up to "
                f"{per_group * run.plan.query_batch_size} queries, one pass each")
    return groups
