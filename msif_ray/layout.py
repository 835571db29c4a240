"""Where every artifact lives in a run directory: the one place that names them.

    manifest.json                                       config, shards, per stage: key, state, timings, stats
    factors/<pretrain|finetune>/<key>/
        factors.json                                    the fitted factors' index: layers, counts, fisher
        layers/<layer>.safetensors                      Q_A [in, in], Q_S [out, out], lambda [out, in] of one layer
        covariance/g<group>/<worker>-<seq>.safetensors  a worker's checkpoint of Σ a aᵀ, Σ s sᵀ (+ .json: its shards)
        eigen/<layer>.<A|S>.safetensors                 eigenvectors and eigenvalues of one factor
        lambdas/g<group>/<worker>-<seq>.safetensors     a worker's checkpoint of Σ (Q_Sᵀ G Q_A)² (+ .json)
    queries/<key>/batch-<n>.safetensors                 Ṽ_q of one batch of queries (+ .done.json)
    scores/<key>/g<group>/<shard>.parquet               top and bottom k per query of one shard (+ .done.json)
    scores/<key>/merge/<level>-<n>.parquet              a step of the tree merge
    scores/scan/<scan key>/<batch>/<shard>.parquet      index mode: one query batch's best candidates in one index
                                                        shard, by estimate, with the shard id (+ .done.json)
    scores/scan/<scan key>/<batch>/candidates-<corpus key>.parquet   that batch's candidates over the corpus
    scores/rerank/<scan key>/<batch>/<shard>-<pairs key>.parquet     exact scores of those candidates in one shard
    scores/topk.parquet  scores/bottomk.parquet         the result
    nights/<date>/topk.parquet, bottomk.parquet         msif nightly: copies of the result of the night <date>
    nights/<date>/night.json                            that night: times, per stage recomputed or reused, fingerprints
    nights/history/<start>-<date>-<id>.json             one record per night attempt, good or failed (never rewritten)
    nights/latest.json                                  the pointer to the last good night (written after its files)

The corpus gradient index (``index.path``, default ``<run_dir>/index``) is a store of its own,
shared by the runs of one base model:

    index.json                                          its identity: model, tokenizer, layers, max_length, dim, seed
    shards/<shard>.safetensors                          rows [N, D] float16, scale [N, L]; doc ids (+ .done.json)

``<key>`` is the stage's fingerprint: outputs of another configuration never mix in. In index
mode the unit of reuse is the query batch: ``<scan key>`` covers the index and the candidate
count, ``<batch>`` names the batch file, so new queries are scanned and re-scored alone. ``<date>``
is YYYY-MM-DD; ``<start>`` the attempt's start, UTC, as YYYYMMDDTHHMMSS.mmmZ (names sort by start).
"""

from __future__ import annotations

import hashlib

MANIFEST = "manifest.json"
TOPK = "scores/topk.parquet"
BOTTOMK = "scores/bottomk.parquet"


def factors_dir(stage: str, key: str) -> str:
    return f"{stage}/{key}"


def factors_index(factors: str) -> str:
    return f"{factors}/factors.json"


def factor_layer(factors: str, layer: str) -> str:
    return f"{factors}/layers/{layer}.safetensors"


def checkpoint_dir(factors: str, pass_name: str, group: int) -> str:
    return f"{factors}/{pass_name}/g{group}"


def eigen_file(factors: str, layer: str, which: str) -> str:
    return f"{factors}/eigen/{layer}.{which}.safetensors"


def query_batch(key: str, index: int) -> str:
    return f"queries/{key}/batch-{index:05d}.safetensors"


def score_partial(key: str, group: int, shard_id: str) -> str:
    return f"scores/{key}/g{group}/{shard_id}.parquet"


def merge_step(key: str, level: int, index: int) -> str:
    return f"scores/{key}/merge/{level}-{index:05d}.parquet"


def done_marker(output: str) -> str:
    """A shard's output is complete once this small JSON exists (it is written after the output)."""
    return output + ".done.json"


INDEX_IDENTITY = "index.json"


def index_shard(shard_id: str) -> str:
    return f"shards/{shard_id}.safetensors"


def batch_id(batch_file: str) -> str:
    """A query batch's name in the scoring outputs (its file is named by what it holds)."""
    return hashlib.sha256(batch_file.encode()).hexdigest()[:16]


def scan_partial(scan_key: str, batch_file: str, shard_id: str) -> str:
    return f"scores/scan/{scan_key}/{batch_id(batch_file)}/{shard_id}.parquet"


def batch_candidates(scan_key: str, batch_file: str, corpus_key: str) -> str:
    return f"scores/scan/{scan_key}/{batch_id(batch_file)}/candidates-{corpus_key}.parquet"


def rerank_partial(scan_key: str, batch_file: str, shard_id: str, pairs_key: str) -> str:
    return f"scores/rerank/{scan_key}/{batch_id(batch_file)}/{shard_id}-{pairs_key}.parquet"


NIGHTS = "nights"
NIGHTS_LATEST = "nights/latest.json"
NIGHTS_HISTORY = "nights/history"


def night_dir(date: str) -> str:
    return f"{NIGHTS}/{date}"


def night_topk(date: str) -> str:
    return f"{night_dir(date)}/topk.parquet"


def night_bottomk(date: str) -> str:
    return f"{night_dir(date)}/bottomk.parquet"


def night_record(date: str) -> str:
    return f"{night_dir(date)}/night.json"


def history_record(start: str, date: str, attempt: str) -> str:
    """One night attempt's record; ``start`` (YYYYMMDDTHHMMSS.mmmZ) first, so that names sort by start."""
    return f"{NIGHTS_HISTORY}/{start}-{date}-{attempt}.json"
