"""Where every artifact lives in a run directory: the one place that names them.

    manifest.json                                       config, shards, per stage: key, named inputs, state,
                                                        outcome (computed | reused | ...), timings, stats; the documents
                                                        left out (quarantine)
    <stage>/<key>/stage.json                            the stage's done record (its manifest record), written
                                                        last: the stage is done for that key when it exists
    factors/pretrain/base-<base key>.json               the pre-training factors last fitted for a base model and
                                                        settings: kept when corpus shards are appended
    factors/<pretrain|finetune>/<key>/
        factors.json                                    the fitted factors' index: layers, counts, fisher
        layers/<layer>.safetensors                      Q_A [in, in], Q_S [out, out], lambda [out, in] of one layer
        covariance/g<group>/<worker>-<seq>.safetensors  a worker's checkpoint of Σ a aᵀ, Σ s sᵀ (+ .json: shards, size)
        eigen/<layer>.<A|S>.safetensors                 eigenvectors and eigenvalues of one factor
        lambdas/g<group>/<worker>-<seq>.safetensors     a worker's checkpoint of Σ (Q_Sᵀ G Q_A)² (+ .json)
    queries/<chain key>/<batch key>.safetensors         Ṽ_q of one batch of queries (+ .done.json): named by the
                                                        chain's inputs and the batch's queries, shared by query sets
    self_influence/<key>/<shard>.safetensors            scoring.normalize: each document's G_mᵀ(H_pt + λI)⁻¹G_m, with
                                                        the doc ids (+ .done.json), reused by every query set
    scores/<key>/g<group>/<shard>.parquet               top and bottom k per query of one shard (+ .done.json)
    <output>.done.json                                  a map-pass output is done: the job's stats, the output's bytes
    scores/<key>/merge/<level>-<n>.parquet              a step of the tree merge
    scores/scan/<scan key>/<batch>/<shard>.parquet      index mode: one query batch's best candidates in one index
                                                        shard, by estimate, with the shard id (+ .done.json)
    scores/scan/<scan key>/<batch>/candidates-<corpus key>.parquet   that batch's candidates over the corpus
    scores/rerank/<scan key>/<batch>/<shard>-<pairs key>.parquet     exact scores of one round's candidates in one shard
    scores/<key>/candidates.parquet                     index mode: how each query's top k was found (re-scored, ...)
    scores/<key>/topk.parquet  scores/<key>/bottomk.parquet    the merged result of that key
    scores/topk.parquet  scores/bottomk.parquet         the result: a copy of the last run's key's tables
    tune/trials.json                                    the last msif tune: each trial's settings, MRR, Recall@10, scores key
    report/index.html, report/queries/<query>.html      the HTML report (``msif report``)
    report/breakdowns.parquet, report/report.json       the shown documents' per-token and per-layer numbers; what
                                                        the report pass did
    nights/<date>/topk.parquet, bottomk.parquet         msif nightly: copies of the result of the night <date>
    nights/<date>/night.json                            that night: times, per stage recomputed or reused, fingerprints
    nights/history/<start>-<date>-<id>.json             one record per night attempt, good or failed (never rewritten)
    nights/latest.json                                  the pointer to the last good night (written after its files)
    quarantine/<shard>.json                             data.on_bad_document: skip: the shard's documents left out
                                                        of every sum (doc id, file, row, reason); kept across runs
    _workers/<token>.json                               while a run's worker pool is up: the file each worker looks for
                                                        when it starts, proving that it sees the driver's run directory

The corpus gradient index (``index.path``, default ``<run_dir>/index``) is a store of its own,
shared by the runs of one base model:

    index.json                                          its identity: model, tokenizer, layers, max_length, terms,
                                                        eigenbasis, format, and its basis' folder (written last)
    basis/<factors key>/<layer>.safetensors             Q_S, Q_A and term weights (Λ + λ)^(-1/2) (engine/index.py)
    shards/<shard>.safetensors                          values, positions [N, Σ terms], scale [N, L]; doc ids (+ .done.json)

``<key>`` is the stage's key: a digest of its named inputs (content digests of the models, the
tokenizer and the data, the settings, the upstream stages' keys; ``digests.py``), never of a path.
Outputs of other inputs never mix in, and the folders of earlier keys stay: going back to earlier
inputs (another fine-tuned model, say) reuses their outputs. In index mode the unit of reuse is
the query batch: ``<scan key>`` covers the index and the candidate count, ``<batch>`` names the
batch file, so new queries are scanned and re-scored alone. ``<date>`` is YYYY-MM-DD; ``<start>``
the attempt's start, UTC, as YYYYMMDDTHHMMSS.mmmZ (names sort by start).
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from msif_ray.store.storage import RunDir

MANIFEST = "manifest.json"
TOPK = "scores/topk.parquet"
BOTTOMK = "scores/bottomk.parquet"
TUNE_TRIALS = "tune/trials.json"
REPORT_DIR = "report"
REPORT_INDEX = "report/index.html"
REPORT_STATS = "report/report.json"
BREAKDOWNS = "report/breakdowns.parquet"


def report_page(page: str) -> str:
    """One query's page of the report (``page``: its file name, see ``report/build.py``)."""
    return f"{REPORT_DIR}/queries/{page}"


def read_manifest(store: RunDir) -> dict:
    """The run's manifest, or an empty one (no stage) before the first run."""
    return store.read_json(MANIFEST) if store.exists(MANIFEST) else {"stages": {}}


def stage_dir(stage: str, key: str) -> str:
    """The folder of one stage's outputs for one key (``factors/pretrain/<key>``, ``queries/<key>``...)."""
    return f"{stage}/{key}"


def stage_record(stage: str, key: str) -> str:
    """The stage's done record for ``key``, written after every other output of it."""
    return f"{stage_dir(stage, key)}/stage.json"


def factors_dir(stage: str, key: str) -> str:
    return stage_dir(stage, key)


def base_factors(base_key: str) -> str:
    """The pre-training factors last fitted for a base model and settings (any corpus): their named inputs, shards."""
    return f"factors/pretrain/base-{base_key}.json"


def factors_index(factors: str) -> str:
    return f"{factors}/factors.json"


def factor_layer(factors: str, layer: str) -> str:
    return f"{factors}/layers/{layer}.safetensors"


def checkpoint_dir(factors: str, pass_name: str, group: int) -> str:
    return f"{factors}/{pass_name}/g{group}"


def checkpoint_file(folder: str, worker: str, sequence: int) -> str:
    """One worker's committed running sum in a checkpoint folder (``distributed/checkpoints.py``)."""
    return f"{folder}/{worker}-{sequence:05d}.safetensors"


def checkpoint_marker(checkpoint: str) -> str:
    """The marker that commits a checkpoint: the shards it holds and the checkpoint it replaces."""
    return checkpoint + ".json"


def is_checkpoint_marker(name: str) -> bool:
    return name.endswith(".safetensors.json")


def eigen_file(factors: str, layer: str, which: str) -> str:
    return f"{factors}/eigen/{layer}.{which}.safetensors"


def query_batch(chain_key: str, batch_key: str) -> str:
    return f"queries/{chain_key}/{batch_key}.safetensors"


def self_influence_shard(key: str, shard_id: str) -> str:
    """One corpus shard's document self-influences for ``scoring.normalize`` (``pipeline/self_influence.py``)."""
    return f"self_influence/{key}/{shard_id}.safetensors"


def score_partial(key: str, group: int, shard_id: str) -> str:
    return f"scores/{key}/g{group}/{shard_id}.parquet"


def scores_result(key: str, side: str) -> str:
    """The merged ``topk`` or ``bottomk`` table of one scores key (published as ``scores/<side>.parquet``)."""
    return f"scores/{key}/{side}.parquet"


def merge_step(key: str, level: int, index: int) -> str:
    return f"scores/{key}/merge/{level}-{index:05d}.parquet"


def done_marker(output: str) -> str:
    """A shard's output is complete once this small JSON exists (it is written after the output)."""
    return output + ".done.json"


def is_done_marker(name: str) -> bool:
    return name.endswith(".done.json")


def records_covering(name: str) -> list[str]:
    """The markers and done records that declare artifact ``name`` done (in the same store): a
    damaged artifact is removed with them, so that resume computes it again.

    A map pass's output is covered by its ``.done.json``, a worker checkpoint by its marker, a
    factor stage's eigen and layer files by the stage's done record, a scores key's partials and
    tables by its scores record, the index's basis by its identity. Query batches are listed by
    their queries stage record as well, which counts them done only while their markers do
    (``pipeline/records.py``). Markers, records, merge steps and published copies are covered by
    nothing but their own existence.
    """
    for pattern, covering in COVERING:
        found = re.fullmatch(pattern, name)
        if found:
            return covering(found)
    return []


COVERING: list[tuple[str, Callable[[re.Match], list[str]]]] = [
    (r"factors/(?:pretrain|finetune)/[^/]+/(?:covariance|lambdas)/g\d+/[^/]+\.safetensors",
     lambda m: [checkpoint_marker(m[0])]),
    (r"(factors/(?:pretrain|finetune))/([^/]+)/(?:layers/[^/]+\.safetensors|eigen/[^/]+\.safetensors|factors\.json)",
     lambda m: [stage_record(m[1], m[2])]),
    (r"scores/([^/]+)/g\d+/[^/]+\.parquet", lambda m: [done_marker(m[0]), stage_record("scores", m[1])]),
    (r"scores/([^/]+)/(?:topk|bottomk|candidates)\.parquet", lambda m: [stage_record("scores", m[1])]),
    (r"(?:queries|self_influence)/[^/]+/[^/]+\.safetensors|scores/(?:scan|rerank)/[^/]+/[^/]+/[^/]+\.parquet"
     r"|scores/scan/[^/]+/[^/]+/rotated-[^/]+\.safetensors"
     r"|shards/[^/]+\.safetensors", lambda m: [done_marker(m[0])]),
    (r"basis/[^/]+/[^/]+\.safetensors", lambda m: [INDEX_IDENTITY]),
]


def score_partial_shard(name: str) -> str | None:
    """The shard id of a ``score_partial`` file name (None for merges, results and anything else)."""
    found = re.search(r"/g\d+/([^/]+)\.parquet$", name)
    return found.group(1) if found else None


INDEX_IDENTITY = "index.json"


def index_basis(key: str) -> str:
    """The index's basis and term weights: ``key`` names the pre-training factors they come from."""
    return f"basis/{key}"


def index_basis_layer(folder: str, layer: str) -> str:
    return f"{folder}/{layer}.safetensors"


def index_shard(shard_id: str) -> str:
    return f"shards/{shard_id}.safetensors"


def batch_id(batch_file: str) -> str:
    """A query batch's name in the scoring outputs (its file is named by what it holds)."""
    return hashlib.sha256(batch_file.encode()).hexdigest()[:16]


def scan_partial(scan_key: str, batch_file: str, shard_id: str) -> str:
    return f"scores/scan/{scan_key}/{batch_id(batch_file)}/{shard_id}.parquet"


def rotated_batch(scan_key: str, batch_file: str, layers_key: str) -> str:
    """A query batch rotated into the index's basis, for the layers ``layers_key`` names (a layer group)."""
    return f"scores/scan/{scan_key}/{batch_id(batch_file)}/rotated-{layers_key}.safetensors"


def batch_candidates(scan_key: str, batch_file: str, corpus_key: str) -> str:
    return f"scores/scan/{scan_key}/{batch_id(batch_file)}/candidates-{corpus_key}.parquet"


def candidates_merge_step(candidates: str, level: int, index: int) -> str:
    """A step of the tree merge of one batch's candidates over the index shards."""
    return f"{candidates}.merge/{level}-{index:05d}.parquet"


def rerank_partial(scan_key: str, batch_file: str, shard_id: str, pairs_key: str) -> str:
    return f"scores/rerank/{scan_key}/{batch_id(batch_file)}/{shard_id}-{pairs_key}.parquet"


def worker_probe(token: str) -> str:
    """The file a worker must see when it starts (``Passes.workers``): else its node has another run directory."""
    return f"_workers/{token}.json"


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


QUARANTINE = "quarantine"


def quarantine_record(shard_id: str) -> str:
    """The documents of one shard left out of the run (``store/quarantine.py``)."""
    return f"{QUARANTINE}/{shard_id}.json"
