"""``Pipeline``: the stages of ``msif run`` in order, over a run directory.

    validate          configs, columns, ids, tokenizer/model fit: cheap checks before any heavy pass
                      (``inputs.py``); in index mode, an index built for other inputs is refused
    plan              memory per process, layer groups, query batches and groups (``plan.py``);
                      a plan that cannot fit the budget is refused here, before any heavy pass
    factors/finetune  EK-FAC of θ_ft on the fine-tuning data            (multi_stage; ``factors.py``)
    factors/pretrain  EK-FAC of θ_pt on the corpus (or a sample of it)  (multi_stage, single_stage)
    queries           G_q, preconditioned by the method's chain, rank-r, in batches (``queries.py``)
    index             index mode: the corpus gradient index (``index.py``); its pass also gives the
                      self-influence of the shards it indexes, when scoring.normalize asks for it
    self_influence    with scoring.normalize: each document's G_mᵀ(H_pt + λI)⁻¹G_m (``self_influence.py``)
    scores            exact: every corpus document against each query group, top/bottom k per shard,
                      a tree of bounded merges (``scores.py``); index: a scan of the index, exact
                      re-scoring of the candidates (``index.py``)

``run()`` is the same run as ``msif run``'s: it takes the run directory's lock and makes the same
early checks first (``guard.guarded``: storage, lock, Ray started or ``ray.address`` joined beside
validation, the cluster's shape), unless the calling thread holds that lock already (``msif run``
and ``msif tune`` call it inside their own); then it only counts on the lock.

Each stage is keyed by a digest of its named inputs (``keys.py``) and skipped when its done record
for that key exists (``records.py``); inside a stage, map passes resume where they stopped
(``passes.py``). The stages share one worker pool, started on first use.

An artifact found damaged on load (``DamagedArtifactError``, raised in the driver or re-raised by
Ray from a worker) is never used: the run discards it with every marker and record that declares
it done (``layout.records_covering``) and runs the stages again, up to MAX_REPAIRS times; content
keys and resume then recompute only what is missing, and outputs computed earlier from the
undamaged artifact stay.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Callable

from msif_ray.config import Config, redact_secrets
from msif_ray.errors import user_error
from msif_ray.pipeline import factors, index, queries, scores, self_influence
from msif_ray.pipeline.context import RunContext
from msif_ray.pipeline.guard import guarded
from msif_ray.pipeline.inputs import Inputs, tokens_per_document, validate
from msif_ray.pipeline.keys import check_identity, index_identity, index_store, stage_inputs
from msif_ray.pipeline.passes import FAULT_ENV, Passes
from msif_ray.pipeline.plan import ResourcePlan, make_plan
from msif_ray.pipeline.records import StageRecords
from msif_ray.store.layout import TOPK, records_covering
from msif_ray.store.lock import API, RunDirLock, held_by_this_thread
from msif_ray.store.quarantine import quarantine_rows, quarantined
from msif_ray.store.storage import DamagedArtifactError, RunDir

__all__ = ["FAULT_ENV", "Inputs", "Pipeline"]
MAX_REPAIRS = 5  # damaged artifacts discarded and recomputed in one run before it gives up


class Pipeline:
    """One run of a config over its run directory; ``run()`` runs or resumes every stage."""

    def __init__(self, config: Config, log: Callable[[str], None] = print):
        self.config = config
        self.log = log
        self.store = RunDir(config.run_dir)
        self.records = StageRecords(self.store, log)
        self.plan: ResourcePlan | None = None

    @property
    def manifest(self) -> dict:
        return self.records.manifest

    def validate(self) -> Inputs:
        """Every check that needs no heavy compute, so that bad input fails in seconds."""
        inputs = validate(self.config, self.log)
        if self.config.scoring.mode == "index":  # before any heavy pass: an index built for other inputs is refused
            check_identity(index_store(self.config, self.store), index_identity(self.config, inputs), "index.path")
        return inputs

    def checked(self, inputs: Inputs | None = None) -> Inputs:
        """The inputs validated (unless given) and the plan made and checked against the memory budget."""
        inputs = inputs or self.validate()
        self.plan = self.plan or self.resource_plan(inputs)
        self.plan.check()
        return inputs

    def resource_plan(self, inputs: Inputs, profile=None) -> ResourcePlan:
        """The memory / storage / time plan of this run (``profile``: a named device instead of this machine's)."""
        shards = inputs.corpus_shards
        known = all(s.num_tokens is not None for s in shards)
        return make_plan(self.config, inputs.model_config, inputs.layers, inputs.num_queries,
                         sum(s.num_rows for s in shards), tokens_per_document(self.config, inputs),
                         profile, inputs.num_params, sum(s.num_rows for s in inputs.finetune_shards),
                         inputs.tokens_per_query, sum(s.num_tokens for s in shards) if known else None)

    def run(self, inputs: Inputs | None = None) -> str:
        """Run (or resume) every stage; returns the path of ``scores/topk.parquet``.

        ``inputs`` is what ``validate()`` returned, when the caller validated first. The run holds
        the run directory's lock (``LockHeldError`` while another run does) and makes ``msif run``'s
        early checks before any stage (``guard.guarded``); in a thread that holds the lock already,
        it only counts on it.
        """
        if not held_by_this_thread(self.store):
            return guarded(self.config, API, lambda: (self, self.checked(inputs)), lambda p, i: p._run(i), self.log)
        with RunDirLock(self.store, API, log=self.log):  # held by this thread: it only counts
            return self._run(inputs)

    def _run(self, inputs: Inputs | None) -> str:
        started = time.monotonic()
        cfg = self.config
        inputs = self.checked(inputs)
        for line in self.plan.summary_lines():
            self.log(f"[plan] {line}")
        self.records.save(config=redact_secrets(cfg.to_dict()), digests=inputs.digests,
                          shards={"corpus": [s.shard_id for s in inputs.corpus_shards]}, plan=self.plan.to_dict())
        quarantine_rows(self.store, inputs.corpus_shards, inputs.bad_documents)
        named = stage_inputs(cfg, inputs, self.plan, self.store, self.log)
        passes = Passes(cfg, self.store, self.plan, self.log,
                        index_store(cfg, self.store) if cfg.scoring.mode == "index" else None)
        run = RunContext(cfg, self.store, self.plan, self.records, passes, self.log)
        try:
            self._repaired_stages(run, inputs, named)
        finally:
            passes.shutdown()
        left_out = quarantined(self.store, [s.shard_id for s in inputs.corpus_shards])
        self.records.save(quarantine=[asdict(b) for b in left_out])
        if left_out:
            self.log(f"warning: {len(left_out)} bad document(s) left out of every sum (data.on_bad_document: skip); "
                     "msif status and the report list them")
        self.log(f"done in {time.monotonic() - started:.1f}s: {self.store.url(TOPK)}")
        return self.store.url(TOPK)

    def _repaired_stages(self, run: RunContext, inputs: Inputs, named: dict[str, dict]) -> None:
        """The stages, run again after each damaged artifact found, discarded, up to MAX_REPAIRS times."""
        for repairs in range(MAX_REPAIRS + 1):
            try:
                return self._stages(run, inputs, named)
            except DamagedArtifactError as err:
                if repairs == MAX_REPAIRS:
                    raise
                self._discard(user_error(err), run.passes)  # Ray's re-raised error wraps the worker's

    def _discard(self, damage: DamagedArtifactError, passes: Passes) -> None:
        """Remove a damaged artifact of the run directory or the index, and what declares it done.

        The worker pool is restarted: its actors may still run jobs of the interrupted pass, and
        an accumulating one must not add a shard that the next round hands out again. A damaged
        file anywhere else (none is read through ``RunDir`` today) is not ours to remove.
        """
        store = RunDir(damage.root)
        if store.url() not in (self.store.url(), index_store(self.config, self.store).url()):
            raise damage
        self.log(f"warning: {damage}; discarding it and computing it again")
        passes.shutdown()
        for name in [damage.name, *records_covering(damage.name)]:
            store.remove(name)

    @staticmethod
    def _stages(run: RunContext, inputs: Inputs, named: dict[str, dict]) -> None:
        """The stages of the config's method, in order."""
        cfg = run.config
        pretrain = finetune = None
        if cfg.method == "multi_stage":
            ft = cfg.data.finetune
            finetune = factors.fit_factors(run, "factors/finetune", named["factors/finetune"], cfg.models.finetuned,
                                           inputs.finetune_shards, "pairs", (ft.prompt_column, ft.completion_column),
                                           None)
        if cfg.method in ("multi_stage", "single_stage"):
            corpus = cfg.data.corpus
            pretrain = factors.fit_factors(run, "factors/pretrain", named["factors/pretrain"], cfg.corpus_model,
                                           inputs.corpus_shards, "documents", corpus.columns,
                                           cfg.factors.max_examples)
        query_files = queries.precondition_queries(run, inputs, named["queries"], pretrain, finetune)
        if cfg.scoring.mode == "index":  # the index pass computes the self-influence of the shards it indexes
            built = index.build_index(run, inputs, pretrain, named["index"], named.get("self_influence", {}).get("key"))
            norm = self_influence.self_influence(run, inputs, named, pretrain)
            index.index_scores(run, inputs, named["scores"], query_files, built, named["index"], norm)
        else:
            norm = self_influence.self_influence(run, inputs, named, pretrain)
            scores.exact_scores(run, inputs, named["scores"], query_files, norm)
