"""What a run maps over, found by ``validate``: every check that needs no heavy compute, so that bad
input fails in seconds (configs, columns, data pages, ids, tokenizer/model fit), and the content
digests of the named inputs that the stages' keys are made of (``keys.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from msif_ray.config import Config
from msif_ray.engine.gradients import encode_prompt_completions
from msif_ray.engine.modules import LayerSpec, layer_spec, select_modules
from msif_ray.store.data import (
    Shard, check_columns, check_corpus_columns, check_token_ids, check_unique_ids, expand_paths, plan_shards,
    read_documents, read_pairs,
)
from msif_ray.store.digests import TOKENIZER_FILES, digest, file_digests, tree_digest
from msif_ray.store.models import check_same_shapes, check_tokenizer_fits, load_config, load_tokenizer, model_skeleton
from msif_ray.store.quarantine import BadDocument, BadDocumentsError
from msif_ray.store.scan import scan_corpus


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
    # Corpus rows the validation scan could not read or decode (data.on_bad_document: skip); the
    # run quarantines them (quarantine.quarantine_rows) before its first pass.
    bad_documents: list[BadDocument] = field(default_factory=list)


def validate(cfg: Config, log: Callable[[str], None]) -> Inputs:
    """Every check that needs no heavy compute; returns what the stages map over and their digests."""
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
    check_corpus_columns(corpus_paths, *corpus.columns, corpus.layout)
    shards = plan_shards(corpus_paths, cfg.data.rows_per_shard, corpus.layout)
    bad = scan_corpus(shards, *corpus.columns, log=log)
    if bad and cfg.data.on_bad_document == "fail":
        raise BadDocumentsError(bad, "data.corpus: ")
    if bad:
        log(f"warning: {len(bad)} corpus document(s) cannot be read or decoded; they are left out of every pass "
            "and listed in the run's quarantine (data.on_bad_document: skip)")
    check_token_ids(shards, *corpus.columns, pretrained.vocab_size, left_out=bad)
    check_unique_ids(shards, corpus.id_column, left_out=bad)
    q = cfg.data.queries
    query_paths = expand_paths(q.paths)
    num_queries, query_tokens = _check_pairs(tokenizer, query_paths, q.prompt_column, q.completion_column, q.id_column)
    inputs = Inputs(shards, [layer_spec(n, m) for n, m in modules.items()], pretrained,
                    sum(p.numel() for p in skeleton.parameters()), tokenizer, num_queries, query_tokens,
                    bad_documents=bad)
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
    log(f"validated: {len(shards)} corpus shards, {num_queries} queries, method {cfg.method}")
    return inputs


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


def tokens_per_document(config: Config, inputs: Inputs, sample: int = 200) -> float:
    """Mean tokens per document over the first ``sample`` documents of the first shard (for the plan)."""
    corpus = config.data.corpus
    first = inputs.corpus_shards[0]
    if first.num_tokens is not None:
        return first.num_tokens / max(first.num_rows, 1)
    docs, _ = read_documents(first, *corpus.columns, bad=[])  # bad rows: quarantined, not counted
    docs = docs[:sample]
    if not docs:
        return float(config.data.max_length)
    if docs[0].input_ids is not None:
        return sum(len(d.input_ids) for d in docs) / len(docs)
    return sum(len(ids) for ids in inputs.tokenizer([d.text for d in docs])["input_ids"]) / len(docs)
