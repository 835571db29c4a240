"""The stages' keys: what each stage's outputs depend on, named.

Every stage has a key: ``digests.digest`` of its *named inputs* (``stage_inputs``): the content
digests of the models, the tokenizer and the data it reads (``Inputs.digests``; corpus and
fine-tuning data by their content shard ids), its settings, and the keys of the stages upstream of
it. No path enters a key: a file rewritten in place changes the keys that read it, and unchanged
inputs moved elsewhere change none. Two rules widen reuse beyond equal keys:

- pre-training factors fitted for the same base model and settings on shards that are all still
  in the corpus are kept when shards are appended (``kept_factors``), unless ``factors.refit``;
- the corpus gradient index is reused shard by shard when its identity (``index_identity``)
  matches, and refused, naming what differs, when it does not (``check_identity``).
"""

from __future__ import annotations

import json
from typing import Callable

from msif_ray.config import Config, ConfigError
from msif_ray.pipeline.inputs import Inputs
from msif_ray.pipeline.plan import ResourcePlan
from msif_ray.store import layout
from msif_ray.store.data import Shard
from msif_ray.store.digests import digest, tokenizer_digest
from msif_ray.store.storage import RunDir

INDEX_FORMAT = 2  # the index shards' layout (engine/index.py); another format is another index


def corpus_model_key(config: Config) -> str:
    """The setting that names the corpus model (``Config.corpus_model``)."""
    return "models.finetuned" if config.method != "multi_stage" and config.models.finetuned else "models.pretrained"


def corpus_columns(config: Config) -> list[str]:
    """The corpus columns a stage reads (the token column only when set, so text corpora keep their keys)."""
    corpus = config.data.corpus
    return [corpus.id_column, corpus.text_column] + [c for c in (corpus.token_column, corpus.boundary_column) if c]


def stage_inputs(config: Config, inputs: Inputs, plan: ResourcePlan, store: RunDir,
                 log: Callable[[str], None]) -> dict[str, dict]:
    """The named inputs of every stage of this run's method, each stage's key (``"key"``) among them.

    Names are the config's dotted keys (``models.finetuned``, ``data.queries``, ``factors.fisher``),
    ``tokenizer``, and the upstream stages (``factors/pretrain``: its key); in index mode ``index``
    holds the index's identity (``index_identity``) instead. The key of a stage is
    ``digest(stage, its named inputs)``.
    """
    cfg, d = config, inputs.digests
    query_model = "models.finetuned" if cfg.models.finetuned else "models.pretrained"
    corpus_model = corpus_model_key(cfg)
    ft, q = cfg.data.finetune, cfg.data.queries
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
            "data.corpus.columns": corpus_columns(cfg),
            "factors.max_examples": cfg.factors.max_examples}
        if not cfg.factors.refit:
            named = kept_factors(store, named, [s.shard_id for s in inputs.corpus_shards], log) or named
        upstream["factors/pretrain"] = add("factors/pretrain", named)
    # unit needs each query's whitened norm, which query files written before it lack
    unit = {"scoring.normalize": "unit"} if cfg.scoring.normalize == "unit" else {}
    queries = add("queries", common | upstream | unit | {
        query_model: d[query_model], "data.queries": d["data.queries"],
        "data.queries.columns": [q.id_column, q.prompt_column, q.completion_column], "method": cfg.method,
        "factors.damping_pretrain": cfg.factors.damping_pretrain,
        "factors.damping_finetune": cfg.factors.damping_finetune,
        "scoring.query_rank": cfg.scoring.query_rank, "budget.query_batch_size": plan.query_batch_size})
    scores = {"queries": queries, "data.corpus": d["data.corpus"], "scoring.top_k": cfg.scoring.top_k}
    if cfg.scoring.normalize != "none":
        scores["scoring.normalize"] = cfg.scoring.normalize
        # not the corpus: its outputs are per content-named shard, so appended shards are computed alone
        scores["self_influence"] = add("self_influence", common | {k: v for k, v in upstream.items() if k == "factors/pretrain"} | {
            corpus_model: d[corpus_model], "data.corpus.columns": corpus_columns(cfg),
            "factors.damping_pretrain": cfg.factors.damping_pretrain})
    if cfg.scoring.mode == "index":
        stages["index"] = index_identity(cfg, inputs) | {
            "basis": basis_folder(index_store(cfg, store), upstream.get("factors/pretrain"))}
        add("scores", scores | {"scoring.mode": "index", "index": digest(stages["index"]),
                                "scoring.rerank": cfg.scoring.rerank,
                                "scoring.rerank_max": cfg.scoring.rerank_max})
    else:
        add("scores", common | scores | {
            corpus_model: d[corpus_model], "data.corpus.columns": corpus_columns(cfg),
            "budget.query_group_size": plan.query_group_batches})
    return stages


def _base_key(named: dict) -> str:
    """The pre-training factors' key less the corpus: the base model and the fitting settings."""
    return digest({n: v for n, v in named.items() if n not in ("key", "data.corpus")})


def kept_factors(store: RunDir, named: dict, shard_ids: list[str], log: Callable[[str], None]) -> dict | None:
    """The named inputs of pre-training factors fitted earlier for the same base model and settings
    on shards that are all still in the corpus (it may have grown since). None when there are none."""
    pointer = layout.base_factors(_base_key(named))
    if not store.exists(pointer):
        return None
    kept = store.read_json(pointer)
    fitted_on = set(kept["shards"])
    if not fitted_on <= set(shard_ids) or fitted_on == set(shard_ids):
        return None
    if not store.exists(layout.stage_record("factors/pretrain", digest("factors/pretrain", kept["named"]))):
        return None
    log(f"[factors/pretrain] kept: fitted on {len(fitted_on)} of the {len(shard_ids)} corpus shards now "
        "(shards were appended since); factors.refit: true fits them again on the whole corpus")
    return kept["named"]


def remember_base_factors(store: RunDir, named: dict, shards: list[Shard]) -> None:
    """After fitting pre-training factors: what a later run on a grown corpus keeps (``kept_factors``)."""
    fitted = {n: v for n, v in named.items() if n != "key"}
    store.write_json(layout.base_factors(_base_key(fitted)), {"named": fitted, "shards": [s.shard_id for s in shards]})


def index_store(config: Config, store: RunDir) -> RunDir:
    """Where the corpus gradient index lives: ``index.path``, else ``<run_dir>/index``."""
    return RunDir(config.index.path or store.url("index"))


def index_identity(config: Config, inputs: Inputs) -> dict:
    """What the index's rows depend on besides the documents and its basis: it is reused only when
    all of it matches. In the pre-training eigenbasis (``engine/index.py``) when the method has
    pre-training factors."""
    return {"corpus model": inputs.digests[corpus_model_key(config)], "tokenizer": tokenizer_digest(inputs.tokenizer),
            "modules": [[s.name, s.out_features, s.in_dim] for s in inputs.layers],
            "data.max_length": config.data.max_length, "index.terms": config.index.terms,
            "eigenbasis": config.method != "grad_dot", "format": INDEX_FORMAT}


def basis_folder(index: RunDir, pretrain_key: str | None) -> str:
    """The index's basis: the one it was built in, else the one this run would write (the eigenbasis
    of the pre-training factors of ``pretrain_key``). Stored with the index, so that it outlives a
    refit of the factors: queries are rotated into the index's own basis, which is exact for any
    orthogonal basis."""
    if index.exists(layout.INDEX_IDENTITY):
        return index.read_json(layout.INDEX_IDENTITY)["basis"]
    return layout.index_basis(pretrain_key or "identity")


def check_identity(store: RunDir, identity: dict, key: str) -> None:
    """Refuse an index built for something else, naming what differs (before any heavy pass)."""
    if not store.exists(layout.INDEX_IDENTITY):
        return
    found = store.read_json(layout.INDEX_IDENTITY)
    differing = [name for name in identity if name != "basis" and found.get(name) != identity[name]]
    if differing:
        details = "; ".join(f"{name}: index has {_short(found.get(name))}, this run {_short(identity[name])}"
                            for name in differing)
        raise ConfigError(f"{key}: the index at {store.url()} was built for a different {', '.join(differing)} "
                          f"({details}). Point {key} at a new folder to build an index for this run, or remove that one.")


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
