"""Tokenized windows, batches, and the per-example gradients that every pass is built on.

Conventions (docs/design.md, the public interface):
- a document's measurement is log p(z) summed over its tokens after the first;
- a query or fine-tuning example is prompt + completion concatenated as is and tokenized once;
  only completion tokens carry loss;
- a sequence longer than ``max_length`` is cut into windows that overlap by one token, so every
  token that carries loss is predicted exactly once; a document's gradient is the sum over its
  windows (and so is its score, which is linear in the gradient).

Per-example gradients are never formed by a Python loop over examples: for one layer and a batch,
G[b] = Σ_t s[b, t] a[b, t]ᵀ is a single batched matmul over the hooked tensors.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from msif_ray.engine.modules import LayerTaps, activation_gradients_only, check_finite_weights
from msif_ray.errors import UserError

Fisher = Literal["sampled", "empirical"]


class InputError(UserError, ValueError):
    """An example that cannot be used (e.g. a completion that produces no token)."""


class NonFiniteWindows(FloatingPointError):
    """Windows whose logits are NaN or inf although the model's weights are finite: a poisoned input
    (an overflow on these tokens), not a corrupt model. ``examples``: their example indices."""

    def __init__(self, examples: Sequence[int]):
        self.examples = sorted(set(examples))
        super().__init__(f"non-finite loss on example(s) {self.examples[:10]} of the batch, on finite weights "
                         "(an overflow on their tokens: try float32)")


@dataclass(frozen=True)
class Window:
    """At most ``max_length`` tokens of one example; ``loss_mask[i]`` = token i carries loss."""

    example: int
    input_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]


@dataclass
class Batch:
    """Right-padded windows. All tensors are [B, T] except ``examples`` [B]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    examples: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.loss_mask, self.examples)))


# --------------------------------------------------------------------------- tokenization


def encode_documents(tokenizer, texts: Sequence[str]) -> list[tuple[list[int], list[bool]]]:
    """Token ids and loss masks of whole documents: every token after the first carries loss."""
    encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    return [(ids, [False] + [True] * (len(ids) - 1)) for ids in encoded]


def encode_prompt_completions(
    tokenizer, prompts: Sequence[str], completions: Sequence[str], ids: Sequence[str] | None = None
) -> list[tuple[list[int], list[bool]]]:
    """Token ids of prompt + completion; a token carries loss if it ends inside the completion.

    Offsets of the fast tokenizer decide the boundary, so a token that straddles it (e.g. a
    merged space) counts as completion. Special tokens (offset (0, 0)) never carry loss.
    """
    texts = [p + c for p, c in zip(prompts, completions)]
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    out = []
    for k, (prompt, token_ids, offsets) in enumerate(zip(prompts, enc["input_ids"], enc["offset_mapping"])):
        mask = [end > len(prompt) and end > start for start, end in offsets]
        if not any(mask[1:]):
            name = ids[k] if ids is not None else str(k)
            raise InputError(f"example {name!r}: the completion produces no token to score (is it empty?)")
        out.append((list(token_ids), mask))
    return out


def split_windows(example: int, ids: Sequence[int], loss_mask: Sequence[bool], max_length: int) -> list[Window]:
    """Cut one tokenized example into windows of ``max_length`` tokens overlapping by one.

    The first token of a window is context only (it was predicted by the previous window), so
    each token is predicted exactly once. Windows without any loss token are dropped.
    """
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    windows, start = [], 0
    while True:
        stop = min(start + max_length, len(ids))
        mask = list(loss_mask[start:stop])
        mask[0] = False  # position 0 of a window is never predicted within it
        if any(mask):
            windows.append(Window(example, tuple(ids[start:stop]), tuple(mask)))
        if stop == len(ids):
            return windows
        start = stop - 1


def make_windows(encoded: Sequence[tuple[list[int], list[bool]]], max_length: int) -> list[Window]:
    """Windows of every encoded example; ``Window.example`` is the example's index in ``encoded``."""
    return [w for k, (ids, mask) in enumerate(encoded) for w in split_windows(k, ids, mask, max_length)]


def make_batches(windows: Sequence[Window], batch_size: int, pad_id: int, by_document: bool = False) -> Iterator[Batch]:
    """Batches of windows, longest first so that each batch pads little; ``by_document``: longest
    example first, each example's windows one after another (its last, shorter window pads more)."""
    if by_document:
        length: dict[int, int] = {}
        for w in windows:
            length[w.example] = length.get(w.example, 0) + len(w.input_ids)
        order = sorted(range(len(windows)), key=lambda i: (-length[windows[i].example], windows[i].example, i))
    else:
        order = sorted(range(len(windows)), key=lambda i: (-len(windows[i].input_ids), i))
    for lo in range(0, len(order), batch_size):
        chunk = [windows[i] for i in order[lo : lo + batch_size]]
        width = max(len(w.input_ids) for w in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        loss = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, w in enumerate(chunk):
            n = len(w.input_ids)
            input_ids[row, :n] = torch.tensor(w.input_ids)
            attention[row, :n] = 1
            loss[row, :n] = torch.tensor(w.loss_mask)
        yield Batch(input_ids, attention, loss, torch.tensor([w.example for w in chunk]))


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (padding is masked out anyway)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


# --------------------------------------------------------------------------- forward + backward


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere (docs/design.md: device-agnostic)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def log_prob_objective(
    logits: torch.Tensor, batch: Batch, fisher: Fisher = "empirical", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Σ over loss tokens of log p(target_t | tokens < t), per window: [B].

    ``empirical`` uses the data's next tokens as targets; ``sampled`` draws them from the
    model's own predictive distribution (the "true" Fisher), reproducibly from ``generator``.
    Position t predicts token t + 1; the last position predicts nothing. Logits are used as one
    [B·T, V] view: slicing off the last position or transposing would copy a logits-sized tensor
    in the forward and again in the backward, which on a 50k vocabulary costs as much as a layer.
    """
    batch_size, width, vocab = logits.shape
    flat = logits.flatten(0, 1)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))  # bf16 -> fp32; fp64 stays
    carries_loss = F.pad(batch.loss_mask[:, 1:], (0, 1), value=False)
    if fisher == "sampled":
        with torch.no_grad():  # inverse-CDF sampling: one cumsum and one search, cheaper than multinomial
            cdf = torch.softmax(flat.detach(), dim=-1).cumsum_(-1)
            u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
            targets = torch.searchsorted(cdf, u).clamp_(max=vocab - 1).view(batch_size, width)
    else:
        targets = F.pad(batch.input_ids[:, 1:], (0, 1), value=0)
    targets = targets.masked_fill(~carries_loss, -100)
    token_log_probs = -F.cross_entropy(flat, targets.reshape(-1), reduction="none", ignore_index=-100)
    return token_log_probs.view(batch_size, width).sum(dim=1)


def backward_through_layers(
    model: nn.Module,
    taps: LayerTaps,
    batch: Batch,
    callback: Callable[[str, torch.Tensor, torch.Tensor], None],
    fisher: Fisher = "empirical",
    generator: torch.Generator | None = None,
    layers: Sequence[str] | None = None,
) -> torch.Tensor:
    """One forward and backward of Σ_windows log p; ``callback(name, a, s)`` sees every tracked
    layer (or those of ``layers``, a layer group).

    Parameter gradients are not computed (see ``activation_gradients_only``). Returns the
    per-window objective [B] (detached).
    """
    device = model_device(model)
    batch = batch.to(device)
    with activation_gradients_only(model), taps.tapping(batch.attention_mask, callback, layers):
        logits = forward_logits(model, batch)
        check_finite_logits(model, logits, batch)
        objective = log_prob_objective(logits, batch, fisher, generator)
        objective.sum().backward()
    return objective.detach()


def non_finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[B] bool: the windows whose logits [B, T, V] hold NaN or inf (one reduction per window: NaN or
    inf anywhere makes its sum non-finite)."""
    return ~torch.isfinite(logits.detach().sum(dim=(1, 2)))


def check_finite_logits(model: nn.Module, logits: torch.Tensor, batch: Batch) -> None:
    """Raise ``NonFiniteWeightsError`` for a corrupt model, ``NonFiniteWindows`` naming the examples of
    the windows whose logits are non-finite on finite weights; nothing when all are finite."""
    bad = non_finite_rows(logits)
    if bad.any():
        check_finite_weights(model)
        raise NonFiniteWindows(batch.examples[bad.cpu()].tolist())


def poisoned_examples(model: nn.Module, batches: Iterable[Batch]) -> list[int]:
    """The examples with a window whose logits are non-finite: one forward per batch, no backward
    (a third of a pass), to find every poisoned example of a shard at once after the first."""
    device = model_device(model)
    found: set[int] = set()
    with torch.no_grad():
        for batch in batches:
            logits = forward_logits(model, batch.to(device))
            found.update(batch.examples[non_finite_rows(logits).cpu()].tolist())
    return sorted(found)


def forward_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's logits [B, T, V] on ``batch`` (on the model's device), under the device's autocast."""
    with autocast_for(batch.input_ids.device):
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def per_example_gradient(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """G[b] = Σ_t s[b, t] a[b, t]ᵀ: [B, T, out] x [B, T, in] -> [B, out, in]."""
    return torch.bmm(s.transpose(1, 2), a)


def window_gradients(model: nn.Module, taps: LayerTaps, batch: Batch) -> dict[str, torch.Tensor]:
    """Per-window gradients of log p for each tracked layer: name -> [B, out, in(+1)]."""
    grads: dict[str, torch.Tensor] = {}

    def keep(name: str, a: torch.Tensor, s: torch.Tensor) -> None:
        grads[name] = per_example_gradient(a, s)

    backward_through_layers(model, taps, batch, keep)
    return {name: grads[name] for name in taps.modules}


def example_gradients(
    model: nn.Module, taps: LayerTaps, batches: Iterable[Batch], num_examples: int
) -> dict[str, torch.Tensor]:
    """Per-example gradients (windows summed): name -> [num_examples, out, in(+1)], on the model's device."""
    device = model_device(model)
    totals: dict[str, torch.Tensor] = {}
    for batch in batches:
        index = batch.examples.to(device)
        for name, grad in window_gradients(model, taps, batch).items():
            if name not in totals:
                totals[name] = grad.new_zeros((num_examples,) + grad.shape[1:])
            totals[name].index_add_(0, index, grad)
    for name, grad in totals.items():
        if not torch.isfinite(grad).all():
            raise FloatingPointError(f"non-finite gradient in layer {name!r}: check the model weights and inputs")
    return totals
