"""Where every artifact lives in a run directory: the one place that names them.

    manifest.json                                       config, shards, per stage: key, named inputs, state,
                                                        outcome (computed | reused | ...), timings, stats
    <stage>/<key>/stage.json                            the stage's done record (its manifest record), written
                                                        last: the stage is done for that key when it exists
    factors/<pretrain|finetune>/<key>/
        factors.json                                    the fitted factors' index: layers, counts, fisher
        layers/<layer>.safetensors                      Q_A [in, in], Q_S [out, out], lambda [out, in] of one layer
        covariance/g<group>/<worker>-<seq>.safetensors  a worker's checkpoint of Σ a aᵀ, Σ s sᵀ (+ .json: its shards)
        eigen/<layer>.<A|S>.safetensors                 eigenvectors and eigenvalues of one factor
        lambdas/g<group>/<worker>-<seq>.safetensors     a worker's checkpoint of Σ (Q_Sᵀ G Q_A)² (+ .json)
    queries/<key>/batch-<n>.safetensors                 Ṽ_q of one batch of queries (+ .done.json)
    scores/<key>/g<group>/<shard>.parquet               top and bottom k per query of one shard (+ .done.json)
    scores/<key>/merge/<level>-<n>.parquet              a step of the tree merge
    scores/<key>/topk.parquet  scores/<key>/bottomk.parquet    the merged result of that key
    scores/topk.parquet  scores/bottomk.parquet         the result: a copy of the last run's key's tables

``<key>`` is the stage's key: a digest of its named inputs (content digests of the models, the
tokenizer and the data, the settings, the upstream stages' keys; ``digests.py``), never of a path.
Outputs of other inputs never mix in, and the folders of earlier keys stay: going back to earlier
inputs (another fine-tuned model, say) reuses their outputs.
"""

from __future__ import annotations

MANIFEST = "manifest.json"
TOPK = "scores/topk.parquet"
BOTTOMK = "scores/bottomk.parquet"


def stage_dir(stage: str, key: str) -> str:
    """The folder of one stage's outputs for one key (``factors/pretrain/<key>``, ``queries/<key>``...)."""
    return f"{stage}/{key}"


def stage_record(stage: str, key: str) -> str:
    """The stage's done record for ``key``, written after every other output of it."""
    return f"{stage_dir(stage, key)}/stage.json"


def factors_dir(stage: str, key: str) -> str:
    return stage_dir(stage, key)


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


def scores_result(key: str, side: str) -> str:
    """The merged ``topk`` or ``bottomk`` table of one scores key (published as ``scores/<side>.parquet``)."""
    return f"scores/{key}/{side}.parquet"


def merge_step(key: str, level: int, index: int) -> str:
    return f"scores/{key}/merge/{level}-{index:05d}.parquet"


def done_marker(output: str) -> str:
    """A shard's output is complete once this small JSON exists (it is written after the output)."""
    return output + ".done.json"
