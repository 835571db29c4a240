"""The stages of ``msif run`` over a run directory, and their skip / resume rules.

    validate          configs, columns, tokenizer/model fit: cheap checks before any heavy pass
    factors/finetune  EK-FAC of θ_ft on the fine-tuning data            (multi_stage)
    factors/pretrain  EK-FAC of θ_pt on the corpus (or a sample of it)  (multi_stage, single_stage)
    queries           G_q, preconditioned by the method's chain
    scores            every corpus document against every query; top/bottom k per shard; merge

A stage is skipped when the manifest records it done with the same fingerprint (a hash of every
setting and upstream result it depends on). Inside a stage, each map pass writes one output per
shard under a folder named by the fingerprint, plus a small ``.done.json`` once the output is
complete; a rerun hands out only the shards without one. Hence a crashed run resumes where it
stopped, a retried shard overwrites its own output and is counted once, and outputs of an older
configuration can never be mixed into a newer one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import ray

from msif_ray.config import Config, ConfigError, redact_secrets
from msif_ray.curvature import LambdaSums, finish_factors
from msif_ray.data import (
    PARQUET_SUFFIXES, DataError, Shard, check_columns, check_unique_ids, expand_paths, plan_shards, read_documents, read_pairs,
    sample_quotas,
)
from msif_ray.distributed.pool import WorkerPool
from msif_ray.distributed.reduce import eigendecompose, load_bases, reduce_covariances, reduce_lambdas, run_bounded
from msif_ray.distributed.worker import QueryJob, ShardJob, ShardWorker, WorkerSettings, done_marker
from msif_ray.gradients import encode_prompt_completions
from msif_ray.models import check_same_shapes, check_tokenizer_fits, load_config, load_tokenizer, model_skeleton
from msif_ray.modules import select_modules
from msif_ray.progress import Progress
from msif_ray.storage import RunDir

MANIFEST = "manifest.json"
TOPK = "scores/topk.parquet"
BOTTOMK = "scores/bottomk.parquet"
FAULT_ENV = "MSIF_FAULT_INJECT"  # tests: a pass name whose worker is killed once


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Plan:
    """The shards a run maps over, planned once the inputs are validated."""

    corpus_shards: list[Shard]
    finetune_shards: list[Shard] = field(default_factory=list)


class Pipeline:
    def __init__(self, config: Config, log: Callable[[str], None] = print):
        self.config = config
        self.log = log
        self.store = RunDir(config.run_dir)
        self.manifest = self.store.read_json(MANIFEST) if self.store.exists(MANIFEST) else {"stages": {}}
        self.pool: WorkerPool | None = None

    # ----------------------------------------------------------------------- entry point

    def run(self, plan: Plan | None = None) -> str:
        """Run (or resume) every stage; returns the path of ``scores/topk.parquet``.

        ``plan`` is what ``validate()`` returned, when the caller validated first.
        """
        started = time.monotonic()
        cfg = self.config
        plan = plan or self.validate()
        self._save_manifest(config=redact_secrets(cfg.to_dict()), shards={"corpus": [s.shard_id for s in plan.corpus_shards]})
        try:
            pretrain = finetune = None
            if cfg.method == "multi_stage":
                ft = cfg.data.finetune
                finetune = self._factors("factors/finetune", cfg.models.finetuned, plan.finetune_shards, "pairs",
                                         (ft.prompt_column, ft.completion_column), None)
            if cfg.method in ("multi_stage", "single_stage"):
                corpus = cfg.data.corpus
                pretrain = self._factors("factors/pretrain", cfg.corpus_model, plan.corpus_shards, "documents",
                                         (corpus.id_column, corpus.text_column), cfg.factors.max_examples)
            self._scores(plan, self._queries(pretrain, finetune))
        finally:
            if self.pool is not None:
                self.pool.shutdown()
                self.pool = None  # its actors are gone: a next run() starts a new pool
        self.log(f"done in {time.monotonic() - started:.1f}s: {self.store.url(TOPK)}")
        return self.store.url(TOPK)

    # ----------------------------------------------------------------------- validation

    def validate(self) -> Plan:
        """Every check that needs no heavy compute, so that bad input fails in seconds."""
        cfg = self.config
        if cfg.scoring.mode != "exact":
            raise ConfigError("scoring.mode: only 'exact' is available in this version; set scoring.mode: exact")
        trust = cfg.models.trust_remote_code
        pretrained = load_config(cfg.models.pretrained, "models.pretrained", trust)
        if cfg.models.finetuned:
            check_same_shapes(pretrained, load_config(cfg.models.finetuned, "models.finetuned", trust))
        select_modules(model_skeleton(pretrained, trust), cfg.modules.include, cfg.modules.exclude)
        tokenizer_key = "models.tokenizer" if cfg.models.tokenizer else ("models.finetuned" if cfg.models.finetuned else "models.pretrained")
        tokenizer = load_tokenizer(cfg.tokenizer, tokenizer_key, trust)
        check_tokenizer_fits(tokenizer, pretrained, "models.pretrained")

        corpus = cfg.data.corpus
        corpus_paths = expand_paths(corpus.paths)
        check_columns(corpus_paths, [corpus.id_column, corpus.text_column])
        plan = Plan(corpus_shards=plan_shards(corpus_paths, cfg.data.rows_per_shard))
        for shard in plan.corpus_shards:  # JSON Lines text is decoded (and so checked) only by reading it
            if not shard.path.endswith(PARQUET_SUFFIXES):
                read_documents(shard, corpus.id_column, corpus.text_column)
        check_unique_ids(plan.corpus_shards, corpus.id_column)
        q = cfg.data.queries
        num_queries = _check_pairs(tokenizer, expand_paths(q.paths), q.prompt_column, q.completion_column, q.id_column)
        if cfg.method == "multi_stage":
            ft = cfg.data.finetune
            ft_paths = expand_paths(ft.paths)
            _check_pairs(tokenizer, ft_paths, ft.prompt_column, ft.completion_column)
            plan.finetune_shards = plan_shards(ft_paths, cfg.data.rows_per_shard)
        self.log(f"validated: {len(plan.corpus_shards)} corpus shards, {num_queries} queries, method {cfg.method}")
        return plan

    # ----------------------------------------------------------------------- stages

    def _factors(self, stage: str, model: str, shards: list[Shard], kind: str, columns: tuple[str, ...],
                 max_examples: int | None) -> str:
        cfg = self.config
        key = fingerprint(stage, model, [s.shard_id for s in shards], kind, columns, max_examples, cfg.factors.fisher,
                          cfg.modules, cfg.data.max_length, cfg.ray.batch_size, cfg.seed)
        output = f"{stage}.safetensors"
        if self._is_done(stage, key, output):
            return output
        base = f"{stage}/{key}"
        sample = sample_quotas(shards, max_examples)
        jobs = lambda pass_name: [  # noqa: E731
            ShardJob(f"{stage}/{pass_name}", s, f"{base}/{pass_name}/{s.shard_id}.safetensors", model, kind, columns,
                     cfg.seed, sample[s.shard_id]) for s in shards]
        stats = {}
        started = time.monotonic()
        covariance_jobs = jobs("covariance")
        stats["covariance"] = self._map(stage, "covariance", covariance_jobs, cfg.factors.fisher)
        layers = ray.get(reduce_covariances.remote(self.store.url(), [j.output for j in covariance_jobs], f"{base}/covariance"))
        eigen_jobs = [(layer, which, f"{base}/eigen/{layer}.{which}.safetensors") for layer in layers for which in "AS"]
        eigen_files = [output for _, _, output in eigen_jobs]
        run_bounded([(eigendecompose, self.store.url(), f"{base}/covariance/{layer}.safetensors", layer, which, output)
                     for layer, which, output in eigen_jobs])
        lambda_jobs = jobs("lambdas")
        stats["lambdas"] = self._map(stage, "lambdas", lambda_jobs, cfg.factors.fisher, tuple(eigen_files))
        lambda_total = f"{base}/lambdas.safetensors"
        ray.get(reduce_lambdas.remote(self.store.url(), [j.output for j in lambda_jobs], lambda_total))

        bases = load_bases(self.store, eigen_files)
        factors = finish_factors(bases, LambdaSums.from_tensors(self.store.load_tensors(lambda_total)[0]),
                                 {"model": model, "fisher": cfg.factors.fisher, "fingerprint": key})
        self.store.save_tensors(output, *factors.to_tensors())
        for job in covariance_jobs + lambda_jobs:  # partial sums are large; their .done.json stats stay
            self.store.remove(job.output)
        self._finish_stage(stage, key, started, stats)
        return output

    def _queries(self, pretrain: str | None, finetune: str | None) -> str:
        cfg = self.config
        q = cfg.data.queries
        upstream = [self.manifest["stages"].get(s, {}).get("fingerprint") for s in ("factors/pretrain", "factors/finetune")]
        key = fingerprint(cfg.query_model, q, cfg.method, cfg.factors.damping_pretrain, cfg.factors.damping_finetune,
                          cfg.modules, cfg.data.max_length, upstream)
        output = "queries/preconditioned.safetensors"
        if self._is_done("queries", key, output):
            return output
        started = time.monotonic()
        job = QueryJob(cfg.query_model, tuple(expand_paths(q.paths)), (q.id_column, q.prompt_column, q.completion_column),
                       cfg.method, pretrain, finetune, cfg.factors.damping_pretrain, cfg.factors.damping_finetune, output)
        [(_, stats)] = list(self._workers().map("precondition", [job]))
        self.log(f"[queries] {stats['queries']} queries preconditioned ({cfg.method}) in {stats['seconds']:.1f}s")
        self._finish_stage("queries", key, started, {"precondition": stats})
        return output

    def _scores(self, plan: Plan, queries: str) -> None:
        cfg = self.config
        corpus = cfg.data.corpus
        key = fingerprint(self.manifest["stages"]["queries"]["fingerprint"], cfg.corpus_model,
                          [s.shard_id for s in plan.corpus_shards], corpus, cfg.data.max_length, cfg.scoring.top_k)
        if self._is_done("scores", key, TOPK):
            return
        started = time.monotonic()
        jobs = [ShardJob("scores", s, f"scores/{key}/{s.shard_id}.parquet", cfg.corpus_model, "documents",
                         (corpus.id_column, corpus.text_column)) for s in plan.corpus_shards]
        stats = self._map("scores", "scores", jobs, queries, cfg.scoring.top_k)
        if stats["documents"] == 0:
            raise DataError(f"data.corpus: every document is empty ({stats['skipped_empty']} rows skipped)")
        partial = pa.concat_tables([self.store.read_parquet(j.output) for j in jobs])
        for name, side in ((TOPK, "top"), (BOTTOMK, "bottom")):
            self.store.write_parquet(name, merge_extremes(partial, side, cfg.scoring.top_k))
        self._finish_stage("scores", key, started, {"scores": stats})

    # ----------------------------------------------------------------------- map passes

    def _workers(self) -> WorkerPool:
        if self.pool is None:
            cfg = self.config
            settings = WorkerSettings(
                run_dir=self.store.url(), tokenizer=cfg.tokenizer,
                include=cfg.modules.include, exclude=cfg.modules.exclude, max_length=cfg.data.max_length,
                batch_size=cfg.ray.batch_size, num_threads=cfg.ray.num_cpus_per_worker, num_gpus=cfg.ray.num_gpus_per_worker,
                trust_remote_code=cfg.models.trust_remote_code, fault=os.environ.get(FAULT_ENV),
            )
            self.pool = WorkerPool(ShardWorker, cfg.ray.num_workers, cfg.ray.num_cpus_per_worker,
                                   cfg.ray.num_gpus_per_worker, settings)
        return self.pool

    def _map(self, stage: str, pass_name: str, jobs: list[ShardJob], *args) -> dict:
        """Run ``pass_name`` on every job whose shard is not done yet; return the pass's stats."""
        done = {j.shard.shard_id: self.store.read_json(done_marker(j.output)) for j in jobs
                if self.store.exists(done_marker(j.output))}
        pending = [j for j in jobs if j.shard.shard_id not in done]
        progress = Progress(f"{stage} {pass_name}" if stage != pass_name else stage, len(pending), self.log)
        if done:
            self.log(f"[{progress.name}] resuming: {len(done)}/{len(jobs)} shards already done")
        retries = []
        crashed = lambda job, attempt: retries.append(job.shard.shard_id)  # noqa: E731
        for job, stats in (self._workers().map(pass_name, pending, *args, on_crash=crashed) if pending else []):
            done[job.shard.shard_id] = stats
            progress.update(stats["tokens"], stats["documents"])
        per_shard = {j.shard.shard_id: done[j.shard.shard_id] for j in jobs}
        return {
            "shards_total": len(jobs), "computed": len(pending), "reused": len(jobs) - len(pending),
            "retried_after_crash": retries, "seconds": round(progress.seconds, 3),
            "tokens": sum(s["tokens"] for s in per_shard.values()),
            "documents": sum(s["documents"] for s in per_shard.values()),
            "skipped_empty": sum(s["skipped"] for s in per_shard.values()),
            "worker_peak_rss_mb": max(s["worker_peak_rss_mb"] for s in per_shard.values()),
            "per_shard": per_shard,
        }

    # ----------------------------------------------------------------------- manifest

    def _is_done(self, stage: str, key: str, output: str) -> bool:
        record = self.manifest["stages"].get(stage, {})
        if record.get("fingerprint") == key and record.get("state") == "done" and self.store.exists(output):
            self.log(f"[{stage}] up to date, skipped")
            return True
        self.manifest["stages"][stage] = {"fingerprint": key, "state": "running"}
        self._save_manifest()
        return False

    def _finish_stage(self, stage: str, key: str, started: float, passes: dict) -> None:
        self.manifest["stages"][stage] = {"fingerprint": key, "state": "done",
                                          "seconds": round(time.monotonic() - started, 3), "passes": passes}
        self._save_manifest()

    def _save_manifest(self, **fields) -> None:
        self.manifest.update(fields)
        self.store.write_json(MANIFEST, self.manifest)


def _check_pairs(tokenizer, paths: list[str], prompt_column: str, completion_column: str, id_column: str | None = None) -> int:
    """Read and tokenize every prompt/completion pair once (errors name the file, row or id); count them."""
    check_columns(paths, [prompt_column, completion_column] + ([id_column] if id_column else []))
    pairs = read_pairs(paths, prompt_column, completion_column, id_column)
    encode_prompt_completions(tokenizer, [p.prompt for p in pairs], [p.completion for p in pairs], [p.id for p in pairs])
    return len(pairs)


def merge_extremes(partial: pa.Table, side: str, top_k: int) -> pa.Table:
    """Final top (or bottom) k per query from the per-shard partials, deterministically ordered.

    Sorted by query_id, then score (descending for ``top``, ascending for ``bottom``), then doc_id.
    """
    rows = partial.filter(pc.equal(partial["side"], side))
    order = "descending" if side == "top" else "ascending"
    rows = rows.sort_by([("query_id", "ascending"), ("score", order), ("doc_id", "ascending")])
    query_ids, doc_ids, scores = (rows[c].to_pylist() for c in ("query_id", "doc_id", "score"))
    keep: dict[str, list[int]] = {}
    for i, query_id in enumerate(query_ids):
        ranks = keep.setdefault(query_id, [])
        if len(ranks) < top_k:
            ranks.append(i)
    index = [i for ranks in keep.values() for i in ranks]
    rank = [r + 1 for ranks in keep.values() for r in range(len(ranks))]
    return pa.table({
        "query_id": pa.array([query_ids[i] for i in index], pa.string()),
        "rank": pa.array(rank, pa.int32()),
        "doc_id": pa.array([doc_ids[i] for i in index], pa.string()),
        "score": pa.array([scores[i] for i in index], pa.float64()),
    })
