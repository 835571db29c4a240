"""Top and bottom k tables: per-shard extremes of each query's scores, their merge, the final ranking."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

EXTREMES_SCHEMA = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("score", pa.float64()),
                             ("side", pa.string())])


def extremes_schema(with_raw: bool) -> pa.Schema:
    """The partial tables' schema; ``raw_score`` (the score before ``scoring.normalize``) when normalised."""
    return EXTREMES_SCHEMA.append(pa.field("raw_score", pa.float64())) if with_raw else EXTREMES_SCHEMA


def extremes_table(query_ids: list[str], doc_ids: list[str], totals: torch.Tensor, k: int,
                   raw: torch.Tensor | None = None) -> pa.Table:
    """The k highest (proponents) and k lowest (opponents) documents of each query: totals [N, Q]
    (with ``raw`` [N, Q] beside them as ``raw_score``, when the totals are normalised).

    Ties are broken by doc_id, as in ``merge_extremes``, so that merging per-shard tables gives
    exactly the global top k.
    """
    k = min(k, len(doc_ids))
    columns: dict[str, list] = {"query_id": [], "doc_id": [], "score": [], "side": []} | ({"raw_score": []} if raw is not None else {})
    docs = np.asarray(doc_ids, dtype=object)
    by_id = np.argsort(np.argsort(docs, kind="stable"), kind="stable")  # each document's rank by doc_id
    scores = totals.numpy()
    for side, sign in (("top", -1.0), ("bottom", 1.0)):
        for q, query_id in enumerate(query_ids):
            index = np.lexsort((by_id, sign * scores[:, q]))[:k]
            columns["query_id"] += [query_id] * k
            columns["doc_id"] += docs[index].tolist()
            columns["score"] += scores[index, q].tolist()
            columns["side"] += [side] * k
            if raw is not None:
                columns["raw_score"] += raw[index, q].tolist()
    return pa.table(columns, schema=extremes_schema(raw is not None))


def merge_extremes(tables: list[pa.Table], k: int) -> pa.Table:
    """The k best rows per (query, side) of several partial tables: one bounded merge step.

    Deterministic: ordered by query_id, side, score (descending for ``top``, ascending for
    ``bottom``), then doc_id. Memory: the inputs, i.e. at most fan-in x queries x 2k rows.
    """
    rows = pa.concat_tables(tables)
    key = pc.if_else(pc.equal(rows["side"], "top"), pc.negate(rows["score"]), rows["score"])
    rows = rows.append_column("_key", key).sort_by(
        [("query_id", "ascending"), ("side", "ascending"), ("_key", "ascending"), ("doc_id", "ascending")])
    rank = rank_within_groups(rows)
    return rows.filter(pa.array(rank < k)).drop_columns(["_key"])


def rank_within_groups(rows: pa.Table) -> np.ndarray:
    """0-based position of each row within its run of equal (query_id, side), rows being sorted by them."""
    n = rows.num_rows
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    query = rows["query_id"].to_numpy(zero_copy_only=False)
    side = rows["side"].to_numpy(zero_copy_only=False)
    starts = np.ones(n, dtype=bool)
    starts[1:] = (query[1:] != query[:-1]) | (side[1:] != side[:-1])
    start_index = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    return np.arange(n) - start_index


def final_table(merged: pa.Table, side: str) -> pa.Table:
    """The result schema (docs/design.md) for one side: query_id, rank (1-based int32), doc_id, score
    (and raw_score when the scores are normalised)."""
    rows = merged.filter(pc.equal(merged["side"], side))
    rank = rank_within_groups(rows) + 1
    raw = {"raw_score": rows["raw_score"]} if "raw_score" in rows.column_names else {}
    return pa.table({"query_id": rows["query_id"], "rank": pa.array(rank, pa.int32()), "doc_id": rows["doc_id"],
                     "score": rows["score"]} | raw)


def rerank_windows(first: int, most: int) -> list[tuple[int, int]]:
    """The candidate ranks (by the index's estimate) re-scored round by round: [0, R), [R, 2R),
    [2R, 4R), ... up to ``most``: each round as many as all the rounds before it."""
    windows, lo, hi = [], 0, first
    while lo < most:
        windows.append((lo, min(hi, most)))
        lo, hi = hi, 2 * hi
    return windows


def best_of(scores: dict[str, float], k: int) -> list[str]:
    """The k best doc ids of ``scores`` (doc id -> score), ties broken by doc id as in the tables."""
    return sorted(scores, key=lambda d: (-scores[d], d))[:k]


def top_changed(exact: dict[str, float], new: set[str], k: int) -> bool:
    """Whether a document of ``new`` is among the k best of ``exact``: the rule that keeps a query's
    adaptive re-scoring going."""
    return any(d in new for d in best_of(exact, k))
