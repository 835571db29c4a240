"""The engine's Python API (no Ray): a tracked model and the passes a notebook runs on it.

Example::

    pt = TrackedLM(pretrained_model, tokenizer)
    ft = TrackedLM(finetuned_model, tokenizer)
    pt_factors = pt.fit_factors(Examples.documents(corpus_texts))
    ft_factors = ft.fit_factors(Examples.pairs(ft_prompts, ft_completions))
    v = ft.query_vectors(Examples.pairs(q_prompts, q_completions), Chain.of("multi_stage", pt_factors, ft_factors),
                         rank=32)
    scores = pt.score(Examples.documents(corpus_texts), v)     # scores.total: [N docs, Q queries]

The pipeline's workers call the same per-pass functions (``precondition_queries``,
``scoring.score_windows``, ``index.document_terms``), so both paths give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from msif_ray.engine.curvature import Damping, Factors, fit_factors
from msif_ray.engine.gradients import (
    Batch, Fisher, encode_documents, encode_prompt_completions, example_gradients, make_batches, make_windows,
    model_device, pad_token_id,
)
from msif_ray.engine.index import IndexRows, document_self_influence, document_terms, rotate_queries, scan, term_bases
from msif_ray.engine.influence import Chain, precondition_queries
from msif_ray.engine.modules import LayerTaps, select_modules
from msif_ray.engine.scoring import Normalize, QueryGroup, normalize_scores, score_windows, token_scores
from msif_ray.engine.vectors import QueryVectors, as_query_vectors

@dataclass(frozen=True)
class Examples:
    """What a pass runs over: documents (all tokens after the first scored), as text or as token ids
    read as they are, or prompt/completion pairs."""

    texts: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    completions: tuple[str, ...] = ()
    ids: tuple[str, ...] | None = None
    token_ids: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def documents(cls, texts: Sequence[str]) -> "Examples":
        return cls(texts=tuple(texts))

    @classmethod
    def tokens(cls, token_ids: Sequence[Sequence[int]]) -> "Examples":
        """Documents given as the token ids they were trained on (no tokenizer in the loop)."""
        return cls(token_ids=tuple(tuple(int(t) for t in ids) for ids in token_ids))

    @classmethod
    def from_dataset(cls, dataset, text_column: str = "text", token_column: str | None = None) -> "Examples":
        """The documents of a ``datasets.Dataset`` (or any table indexed by column name): its
        ``token_column`` of token-id lists when given, else its ``text_column``."""
        return cls.tokens(dataset[token_column]) if token_column else cls.documents(dataset[text_column])

    @classmethod
    def pairs(cls, prompts: Sequence[str], completions: Sequence[str], ids: Sequence[str] | None = None) -> "Examples":
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return cls(prompts=tuple(prompts), completions=tuple(completions), ids=tuple(ids) if ids is not None else None)

    def __len__(self) -> int:
        return len(self.texts) or len(self.prompts) or len(self.token_ids)

    def encode(self, tokenizer) -> list[tuple[list[int], list[bool]]]:
        if not len(self):  # a shard whose documents are all empty or left out
            return []
        if self.token_ids:
            return [(list(ids), [False] + [True] * (len(ids) - 1)) for ids in self.token_ids]
        if self.texts:
            return encode_documents(tokenizer, self.texts)
        return encode_prompt_completions(tokenizer, self.prompts, self.completions, self.ids)


@dataclass
class Scores:
    """Scores of N examples against Q queries, split by layer: ``per_layer`` [L, N, Q]."""

    per_layer: torch.Tensor
    layers: list[str]

    @property
    def total(self) -> torch.Tensor:
        """[N, Q]"""
        return self.per_layer.sum(0)

    def normalized(self, how: Normalize, self_influence: torch.Tensor | None = None,
                   vectors: QueryVectors | None = None) -> torch.Tensor:
        """``total`` normalised (``scoring.normalize_scores``): ``self`` needs the examples'
        ``TrackedLM.self_influence``, ``unit`` also the scored ``vectors`` (their whitened norms)."""
        return normalize_scores(self.total, how, self_influence, None if vectors is None else vectors.whitened_norms())


class TrackedLM:
    """A causal LM, its tokenizer and its tracked layers: the handle every pass works with."""

    def __init__(
        self, model: nn.Module, tokenizer, include: str | None = None, exclude: str | None = None,
        max_length: int = 256, batch_size: int = 8,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.taps = LayerTaps(select_modules(model, include, exclude))
        self.max_length = max_length
        self.batch_size = batch_size

    @property
    def layers(self) -> list[str]:
        return list(self.taps.modules)

    def batches(self, examples: Examples, by_document: bool = False) -> list[Batch]:
        windows = make_windows(examples.encode(self.tokenizer), self.max_length)
        return list(make_batches(windows, self.batch_size, pad_token_id(self.tokenizer), by_document))

    def fit_factors(self, examples: Examples, fisher: Fisher = "sampled", seed: int = 0) -> Factors:
        """EK-FAC factors of this model on ``examples`` (two passes)."""
        batches = self.batches(examples)
        meta = {"model": type(self.model).__name__, "num_examples": str(len(examples))}
        return fit_factors(self.model, self.taps, lambda: batches, fisher, seed, meta)

    def gradients(self, examples: Examples) -> dict[str, torch.Tensor]:
        """Per-example gradients of log p: name -> [N, out, in(+1)]."""
        return example_gradients(self.model, self.taps, self.batches(examples), len(examples))

    def query_vectors(self, queries: Examples, chain: Chain, rank: int | None = None) -> QueryVectors:
        """Ṽ_q of ``queries`` at this model through ``chain``, rank-``rank`` (None: dense)."""
        ids = queries.ids or [str(i) for i in range(len(queries))]
        return precondition_queries(self.model, self.taps, self.batches(queries), len(queries), chain, rank, ids)

    def score(self, examples: Examples, vectors: QueryVectors | dict[str, torch.Tensor]) -> Scores:
        """Scores of every example against every preconditioned query (windows summed)."""
        group = QueryGroup(as_query_vectors(vectors), model_device(self.model))
        per_layer = torch.zeros(len(self.layers), len(examples), group.num_queries, dtype=torch.float64,
                                device=model_device(self.model))
        for batch in self.batches(examples):
            per_layer.index_add_(1, batch.examples.to(per_layer.device), score_windows(self.model, self.taps, batch, group))
        return Scores(per_layer.cpu(), self.layers)

    def self_influence(self, examples: Examples, factors: Factors | None = None, damping: Damping = "auto") -> torch.Tensor:
        """Each example's G_mᵀ (H + λI)⁻¹ G_m under this model's ``factors`` (‖G_m‖² without): [N]
        float64, windows summed first (``index.document_self_influence``). The documents' side of
        ``normalize: self`` and ``unit``; for multi_stage, pass the pre-training factors."""
        bases = term_bases(list(self.taps.specs.values()), None if factors is None else factors.layer, damping)
        bases = {name: b.to(model_device(self.model)) for name, b in bases.items()}
        return document_self_influence(self.model, self.taps, self.batches(examples, by_document=True), len(examples), bases)

    def index(self, examples: Examples, terms: int, factors: Factors | None = None) -> IndexRows:
        """The corpus gradient index of ``examples``: each one's ``terms`` largest gradient terms per
        layer in the eigenbasis of this model's ``factors`` (the identity without; ``index.py``)."""
        bases = term_bases(list(self.taps.specs.values()), None if factors is None else factors.layer)
        bases = {name: b.to(model_device(self.model)) for name, b in bases.items()}
        return document_terms(self.model, self.taps, self.batches(examples, by_document=True), len(examples), bases,
                              terms)

    def index_scores(self, rows: IndexRows, vectors: QueryVectors, factors: Factors | None = None) -> torch.Tensor:
        """Estimated scores [N, Q] of indexed examples (``rows`` from ``index`` with the same ``factors``)
        against preconditioned queries: the exact scores restricted to each document's kept terms."""
        bases = term_bases(list(self.taps.specs.values()), None if factors is None else factors.layer)
        return scan(rows, rotate_queries(as_query_vectors(vectors), bases, self.layers), self.layers)

    def token_scores(self, document: str | Sequence[int], vectors: QueryVectors | dict[str, torch.Tensor]
                     ) -> tuple[list[int], torch.Tensor]:
        """Token ids of one document (text, or its token ids) and each token's contribution to its score: [T, Q].

        Tokens are those of the document's windows, in order (the overlap token is listed once).
        """
        group = QueryGroup(as_query_vectors(vectors), model_device(self.model))
        ids, contributions = [], []
        examples = Examples.documents([document]) if isinstance(document, str) else Examples.tokens([document])
        windows = make_windows(examples.encode(self.tokenizer), self.max_length)
        for k, window in enumerate(windows):
            batch = next(make_batches([window], 1, pad_token_id(self.tokenizer)))
            per_token = token_scores(self.model, self.taps, batch, group)[0].cpu()
            skip = 1 if k > 0 else 0  # the overlap token's position 0 contributes in this window too
            if skip:
                contributions[-1] = contributions[-1] + per_token[0]
            ids.extend(window.input_ids[skip:])
            contributions.extend(per_token[skip:])
        return ids, torch.stack(contributions)

