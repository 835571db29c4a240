"""Stage ``self_influence`` (``scoring.normalize: self | unit``): each corpus document's
self-influence I_m = G_mᵀ (H_pt + λI)⁻¹ G_m, the documents' side of the normalised scores.

One small file per content-named shard: a property of the document, the base model and its
pre-training factors (λ included), never of the queries or the fine-tune, so it is computed once
and reused by every query set and every night. Like the index, the stage's key leaves the corpus
out and the stage runs every time, computing only the shards without a file (appended ones). The
pass runs per layer group, whose bases must be in memory together, as for the Λ pass.
"""

from __future__ import annotations

import time

from msif_ray.distributed.worker import Normalization, ShardJob
from msif_ray.pipeline.context import RunContext
from msif_ray.pipeline.inputs import Inputs
from msif_ray.store import layout


def self_influence(run: RunContext, inputs: Inputs, named: dict[str, dict], pretrain: str | None) -> Normalization | None:
    """The documents' self-influence when the scores are normalised (None when they are not)."""
    cfg = run.config
    if cfg.scoring.normalize == "none":
        return None
    named = named["self_influence"]
    key = named["key"]
    started = time.monotonic()
    jobs = [ShardJob("self_influence", s, layout.self_influence_shard(key, s.shard_id), cfg.corpus_model, "documents",
                     cfg.data.corpus.columns) for s in inputs.corpus_shards]
    groups = tuple(tuple(g) for g in run.plan.layer_groups)
    stats = run.passes.map("self_influence", "self_influence", jobs, pretrain, cfg.factors.damping_pretrain, groups)
    run.log(f"[self_influence] {stats['reused']} shards reused, {stats['computed']} computed ({stats['seconds']:.1f}s)")
    run.records.manifest["stages"]["self_influence"] = {
        "inputs": {n: v for n, v in named.items() if n != "key"}, "outcome": "reused" if stats["computed"] == 0 else "computed",
        "reason": f"{stats['computed']} of {stats['shards_total']} shards computed"}
    run.records.finish("self_influence", key, started, {"self_influence": stats}, done_record=False)
    return Normalization(cfg.scoring.normalize, key)
