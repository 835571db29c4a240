"""The preconditioning chains and the scores: the engine's Python API, usable without Ray.

    multi_stage(m, q)  = ⟨ α · (H_pt + λI)⁻¹ (H_ft + αI)⁻¹ G_q , G_m ⟩   G_q at θ_ft, G_m at θ_pt
    single_stage(m, q) = ⟨ (H + λI)⁻¹ G_q , G_m ⟩                        one model θ
    grad_dot(m, q)     = ⟨ G_q , G_m ⟩

G_q is the gradient of log p(completion | prompt), G_m of log p(document); both are per-layer
[out, in(+1)] matrices and ⟨·,·⟩ sums over layers, so scores split exactly by layer, and by token
(G_m = Σ_t s_t a_tᵀ, so token t contributes s_tᵀ Ṽ a_t). Positive = proponent.

Example (a notebook, no Ray)::

    pt = TrackedLM(pretrained_model, tokenizer)
    ft = TrackedLM(finetuned_model, tokenizer)
    pt_factors = pt.fit_factors(Examples.documents(corpus_texts))
    ft_factors = ft.fit_factors(Examples.pairs(ft_prompts, ft_completions))
    v = precondition(ft.gradients(Examples.pairs(q_prompts, q_completions)), "multi_stage",
                     pt_factors, ft_factors, damping_pretrain="auto", damping_finetune="auto")
    scores = pt.score(Examples.documents(corpus_texts), v)     # scores.total: [N docs, Q queries]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn

from msif_ray.curvature import Damping, Factors, fit_factors
from msif_ray.gradients import (
    Batch,
    Fisher,
    backward_through_layers,
    encode_documents,
    encode_prompt_completions,
    example_gradients,
    make_batches,
    make_windows,
    model_device,
    pad_token_id,
    per_example_gradient,
)
from msif_ray.modules import LayerTaps, select_modules

Method = Literal["multi_stage", "single_stage", "grad_dot"]
METHODS: tuple[str, ...] = ("multi_stage", "single_stage", "grad_dot")


def precondition(
    query_grads: dict[str, torch.Tensor],
    method: Method,
    pretrain_factors: Factors | None = None,
    finetune_factors: Factors | None = None,
    damping_pretrain: Damping = "auto",
    damping_finetune: Damping = "auto",
) -> dict[str, torch.Tensor]:
    """Ṽ_q per layer, [Q, out, in(+1)], from query gradients at the scoring model.

    ``pretrain_factors`` are H (θ_pt on the corpus, or the one model's for single_stage);
    ``finetune_factors`` are H_ft (θ_ft on the fine-tuning data), used by multi_stage only.
    """
    if method == "grad_dot":
        return dict(query_grads)
    if pretrain_factors is None:
        raise ValueError(f"{method} needs pre-training factors")
    if method == "single_stage":
        return pretrain_factors.inverse_apply(query_grads, damping_pretrain)
    if method != "multi_stage":
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if finetune_factors is None:
        raise ValueError("multi_stage needs fine-tuning factors")
    alphas = finetune_factors.dampings(damping_finetune)
    after_ft = finetune_factors.inverse_apply(query_grads, damping_finetune)
    after_pt = pretrain_factors.inverse_apply(after_ft, damping_pretrain)
    return {name: alphas[name] * v for name, v in after_pt.items()}


def score_windows(
    model: nn.Module, taps: LayerTaps, batch: Batch, preconditioned: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Per-layer scores of each window against each query: [L, B, Q], layers in ``taps`` order.

    Per layer: G = Σ_t s_t a_tᵀ for the batch in one bmm, then one matmul with all Ṽ_q.
    """
    device = model_device(model)
    names = list(taps.modules)
    flat = {n: preconditioned[n].flatten(1).to(device) for n in names}
    num_queries = next(iter(flat.values())).shape[0]
    scores = torch.zeros(len(names), len(batch.examples), num_queries, device=device, dtype=torch.float64)

    def add_layer(name: str, a: torch.Tensor, s: torch.Tensor) -> None:
        g = per_example_gradient(a, s).flatten(1)
        scores[names.index(name)] = (g @ flat[name].to(g.dtype).t()).double()

    backward_through_layers(model, taps, batch, add_layer)
    return scores


def token_scores(
    model: nn.Module, taps: LayerTaps, batch: Batch, preconditioned: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Σ_layers s_tᵀ Ṽ_q a_t for each input position: [B, T, Q] (sums over T to the window score).

    A report-sized computation: one query at a time to bound memory.
    """
    device = model_device(model)
    out = torch.zeros(*batch.input_ids.shape, next(iter(preconditioned.values())).shape[0], dtype=torch.float64, device=device)

    def add_layer(name: str, a: torch.Tensor, s: torch.Tensor) -> None:
        v = preconditioned[name].to(device=device, dtype=a.dtype)
        for q in range(v.shape[0]):
            out[..., q] += ((s @ v[q]) * a).sum(-1).double()

    backward_through_layers(model, taps, batch, add_layer)
    return out


@dataclass(frozen=True)
class Examples:
    """What a pass runs over: documents (all tokens after the first scored) or prompt/completion pairs."""

    texts: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    completions: tuple[str, ...] = ()
    ids: tuple[str, ...] | None = None

    @classmethod
    def documents(cls, texts: Sequence[str]) -> "Examples":
        return cls(texts=tuple(texts))

    @classmethod
    def pairs(cls, prompts: Sequence[str], completions: Sequence[str], ids: Sequence[str] | None = None) -> "Examples":
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return cls(prompts=tuple(prompts), completions=tuple(completions), ids=tuple(ids) if ids is not None else None)

    def __len__(self) -> int:
        return len(self.texts) or len(self.prompts)

    def encode(self, tokenizer) -> list[tuple[list[int], list[bool]]]:
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

    def batches(self, examples: Examples) -> list[Batch]:
        windows = make_windows(examples.encode(self.tokenizer), self.max_length)
        return list(make_batches(windows, self.batch_size, pad_token_id(self.tokenizer)))

    def fit_factors(self, examples: Examples, fisher: Fisher = "sampled", seed: int = 0) -> Factors:
        """EK-FAC factors of this model on ``examples`` (two passes)."""
        batches = self.batches(examples)
        meta = {"model": type(self.model).__name__, "num_examples": str(len(examples))}
        return fit_factors(self.model, self.taps, lambda: batches, fisher, seed, meta)

    def gradients(self, examples: Examples) -> dict[str, torch.Tensor]:
        """Per-example gradients of log p: name -> [N, out, in(+1)]."""
        return example_gradients(self.model, self.taps, self.batches(examples), len(examples))

    def score(self, examples: Examples, preconditioned: dict[str, torch.Tensor]) -> Scores:
        """Scores of every example against every preconditioned query (windows summed)."""
        num_queries = next(iter(preconditioned.values())).shape[0]
        per_layer = torch.zeros(len(self.layers), len(examples), num_queries, dtype=torch.float64, device=model_device(self.model))
        for batch in self.batches(examples):
            window_scores = score_windows(self.model, self.taps, batch, preconditioned)
            per_layer.index_add_(1, batch.examples.to(per_layer.device), window_scores)
        return Scores(per_layer.cpu(), self.layers)

    def token_scores(self, text: str, preconditioned: dict[str, torch.Tensor]) -> tuple[list[int], torch.Tensor]:
        """Token ids of one document and each token's contribution to its score: [T, Q].

        Tokens are those of the document's windows, in order (the overlap token is listed once).
        """
        ids, contributions = [], []
        windows = make_windows(Examples.documents([text]).encode(self.tokenizer), self.max_length)
        for k, window in enumerate(windows):
            batch = next(make_batches([window], 1, pad_token_id(self.tokenizer)))
            per_token = token_scores(self.model, self.taps, batch, preconditioned)[0].cpu()
            skip = 1 if k > 0 else 0  # the overlap token's position 0 contributes in this window too
            if skip:
                contributions[-1] = contributions[-1] + per_token[0]
            ids.extend(window.input_ids[skip:])
            contributions.extend(per_token[skip:])
        return ids, torch.stack(contributions)
