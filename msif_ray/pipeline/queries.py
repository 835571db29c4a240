"""Stage ``queries``: G_q of every query, preconditioned by the method's chain, rank-r, in batches.

A batch file is named by the chain (everything but the queries: models, factors, settings) and by
its own queries' content, so a batch met before, in this query set or another, is reused: new
queries pay for themselves.
"""

from __future__ import annotations

import time

from msif_ray.distributed.worker import ChainSpec, QueryJob
from msif_ray.pipeline.context import RunContext
from msif_ray.pipeline.inputs import Inputs
from msif_ray.store import layout
from msif_ray.store.data import expand_paths, read_pairs
from msif_ray.store.digests import digest


def precondition_queries(run: RunContext, inputs: Inputs, named: dict, pretrain: str | None,
                         finetune: str | None) -> list[str]:
    """Ṽ_q of every query, in batches; returns the batch files in query order."""
    cfg = run.config
    q = cfg.data.queries
    size = run.plan.query_batch_size
    key = named["key"]
    paths = tuple(expand_paths(q.paths))
    chain = digest({n: v for n, v in named.items() if n not in ("key", "data.queries")})
    pairs = read_pairs(list(paths), q.prompt_column, q.completion_column, q.id_column)
    jobs = []
    for i, lo in enumerate(range(0, len(pairs), size)):
        batch = digest([[p.id, p.prompt, p.completion] for p in pairs[lo : lo + size]])
        jobs.append(QueryJob(i, cfg.query_model, paths, (q.id_column, q.prompt_column, q.completion_column), lo,
                             min(lo + size, len(pairs)), layout.query_batch(chain, batch)))
    files = [j.output for j in jobs]
    if run.records.is_done("queries", key, named):
        return files
    started = time.monotonic()
    spec = ChainSpec(cfg.method, pretrain, finetune, cfg.factors.damping_pretrain, cfg.factors.damping_finetune,
                     cfg.scoring.query_rank)
    stats = run.passes.map("queries", "precondition", jobs, spec)
    rank = "full rank" if cfg.scoring.query_rank is None else f"rank {cfg.scoring.query_rank}"
    run.log(f"[queries] {inputs.num_queries} queries preconditioned ({cfg.method}, {rank}) in {len(jobs)} "
            f"batches of up to {size}, {stats['seconds']:.1f}s")
    run.records.finish("queries", key, started, {"precondition": stats}, outputs=files)
    return files
