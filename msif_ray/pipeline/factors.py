"""Stages ``factors/finetune`` (EK-FAC of θ_ft on the fine-tuning data) and ``factors/pretrain``
(of θ_pt on the corpus, or a seeded sample of it).

Per layer group: a covariance pass (workers sum a aᵀ and s sᵀ into checkpoints), one reduce job
per (layer, factor) for the float64 eigendecomposition, a Λ pass in those eigenbases, and one
reduce job per layer that writes ``layers/<layer>.safetensors`` (``distributed/reduce.py``).
Worker checkpoints are removed once the stage is done; the manifest keeps their stats.
"""

from __future__ import annotations

import time

from msif_ray.distributed.reduce import Eigendecompose, FinishLayer
from msif_ray.distributed.worker import ShardJob
from msif_ray.pipeline.context import RunContext
from msif_ray.pipeline.keys import remember_base_factors
from msif_ray.pipeline.passes import combine_groups
from msif_ray.store import layout
from msif_ray.store.data import Shard, sample_quotas


def fit_factors(run: RunContext, stage: str, named: dict, model: str, shards: list[Shard], kind: str,
                columns: tuple[str, ...], max_examples: int | None) -> str:
    """EK-FAC factors of ``model`` on ``shards``; returns their folder (per-layer files, see layout.py)."""
    cfg, store = run.config, run.store
    key = named["key"]
    factors = layout.factors_dir(stage, key)
    if run.records.is_done(stage, key, named):
        return factors
    started = time.monotonic()
    sample = sample_quotas(shards, max_examples)

    def jobs(pass_name: str, group: int) -> list[ShardJob]:  # shards with a zero sample quota are not visited
        return [ShardJob(f"{stage}/{pass_name}", s, layout.checkpoint_dir(factors, pass_name, group), model, kind,
                         columns, cfg.seed, sample[s.shard_id]) for s in shards if sample[s.shard_id] != 0]

    groups = run.plan.layer_groups
    if len(groups) > 1:
        run.log(f"[{stage}] {len(groups)} layer groups: each factor pass reads the data {len(groups)} times")
    stats: dict[str, dict] = {}
    checkpoints: list[str] = []
    reduces: list[dict] = []
    reduce_seconds = 0.0
    for g, layers in enumerate(groups):
        stats[f"covariance/g{g}"], names = run.passes.accumulate(stage, "covariance", jobs("covariance", g), g,
                                                                  tuple(layers), cfg.factors.fisher)
        checkpoints += names
        reduce_started = time.monotonic()
        reduces += run.passes.reduce([Eigendecompose(tuple(names), factors, layer, which)
                                      for layer in layers for which in "AS"])
        reduce_seconds += time.monotonic() - reduce_started
    for g, layers in enumerate(groups):
        stats[f"lambdas/g{g}"], names = run.passes.accumulate(stage, "lambdas", jobs("lambdas", g), g, tuple(layers),
                                                               cfg.factors.fisher, factors)
        checkpoints += names
        reduce_started = time.monotonic()
        reduces += run.passes.reduce([FinishLayer(tuple(names), factors, layer) for layer in layers])
        reduce_seconds += time.monotonic() - reduce_started
    store.write_json(layout.factors_index(factors), {
        "layers": [layer for group in groups for layer in group], "model": model, "fisher": cfg.factors.fisher,
        "num_windows": reduces[-1]["num_windows"], "fingerprint": key})
    passes = combine_groups(stats) | {"reduce": {
        "jobs": len(reduces), "seconds": round(reduce_seconds, 3), "peak_rss_mb": max(r["peak_rss_mb"] for r in reduces),
        "checkpoints": len(checkpoints), "checkpoint_bytes": sum(store.size(n) for n in checkpoints)}}
    run.records.finish(stage, key, started, passes)
    if stage == "factors/pretrain":
        remember_base_factors(store, named, shards)
    for name in checkpoints:  # large partial sums, removed once the stage is done; the manifest keeps their stats
        store.remove(layout.checkpoint_marker(name))
        store.remove(name)
    return factors
