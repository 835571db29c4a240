"""The stages of ``msif run`` over a run directory, and their skip / resume rules.

    validate          configs, columns, tokenizer/model fit: cheap checks before any heavy pass
    plan              memory per process, layer groups, query batches and groups (``plan.py``);
                      a plan that cannot fit the budget is refused here, before any heavy pass
    factors/finetune  EK-FAC of θ_ft on the fine-tuning data            (multi_stage)
    factors/pretrain  EK-FAC of θ_pt on the corpus (or a sample of it)  (multi_stage, single_stage)
    queries           G_q, preconditioned by the method's chain, rank-r, in batches of queries
    scores            every corpus document against each group of queries; top/bottom k per
                      shard; a tree of bounded merges

Every stage has a key: ``digests.digest`` of its *named inputs* (``Pipeline.stage_inputs``), the
content digests of the models, the tokenizer and the data it reads (computed once per run by
``validate``, ``Inputs.digests``; corpus and fine-tuning data by their content shard ids), its
settings, and the keys of the stages upstream of it. No path enters a key: a file rewritten in
place changes the keys that read it, and unchanged inputs moved elsewhere change none.

Skip rule: a stage is done for a key when its done record ``<stage>/<key>/stage.json`` exists
(``layout.stage_record``; written after every other output of the stage), whatever the manifest's
single record per stage says; so going back to earlier inputs (two fine-tuned models in turn on
one run directory, say) reuses their outputs. ``scores/topk.parquet`` and ``bottomk.parquet`` are
copies of the current key's ``scores/<key>/`` tables, published again when another key wrote them.
The manifest records, per stage, the key, the named inputs and the outcome, and the log says why:
``reused (key …)``, ``recomputed because <input> changed``, ``computed (no earlier run)``.

Inside a stage, map passes write under the key's folder (``layout.py``): the query and scoring
passes one output per job plus a ``.done.json`` once it is complete; the factor passes
worker-level checkpoints that list the shards they hold (``distributed/checkpoints.py``). A rerun
hands out only the jobs not yet done, so a crashed run resumes where it stopped, every shard is
counted once, and outputs of other inputs never mix in.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable


from msif_ray import layout
from msif_ray.config import Config, ConfigError, redact_secrets
from msif_ray.data import (
    PARQUET_SUFFIXES, DataError, Shard, check_columns, check_unique_ids, expand_paths, plan_shards, read_documents, read_pairs,
    sample_quotas,
)
from msif_ray.digests import TOKENIZER_FILES, digest, file_digests, tokenizer_digest, tree_digest
from msif_ray.distributed.checkpoints import committed_checkpoints
from msif_ray.distributed.merge import tree_merge
from msif_ray.distributed.pool import WorkerCrashError, WorkerPool
from msif_ray.distributed.reduce import eigendecompose, finish_layer, reduce_memory_bytes, run_bounded
from msif_ray.distributed.worker import (
    ChainSpec, QueryJob, RerankJob, ScanJob, ShardJob, ShardWorker, StoredFactors, WorkerSettings,
)
from msif_ray.gradients import encode_prompt_completions
from msif_ray.layout import BOTTOMK, MANIFEST, TOPK, done_marker
from msif_ray.models import check_same_shapes, check_tokenizer_fits, load_config, load_tokenizer, model_skeleton
from msif_ray.modules import LayerSpec, layer_spec, select_modules
from msif_ray.plan import ResourcePlan, WorkerMemoryError, make_plan
from msif_ray.index import random_projections
from msif_ray.progress import Progress
from msif_ray.scoring import rank_within_groups
from msif_ray.storage import RunDir

FAULT_ENV = "MSIF_FAULT_INJECT"  # tests: a pass name whose worker is killed once
INDEX_FORMAT = 1  # the index shards' layout (index.py); another format is another index
MAX_ROUNDS = 5  # rounds of an accumulating pass (a round re-runs shards lost with a crashed worker)

__all__ = ["Pipeline", "Inputs", "MANIFEST", "TOPK", "BOTTOMK", "FAULT_ENV"]




@dataclass
class Inputs:
    """What validation found: the shards a run maps over, the queries, the tracked layers' shapes."""

    corpus_shards: list[Shard]
    layers: list[LayerSpec]
    model_config: object
    num_params: int
    tokenizer: object
    num_queries: int
    tokens_per_query: float
    finetune_shards: list[Shard] = field(default_factory=list)
    # Content digests of the named inputs, computed once per run: "models.pretrained",
    # "models.finetuned" (when given), "tokenizer" (its files only), "data.corpus" and
    # "data.finetune" (of their content shard ids), "data.queries" (of the query files).
    digests: dict[str, str] = field(default_factory=dict)


class Pipeline:
    def __init__(self, config: Config, log: Callable[[str], None] = print):
        self.config = config
        self.log = log
        self.store = RunDir(config.run_dir)
        self.manifest = self.store.read_json(MANIFEST) if self.store.exists(MANIFEST) else {"stages": {}}
        self.pool: WorkerPool | None = None
        self.plan: ResourcePlan | None = None

    # ----------------------------------------------------------------------- entry point

    def run(self, inputs: Inputs | None = None) -> str:
        """Run (or resume) every stage; returns the path of ``scores/topk.parquet``.

        ``inputs`` is what ``validate()`` returned, when the caller validated first.
        """
        started = time.monotonic()
        cfg = self.config
        inputs = inputs or self.validate()
        self.plan = self.plan or self.resource_plan(inputs)
        self.plan.check()
        for line in self.plan.summary_lines():
            self.log(f"[plan] {line}")
        self._save_manifest(config=redact_secrets(cfg.to_dict()), digests=inputs.digests,
                            shards={"corpus": [s.shard_id for s in inputs.corpus_shards]}, plan=self.plan.to_dict())
        named = self.stage_inputs(inputs)
        try:
            pretrain = finetune = None
            if cfg.method == "multi_stage":
                ft = cfg.data.finetune
                finetune = self._factors("factors/finetune", named["factors/finetune"], cfg.models.finetuned,
                                         inputs.finetune_shards, "pairs", (ft.prompt_column, ft.completion_column), None)
            if cfg.method in ("multi_stage", "single_stage"):
                corpus = cfg.data.corpus
                pretrain = self._factors("factors/pretrain", named["factors/pretrain"], cfg.corpus_model,
                                         inputs.corpus_shards, "documents", (corpus.id_column, corpus.text_column),
                                         cfg.factors.max_examples)
            queries = self._queries(inputs, named["queries"], pretrain, finetune)
            if cfg.scoring.mode == "index":
                index = self._index(inputs, pretrain, named["index"])
                self._index_scores(inputs, named["scores"], queries, index, named["index"])
            else:
                self._scores(inputs, named["scores"], queries)
        finally:
            if self.pool is not None:
                self.pool.shutdown()
                self.pool = None  # its actors are gone: a next run() starts a new pool
        self.log(f"done in {time.monotonic() - started:.1f}s: {self.store.url(TOPK)}")
        return self.store.url(TOPK)

    # ----------------------------------------------------------------------- validation and plan

    def validate(self) -> Inputs:
        """Every check that needs no heavy compute, so that bad input fails in seconds."""
        cfg = self.config
        trust = cfg.models.trust_remote_code
        pretrained = load_config(cfg.models.pretrained, "models.pretrained", trust)
        if cfg.models.finetuned:
            check_same_shapes(pretrained, load_config(cfg.models.finetuned, "models.finetuned", trust))
        skeleton = model_skeleton(pretrained, trust)
        modules = select_modules(skeleton, cfg.modules.include, cfg.modules.exclude)
        tokenizer_key = "models.tokenizer" if cfg.models.tokenizer else ("models.finetuned" if cfg.models.finetuned else "models.pretrained")
        tokenizer = load_tokenizer(cfg.tokenizer, tokenizer_key, trust)
        check_tokenizer_fits(tokenizer, pretrained, "models.pretrained")

        corpus = cfg.data.corpus
        corpus_paths = expand_paths(corpus.paths)
        check_columns(corpus_paths, [corpus.id_column, corpus.text_column])
        shards = plan_shards(corpus_paths, cfg.data.rows_per_shard)
        for shard in shards:  # JSON Lines text is decoded (and so checked) only by reading it
            if not shard.path.endswith(PARQUET_SUFFIXES):
                read_documents(shard, corpus.id_column, corpus.text_column)
        check_unique_ids(shards, corpus.id_column)
        q = cfg.data.queries
        query_paths = expand_paths(q.paths)
        num_queries, query_tokens = _check_pairs(tokenizer, query_paths, q.prompt_column, q.completion_column,
                                                 q.id_column)
        inputs = Inputs(shards, [layer_spec(n, m) for n, m in modules.items()], pretrained,
                        sum(p.numel() for p in skeleton.parameters()), tokenizer, num_queries, query_tokens)
        digests = inputs.digests
        digests["models.pretrained"] = tree_digest(cfg.models.pretrained)
        if cfg.models.finetuned:
            digests["models.finetuned"] = tree_digest(cfg.models.finetuned)
        digests["tokenizer"] = tree_digest(cfg.tokenizer, TOKENIZER_FILES)
        digests["data.corpus"] = digest(*[s.shard_id for s in shards])
        digests["data.queries"] = digest(*file_digests(query_paths))
        if cfg.method == "multi_stage":
            ft = cfg.data.finetune
            ft_paths = expand_paths(ft.paths)
            _check_pairs(tokenizer, ft_paths, ft.prompt_column, ft.completion_column)
            inputs.finetune_shards = plan_shards(ft_paths, cfg.data.rows_per_shard)
            digests["data.finetune"] = digest(*[s.shard_id for s in inputs.finetune_shards])
        if cfg.scoring.mode == "index":  # before any heavy pass: an index built for other inputs is refused
            check_identity(self.index_store(), self.index_identity(inputs), "index.path")
        self.log(f"validated: {len(shards)} corpus shards, {num_queries} queries, method {cfg.method}")
        return inputs

    def resource_plan(self, inputs: Inputs, profile=None) -> ResourcePlan:
        """The memory / storage / time plan of this run (``profile``: a named device instead of this machine's)."""
        return make_plan(self.config, inputs.model_config, inputs.layers, inputs.num_queries,
                         sum(s.num_rows for s in inputs.corpus_shards), _tokens_per_document(self.config, inputs),
                         profile, inputs.num_params, sum(s.num_rows for s in inputs.finetune_shards),
                         inputs.tokens_per_query)

    def stage_inputs(self, inputs: Inputs) -> dict[str, dict]:
        """The named inputs of every stage of this run's method, each stage's key (``"key"``) among them.

        Names are the config's dotted keys (``models.finetuned``, ``data.queries``, ``factors.fisher``),
        ``tokenizer``, and the upstream stages (``factors/pretrain``: its key); in index mode ``index``
        holds the index's identity (``index_identity``) instead. Models, tokenizer and
        data enter by content digest (``Inputs.digests``), never by path; the key of a stage is
        ``digest(stage, its named inputs)``.
        """
        cfg, d = self.config, inputs.digests
        query_model = "models.finetuned" if cfg.models.finetuned else "models.pretrained"
        corpus_model = _corpus_model_key(cfg)
        corpus, ft, q = cfg.data.corpus, cfg.data.finetune, cfg.data.queries
        common = {"tokenizer": d["tokenizer"], "data.max_length": cfg.data.max_length,
                  "modules": [cfg.modules.include, cfg.modules.exclude]}
        fitting = {"factors.fisher": cfg.factors.fisher, "ray.batch_size": cfg.ray.batch_size, "seed": cfg.seed}
        stages: dict[str, dict] = {}

        def add(stage: str, named: dict) -> str:
            key = digest(stage, named)
            stages[stage] = named | {"key": key}
            return key

        upstream = {}
        if cfg.method == "multi_stage":
            upstream["factors/finetune"] = add("factors/finetune", common | fitting | {
                query_model: d[query_model], "data.finetune": d["data.finetune"],
                "data.finetune.columns": [ft.prompt_column, ft.completion_column]})
        if cfg.method in ("multi_stage", "single_stage"):
            named = common | fitting | {
                corpus_model: d[corpus_model], "data.corpus": d["data.corpus"],
                "data.corpus.columns": [corpus.id_column, corpus.text_column],
                "factors.max_examples": cfg.factors.max_examples}
            if not cfg.factors.refit:
                named = self._kept_factors(named, [s.shard_id for s in inputs.corpus_shards]) or named
            upstream["factors/pretrain"] = add("factors/pretrain", named)
        queries = add("queries", common | upstream | {
            query_model: d[query_model], "data.queries": d["data.queries"],
            "data.queries.columns": [q.id_column, q.prompt_column, q.completion_column], "method": cfg.method,
            "factors.damping_pretrain": cfg.factors.damping_pretrain,
            "factors.damping_finetune": cfg.factors.damping_finetune,
            "scoring.query_rank": cfg.scoring.query_rank, "budget.query_batch_size": self.plan.query_batch_size})
        scores = {"queries": queries, "data.corpus": d["data.corpus"], "scoring.top_k": cfg.scoring.top_k}
        if cfg.scoring.mode == "index":
            stages["index"] = self.index_identity(inputs) | {
                "projections": self._projection_folder(upstream.get("factors/pretrain"))}
            add("scores", scores | {"scoring.mode": "index", "index": digest(stages["index"]),
                                    "scoring.rerank": cfg.scoring.rerank})
        else:
            add("scores", common | scores | {
                corpus_model: d[corpus_model], "data.corpus.columns": [corpus.id_column, corpus.text_column],
                "budget.query_group_size": self.plan.query_group_batches})
        return stages

    def _kept_factors(self, named: dict, shard_ids: list[str]) -> dict | None:
        """The named inputs of pre-training factors fitted earlier for the same base model and settings
        on shards that are all still in the corpus (it may have grown since): kept unless
        ``factors.refit``. None when there are none."""
        pointer = layout.base_factors(digest({n: v for n, v in named.items() if n != "data.corpus"}))
        if not self.store.exists(pointer):
            return None
        kept = self.store.read_json(pointer)
        fitted_on = set(kept["shards"])
        if not fitted_on <= set(shard_ids) or fitted_on == set(shard_ids):
            return None
        if not self.store.exists(layout.stage_record("factors/pretrain", digest("factors/pretrain", kept["named"]))):
            return None
        self.log(f"[factors/pretrain] kept: fitted on {len(fitted_on)} of the {len(shard_ids)} corpus shards now "
                 "(shards were appended since); factors.refit: true fits them again on the whole corpus")
        return kept["named"]

    # ----------------------------------------------------------------------- stages

    def _factors(self, stage: str, named: dict, model: str, shards: list[Shard], kind: str, columns: tuple[str, ...],
                 max_examples: int | None) -> str:
        """EK-FAC factors of ``model`` on ``shards``; returns their folder (per-layer files, see layout.py)."""
        cfg = self.config
        key = named["key"]
        factors = layout.factors_dir(stage, key)
        if self._is_done(stage, key, named):
            return factors
        started = time.monotonic()
        sample = sample_quotas(shards, max_examples)
        jobs = lambda pass_name, group: [  # noqa: E731 - shards with a zero sample quota are not visited
            ShardJob(f"{stage}/{pass_name}", s, layout.checkpoint_dir(factors, pass_name, group), model, kind, columns,
                     cfg.seed, sample[s.shard_id]) for s in shards if sample[s.shard_id] != 0]
        groups = self.plan.layer_groups
        if len(groups) > 1:
            self.log(f"[{stage}] {len(groups)} layer groups: each factor pass reads the data {len(groups)} times")
        stats: dict[str, dict] = {}
        checkpoints: list[str] = []
        reduces: list[dict] = []
        reduce_seconds = 0.0
        for g, layers in enumerate(groups):
            stats[f"covariance/g{g}"], names = self._accumulate(stage, "covariance", jobs("covariance", g), g,
                                                                tuple(layers), cfg.factors.fisher)
            checkpoints += names
            calls = [(eigendecompose, self.store.url(), names, factors, layer, which) for layer in layers for which in "AS"]
            reduce_started = time.monotonic()
            reduces += run_bounded(calls, [reduce_memory_bytes(*self._shape(layer), which)
                                           for layer in layers for which in "AS"])
            reduce_seconds += time.monotonic() - reduce_started
        for g, layers in enumerate(groups):
            stats[f"lambdas/g{g}"], names = self._accumulate(stage, "lambdas", jobs("lambdas", g), g, tuple(layers),
                                                             cfg.factors.fisher, factors)
            checkpoints += names
            reduce_started = time.monotonic()
            reduces += run_bounded([(finish_layer, self.store.url(), names, factors, layer) for layer in layers],
                                   [reduce_memory_bytes(*self._shape(layer), "lambda") for layer in layers])
            reduce_seconds += time.monotonic() - reduce_started
        self.store.write_json(layout.factors_index(factors), {
            "layers": [layer for group in groups for layer in group], "model": model, "fisher": cfg.factors.fisher,
            "num_windows": reduces[-1]["num_windows"], "fingerprint": key})
        passes = _combine_groups(stats) | {"reduce": {
            "tasks": len(reduces), "seconds": round(reduce_seconds, 3), "peak_rss_mb": max(r["peak_rss_mb"] for r in reduces),
            "checkpoints": len(checkpoints), "checkpoint_bytes": sum(self.store.size(n) for n in checkpoints)}}
        self._finish_stage(stage, key, started, passes)
        if stage == "factors/pretrain":  # what a later run on a grown corpus keeps (see _kept_factors)
            fitted = {n: v for n, v in named.items() if n != "key"}
            base = {n: v for n, v in fitted.items() if n != "data.corpus"}
            self.store.write_json(layout.base_factors(digest(base)),
                                  {"named": fitted, "shards": [s.shard_id for s in shards]})
        for name in checkpoints:  # large partial sums, removed once the stage is done; the manifest keeps their stats
            self.store.remove(name + ".json")
            self.store.remove(name)
        return factors

    def _queries(self, inputs: Inputs, named: dict, pretrain: str | None, finetune: str | None) -> list[str]:
        """Ṽ_q of every query, in batches; returns the batch files in query order."""
        cfg = self.config
        q = cfg.data.queries
        size = self.plan.query_batch_size
        key = named["key"]
        paths = tuple(expand_paths(q.paths))
        # A batch file is named by the chain (everything but the queries) and its own queries' content:
        # a batch met before, in this query set or another, is reused, so new queries pay for themselves.
        chain = digest({n: v for n, v in named.items() if n not in ("key", "data.queries")})
        pairs = read_pairs(list(paths), q.prompt_column, q.completion_column, q.id_column)
        jobs = []
        for i, lo in enumerate(range(0, len(pairs), size)):
            batch = digest([[p.id, p.prompt, p.completion] for p in pairs[lo : lo + size]])
            jobs.append(QueryJob(i, cfg.query_model, paths, (q.id_column, q.prompt_column, q.completion_column), lo,
                                 min(lo + size, len(pairs)), layout.query_batch(chain, batch)))
        files = [j.output for j in jobs]
        if self._is_done("queries", key, named):
            return files
        started = time.monotonic()
        spec = ChainSpec(cfg.method, pretrain, finetune, cfg.factors.damping_pretrain, cfg.factors.damping_finetune,
                         cfg.scoring.query_rank)
        stats = self._map("queries", "precondition", jobs, spec)
        rank = "full rank" if cfg.scoring.query_rank is None else f"rank {cfg.scoring.query_rank}"
        self.log(f"[queries] {inputs.num_queries} queries preconditioned ({cfg.method}, {rank}) in {len(jobs)} "
                 f"batches of up to {size}, {stats['seconds']:.1f}s")
        self._finish_stage("queries", key, started, {"precondition": stats}, outputs=files)
        return files

    def _scores_done(self, key: str, named: dict) -> bool:
        """Whether the scores of ``key`` are done; they are then (re)published to ``scores/``."""
        previous = self.manifest["stages"].get("scores", {})
        published = (previous.get("fingerprint") == key and previous.get("state") == "done"
                     and self.store.exists(TOPK) and self.store.exists(BOTTOMK))
        if not published and self.store.exists(layout.stage_record("scores", key)):
            self._publish(key)  # done for this key, but the result in scores/ is another key's
        return self._is_done("scores", key, named)

    def _scores(self, inputs: Inputs, named: dict, query_files: list[str]) -> None:
        cfg = self.config
        corpus = cfg.data.corpus
        key = named["key"]
        if self._scores_done(key, named):
            return
        started = time.monotonic()
        groups = self._query_groups(query_files)
        stats, partials = {}, []
        for g, files in enumerate(groups):
            jobs = [ShardJob("scores", s, layout.score_partial(key, g, s.shard_id), cfg.corpus_model, "documents",
                             (corpus.id_column, corpus.text_column)) for s in inputs.corpus_shards]
            name = "scores" if len(groups) == 1 else f"scores/g{g}"
            stats[name] = self._map(name, "scores", jobs, files, cfg.scoring.top_k)
            partials += [j.output for j in jobs]
        if sum(s["documents"] for s in stats.values()) == 0:
            skipped = next(iter(stats.values()))["skipped_empty"]
            raise DataError(f"data.corpus: every document is empty ({skipped} rows skipped)")
        tree_merge(self.store, partials, cfg.scoring.top_k, lambda level, i: layout.merge_step(key, level, i),
                   final=(layout.scores_result(key, "topk"), layout.scores_result(key, "bottomk")))
        self._finish_stage("scores", key, started, _combine_groups(stats) if len(groups) > 1 else stats,
                           publish=lambda: self._publish(key))

    def _publish(self, key: str) -> None:
        """Copy the merged tables of ``key`` to ``scores/topk.parquet`` and ``scores/bottomk.parquet``."""
        for side, name in (("topk", TOPK), ("bottomk", BOTTOMK)):
            self.store.write_bytes(name, self.store.read_bytes(layout.scores_result(key, side)))

    def _query_groups(self, query_files: list[str]) -> list[tuple[str, ...]]:
        """The query batch files cut into the groups that fit the budget at once (one corpus pass each)."""
        per_group = self.plan.query_group_batches
        groups = [tuple(query_files[i : i + per_group]) for i in range(0, len(query_files), per_group)]
        if len(groups) > 1:
            self.log(f"[scores] the queries do not fit the budget at once: {len(groups)} query groups of up to "
                     f"{per_group * self.plan.query_batch_size} queries, one pass each")
        return groups

    # ----------------------------------------------------------------------- the corpus gradient index

    def index_store(self) -> RunDir:
        """Where the corpus gradient index lives: ``index.path``, else ``<run_dir>/index``."""
        return RunDir(self.config.index.path or self.store.url("index"))

    def index_identity(self, inputs: Inputs) -> dict:
        """What the index's rows depend on besides the documents and its projections: it is reused only
        when all of it matches. Whitened (``index.py``) when the method has pre-training factors."""
        cfg = self.config
        return {"corpus model": inputs.digests[_corpus_model_key(cfg)], "tokenizer": tokenizer_digest(inputs.tokenizer),
                "modules": [[s.name, s.out_features, s.in_dim] for s in inputs.layers],
                "data.max_length": cfg.data.max_length, "index.dim": cfg.index.dim, "index.seed": cfg.index.seed,
                "whitened": cfg.method != "grad_dot", "format": INDEX_FORMAT}

    def _projection_folder(self, pretrain_key: str | None) -> str:
        """The index's projections: those it was built with, else those this run would write (whitened
        by the pre-training factors of ``pretrain_key``). Stored with the index, so that it outlives a
        refit of the factors: the estimate is unbiased for any whitening, as long as both sides share it."""
        store = self.index_store()
        if store.exists(layout.INDEX_IDENTITY):
            return store.read_json(layout.INDEX_IDENTITY)["projections"]
        return layout.index_projections(pretrain_key or "plain")

    def _index(self, inputs: Inputs, pretrain: str | None, identity: dict) -> RunDir:
        """Index every corpus shard not in the index yet (a shard is named by its content). A new index
        first stores its projections, whitened by the pre-training factors under ``pretrain`` (None:
        not whitened), then its identity."""
        cfg = self.config
        store = self.index_store()
        check_identity(store, identity, "index.path")
        if not store.exists(layout.INDEX_IDENTITY):
            factors = StoredFactors(self.store, 0)  # keeps one layer's factors at a time
            load = None if pretrain is None else (lambda layer: factors.layer(pretrain, layer))
            for spec in inputs.layers:
                projection = random_projections([spec], cfg.index.dim, cfg.index.seed, factors=load)[spec.name]
                store.save_tensors(layout.index_projection(identity["projections"], spec.name), projection.tensors())
            store.write_json(layout.INDEX_IDENTITY, identity)
        started = time.monotonic()
        corpus = cfg.data.corpus
        jobs = [ShardJob("index", s, layout.index_shard(s.shard_id), cfg.corpus_model, "documents",
                         (corpus.id_column, corpus.text_column)) for s in inputs.corpus_shards]
        stats = self._map("index", "index", jobs, store.url(), identity["projections"], store=store)
        if stats["documents"] == 0:
            raise DataError(f"data.corpus: every document is empty ({stats['skipped_empty']} rows skipped)")
        self.log(f"[index] {store.url()}: {stats['reused']} shards reused, {stats['computed']} indexed "
                 f"(k = {cfg.index.dim}, {stats['seconds']:.1f}s)")
        outcome = "reused" if stats["computed"] == 0 else "computed"
        self.manifest["stages"]["index"] = {"inputs": identity, "outcome": outcome,
                                            "reason": f"{stats['computed']} of {stats['shards_total']} shards indexed"}
        self._finish_stage("index", digest(identity, [j.job_id for j in jobs]), started, {"index": stats},
                           done_record=False)
        return store

    def _index_scores(self, inputs: Inputs, named: dict, query_files: list[str], index: RunDir, identity: dict) -> None:
        """Scores by the index: each query's best candidates by a matrix product over the index, then
        ``scoring.rerank`` of them re-scored exactly (a forward and backward pass over those documents).

        Every output is per (query batch, shard), so a batch already scanned and re-scored against
        the same index and corpus shards is reused: new queries pay only for themselves.
        """
        cfg = self.config
        top_k, rerank = cfg.scoring.top_k, cfg.scoring.rerank
        num_candidates = top_k if rerank == 0 else max(rerank, top_k)
        scan_key = digest(identity, num_candidates)
        corpus_key = inputs.digests["data.corpus"]
        key = named["key"]
        if self._scores_done(key, named):
            return
        started = time.monotonic()
        per_job = self.plan.query_group_batches
        jobs = []
        for shard in inputs.corpus_shards:
            outputs = {f: layout.scan_partial(scan_key, f, shard.shard_id) for f in query_files}
            for files in self._pending_chunks(query_files, outputs, per_job):
                jobs.append(ScanJob(shard.shard_id, layout.index_shard(shard.shard_id), files,
                                    tuple(outputs[f] for f in files)))
        stats = {"scan": self._map("scan", "scan", jobs, index.url(), identity["projections"], num_candidates,
                                   tuple(s.name for s in inputs.layers))}
        candidates = {}
        for f in query_files:
            candidates[f] = layout.batch_candidates(scan_key, f, corpus_key)
            if not self.store.exists(candidates[f]):
                partials = [layout.scan_partial(scan_key, f, s.shard_id) for s in inputs.corpus_shards]
                tree_merge(self.store, partials, num_candidates,
                           lambda level, i: f"{candidates[f]}.merge/{level}-{i:05d}.parquet", output=candidates[f])
        final = [candidates[f] for f in query_files]
        if rerank:
            reranked, stats["rerank"] = self._rerank(inputs, scan_key, query_files, candidates)
            final = reranked
        tree_merge(self.store, final, top_k, lambda level, i: layout.merge_step(key, level, i),
                   final=(layout.scores_result(key, "topk"), layout.scores_result(key, "bottomk")))
        self._finish_stage("scores", key, started, stats, publish=lambda: self._publish(key))

    def _rerank(self, inputs: Inputs, scan_key: str, query_files: list[str], candidates: dict[str, str]
                ) -> tuple[list[str], dict]:
        """Exact scores of each batch's candidate pairs, shard by shard; returns the files and the pass's stats.

        Every top candidate is re-scored; of the bottom (opponent) candidates only the first k,
        since only ``topk.parquet`` is the ranking asked for."""
        cfg = self.config
        corpus = cfg.data.corpus
        pairs: dict[str, dict[str, tuple]] = {}  # shard id -> batch file -> its candidate pairs in that shard
        for f in query_files:
            table = self.store.read_parquet(candidates[f])
            found: dict[str, list] = {}
            columns = (table[c].to_pylist() for c in ("query_id", "doc_id", "side", "shard"))
            for (query, doc, side, shard), rank in zip(zip(*columns), rank_within_groups(table)):
                if side == "top" or rank < cfg.scoring.top_k:
                    found.setdefault(shard, []).append((query, doc, side))
            for shard, items in found.items():
                pairs.setdefault(shard, {})[f] = tuple(sorted(items))
        jobs, files = [], []
        for shard in inputs.corpus_shards:
            here = pairs.get(shard.shard_id, {})
            outputs = {f: layout.rerank_partial(scan_key, f, shard.shard_id, digest(p)) for f, p in here.items()}
            files += [outputs[f] for f in query_files if f in here]
            for chunk in self._pending_chunks([f for f in query_files if f in here], outputs, self.plan.query_group_batches):
                documents = frozenset(d for f in chunk for _, d, _ in here[f])
                read = ShardJob("rerank", shard, "", cfg.corpus_model, "documents", (corpus.id_column, corpus.text_column),
                                doc_ids=documents)
                jobs.append(RerankJob(read, chunk, tuple(here[f] for f in chunk), tuple(outputs[f] for f in chunk)))
        return files, self._map("rerank", "rescore", jobs)

    def _pending_chunks(self, files: list[str], outputs: dict[str, str], size: int) -> list[tuple[str, ...]]:
        """The query batches whose output is not done yet, in chunks of ``size`` (one job each); when
        none is pending, all of them as one chunk, so that the pass counts the shard as reused."""
        pending = [f for f in files if not self.store.exists(done_marker(outputs[f]))]
        if not pending:
            return [tuple(files)] if files else []
        return [tuple(pending[i : i + size]) for i in range(0, len(pending), size)]

    # ----------------------------------------------------------------------- map passes

    def _workers(self) -> WorkerPool:
        if self.pool is None:
            cfg = self.config
            settings = WorkerSettings(
                run_dir=self.store.url(), tokenizer=cfg.tokenizer,
                include=cfg.modules.include, exclude=cfg.modules.exclude, max_length=cfg.data.max_length,
                batch_size=cfg.ray.batch_size, num_threads=cfg.ray.num_cpus_per_worker, num_gpus=cfg.ray.num_gpus_per_worker,
                precision=cfg.ray.precision, checkpoint_seconds=cfg.ray.checkpoint_seconds,
                factor_cache_bytes=self.plan.factor_cache_bytes,
                trust_remote_code=cfg.models.trust_remote_code, fault=os.environ.get(FAULT_ENV),
            )
            self.pool = WorkerPool(ShardWorker, cfg.ray.num_workers, cfg.ray.num_cpus_per_worker,
                                   cfg.ray.num_gpus_per_worker, settings)
        return self.pool

    def _run_jobs(self, name: str, method: str, jobs: list, progress: Progress, *args) -> tuple[dict, list[str]]:
        """Hand ``jobs`` to the pool; returns their stats by job id and the ids whose worker crashed."""
        done, retries = {}, []
        crashed = lambda job, attempt: retries.append(job.job_id)  # noqa: E731
        try:
            for job, stats in self._workers().map(method, jobs, *args, on_crash=crashed):
                done[job.job_id] = stats
                progress.update(stats["tokens"], stats["documents"])
        except WorkerCrashError as err:
            if err.out_of_memory and self.plan is not None:
                raise WorkerMemoryError(self.plan.out_of_memory_message(name, str(err))) from err
            raise
        return done, retries

    def _map(self, name: str, method: str, jobs: list, *args, store: RunDir | None = None) -> dict:
        """Run ``method`` on every job without a ``.done.json`` yet (in ``store``, by default the run
        directory); return the pass's stats."""
        store = store or self.store
        done = {j.job_id: store.read_json(done_marker(j.output)) for j in jobs if store.exists(done_marker(j.output))}
        pending = [j for j in jobs if j.job_id not in done]
        progress = Progress(name, len(pending), self.log)
        if done:
            self.log(f"[{name}] resuming: {len(done)}/{len(jobs)} already done")
        computed, retries = self._run_jobs(name, method, pending, progress, *args) if pending else ({}, [])
        done |= computed
        return _pass_stats([done[j.job_id] for j in jobs], len(pending), retries, progress.seconds)

    def _accumulate(self, stage: str, pass_name: str, jobs: list[ShardJob], group: int, *args) -> tuple[dict, list[str]]:
        """An accumulating pass: workers sum shards and commit checkpoints; rounds until every shard
        is in a committed checkpoint. Returns the pass's stats and the checkpoint names."""
        folder = jobs[0].output  # every job of the pass names the same checkpoint folder
        name = f"{stage} {pass_name}" + (f" (layer group {group + 1}/{len(self.plan.layer_groups)})"
                                         if len(self.plan.layer_groups) > 1 else "")
        retries: list[str] = []
        first_round, computed, seconds = True, 0, 0.0
        for _ in range(MAX_ROUNDS):
            checkpoints = committed_checkpoints(self.store, folder)
            in_checkpoints = {shard for shards in checkpoints.values() for shard in shards}
            pending = [j for j in jobs if j.job_id not in in_checkpoints]
            if first_round and in_checkpoints:
                self.log(f"[{name}] resuming: {len(in_checkpoints)}/{len(jobs)} shards already in checkpoints")
            if not pending:
                per_shard = {shard: s for shards in checkpoints.values() for shard, s in shards.items()}
                stats = _pass_stats([per_shard[j.job_id] for j in jobs], computed, retries, seconds)
                return stats | {"checkpoints": len(checkpoints)}, sorted(checkpoints)
            if first_round:
                computed = len(pending)
            else:
                self.log(f"[{name}] {len(pending)} shards were lost with a crashed worker; computing them again")
            progress = Progress(name, len(pending), self.log)
            _, crashed = self._run_jobs(name, pass_name, pending, progress, *args)
            self._workers().call_all("commit")
            retries += crashed
            seconds += progress.seconds
            first_round = False
        raise RuntimeError(f"[{name}] shards still missing from the checkpoints after {MAX_ROUNDS} rounds")

    def _shape(self, layer: str) -> tuple[int, int]:
        spec = next(s for s in self.plan.layers if s.name == layer)
        return spec.out_features, spec.in_dim

    # ----------------------------------------------------------------------- manifest

    def _is_done(self, stage: str, key: str, named: dict) -> bool:
        """Whether ``stage`` is done for ``key`` (then its record is the manifest's again), else start it.

        Done: its done record ``<stage>/<key>/stage.json`` exists. Logs why the stage is reused or
        (re)computed, comparing ``named`` with the inputs of its last manifest record.
        """
        last = self.manifest["stages"].get(stage)
        record_name = layout.stage_record(stage, key)
        if self.store.exists(record_name):
            self.manifest["stages"][stage] = self.store.read_json(record_name) | {"outcome": "reused"}
            self.log(f"[{stage}] up to date, skipped: reused (key {key})")
            self._save_manifest()
            return True
        named = {n: v for n, v in named.items() if n != "key"}
        outcome, reason = _why(key, named, last)
        self.log(f"[{stage}] {reason} (key {key})")
        self.manifest["stages"][stage] = {"fingerprint": key, "state": "running", "inputs": named,
                                          "outcome": outcome, "reason": reason}
        self._save_manifest()
        return False

    def _finish_stage(self, stage: str, key: str, started: float, passes: dict,
                      publish: Callable[[], None] | None = None, outputs: list[str] | None = None,
                      done_record: bool = True) -> None:
        """Record ``stage`` done for ``key``: its done record in the key's folder (with its ``outputs``
        when they live outside it; none for the index, whose shards are its records), then (after
        ``publish``, if any) the manifest."""
        running = self.manifest["stages"].get(stage, {})
        record = {"fingerprint": key, "state": "done", "seconds": round(time.monotonic() - started, 3),
                  "passes": passes, "inputs": running.get("inputs", {})} | ({"outputs": outputs} if outputs else {})
        if done_record:
            self.store.write_json(layout.stage_record(stage, key), record)
        if publish is not None:
            publish()
        self.manifest["stages"][stage] = record | {k: running[k] for k in ("outcome", "reason") if k in running}
        self._save_manifest()

    def _save_manifest(self, **fields) -> None:
        self.manifest.update(fields)
        self.store.write_json(MANIFEST, self.manifest)


def _corpus_model_key(config: Config) -> str:
    """The setting that names the corpus model (``Config.corpus_model``)."""
    return "models.finetuned" if config.method != "multi_stage" and config.models.finetuned else "models.pretrained"


def check_identity(store: RunDir, identity: dict, key: str) -> None:
    """Refuse an index built for something else, naming what differs (before any heavy pass)."""
    if not store.exists(layout.INDEX_IDENTITY):
        return
    found = store.read_json(layout.INDEX_IDENTITY)
    differing = [name for name in identity if name != "projections" and found.get(name) != identity[name]]
    if differing:
        details = "; ".join(f"{name}: index has {_short(found.get(name))}, this run {_short(identity[name])}"
                            for name in differing)
        raise ConfigError(f"{key}: the index at {store.url()} was built for a different {', '.join(differing)} "
                          f"({details}). Point {key} at a new folder to build an index for this run, or remove that one.")


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _why(key: str, named: dict, last: dict | None) -> tuple[str, str]:
    """(outcome, reason) of a stage about to run: what changed since its last manifest record."""
    if not last:
        return "computed", "computed (no earlier run)"
    if last.get("fingerprint") == key:
        if last.get("state") == "done":
            return "recomputed", "recomputed because its outputs are gone"
        return "resumed", "resuming (an earlier run stopped before the end of this stage)"
    before = last.get("inputs")
    if before is None:
        return "recomputed", "recomputed (the earlier run did not record its inputs)"
    changed = sorted(n for n in named.keys() | before.keys() if named.get(n) != before.get(n))
    return "recomputed", f"recomputed because {', '.join(changed) or 'its key'} changed"


def _pass_stats(per_job: list[dict], computed: int, retries: list[str], seconds: float) -> dict:
    return {
        "shards_total": len(per_job), "computed": computed, "reused": len(per_job) - computed,
        "retried_after_crash": retries, "seconds": round(seconds, 3),
        "tokens": sum(s["tokens"] for s in per_job),
        "documents": sum(s["documents"] for s in per_job),
        "skipped_empty": sum(s["skipped"] for s in per_job),
        "worker_peak_rss_mb": max((s["worker_peak_rss_mb"] for s in per_job), default=0.0),
        "per_shard": {s["shard"]: s for s in per_job},
    }


def _combine_groups(stats: dict[str, dict]) -> dict[str, dict]:
    """Per-pass stats summed over layer (or query) groups: ``covariance/g0`` + ``covariance/g1`` -> ``covariance``."""
    combined: dict[str, dict] = {}
    for name, s in stats.items():
        base = name.split("/")[0]
        if base not in combined:
            combined[base] = dict(s, groups=1)
            continue
        c = combined[base]
        c["groups"] += 1
        c["seconds"] = round(c["seconds"] + s["seconds"], 3)
        c["retried_after_crash"] = c["retried_after_crash"] + s["retried_after_crash"]
        c["worker_peak_rss_mb"] = max(c["worker_peak_rss_mb"], s["worker_peak_rss_mb"])
    return combined


def _check_pairs(tokenizer, paths: list[str], prompt_column: str, completion_column: str,
                 id_column: str | None = None) -> tuple[int, float]:
    """Read and tokenize every prompt/completion pair once (errors name the file, row or id).

    Returns how many there are and their mean length in tokens.
    """
    check_columns(paths, [prompt_column, completion_column] + ([id_column] if id_column else []))
    pairs = read_pairs(paths, prompt_column, completion_column, id_column)
    encoded = encode_prompt_completions(tokenizer, [p.prompt for p in pairs], [p.completion for p in pairs],
                                        [p.id for p in pairs])
    return len(pairs), sum(len(ids) for ids, _ in encoded) / max(len(encoded), 1)


def _tokens_per_document(config: Config, inputs: Inputs, sample: int = 200) -> float:
    """Mean tokens per document over the first ``sample`` documents of the first shard (for the plan)."""
    corpus = config.data.corpus
    docs, _ = read_documents(inputs.corpus_shards[0], corpus.id_column, corpus.text_column)
    texts = [d.text for d in docs[:sample]]
    if not texts:
        return float(config.data.max_length)
    return sum(len(ids) for ids in inputs.tokenizer(texts)["input_ids"]) / len(texts)
