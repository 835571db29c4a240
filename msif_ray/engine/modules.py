"""Which layers are tracked, and the hooks that capture their per-token inputs and output gradients.

Every tracked layer is a linear map y_t = W a_t + b. Folding the bias into W as an extra input
column, the layer sees the augmented input a_t = [x_t, 1] of size ``in_features (+1)`` and its
per-example gradient is G = Σ_t s_t a_tᵀ, with s_t = ∂f/∂y_t, shape [out, in(+1)].
GPT-2's ``Conv1D`` (y = x W + b with W stored as [in, out]) is the same linear map.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from msif_ray.errors import UserError

try:  # transformers' GPT-2 Conv1D moved between releases
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    from transformers.modeling_utils import Conv1D  # type: ignore[no-redef]

TRACKABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


class ModuleSelectionError(UserError, ValueError):
    """The module selection (include/exclude regexes) does not fit the model."""


@dataclass(frozen=True)
class LayerSpec:
    """Shape of one tracked layer as a linear map: ``out_features x in_features`` (+1 with bias)."""

    name: str
    in_features: int
    out_features: int
    has_bias: bool

    @property
    def in_dim(self) -> int:
        """Input size including the folded bias column."""
        return self.in_features + int(self.has_bias)


def layer_spec(name: str, module: nn.Module) -> LayerSpec:
    """Describe ``module`` (nn.Linear or Conv1D) as a linear map."""
    if isinstance(module, nn.Linear):
        return LayerSpec(name, module.in_features, module.out_features, module.bias is not None)
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return LayerSpec(name, in_features, out_features, module.bias is not None)
    raise TypeError(f"module {name!r} is a {type(module).__name__}, not nn.Linear or Conv1D")


def weight_gradient(module: nn.Module) -> torch.Tensor:
    """The autograd gradient of ``module`` in our [out, in(+1)] convention (used by tests)."""
    grad = module.weight.grad
    if isinstance(module, Conv1D):
        grad = grad.t()
    if module.bias is not None:
        grad = torch.cat([grad, module.bias.grad[:, None]], dim=1)
    return grad


def transformer_blocks_prefix(model: nn.Module) -> str:
    """Name of the model's stack of transformer blocks: its largest ``nn.ModuleList``.

    That is ``gpt_neox.layers`` for GPT-NeoX, ``model.layers`` for Llama, ``transformer.h`` for
    GPT-2; embeddings and the LM head sit outside it and are not tracked by default.
    """
    lists = [(len(m), name) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ModuleSelectionError(
            f"{type(model).__name__} has no nn.ModuleList of transformer blocks; "
            "name the layers to track with modules.include"
        )
    return max(lists)[1]


def select_modules(
    model: nn.Module, include: str | None = None, exclude: str | None = None
) -> dict[str, nn.Module]:
    """The tracked layers, in model order: name -> module.

    Default: every nn.Linear / Conv1D inside the transformer blocks. ``include`` replaces that
    default by the trackable layers whose full name matches the regex (``re.search``);
    ``exclude`` then drops the names it matches.
    """
    candidates = {n: m for n, m in model.named_modules() if isinstance(m, TRACKABLE_TYPES)}
    if not candidates:
        raise ModuleSelectionError(f"{type(model).__name__} has no nn.Linear or Conv1D layer to track")
    if include is None:
        prefix = transformer_blocks_prefix(model) + "."
        selected = {n: m for n, m in candidates.items() if n.startswith(prefix)}
    else:
        pattern = re.compile(include)
        selected = {n: m for n, m in candidates.items() if pattern.search(n)}
        if not selected:
            raise ModuleSelectionError(
                f"modules.include {include!r} matches no trackable layer; candidates are: "
                + ", ".join(_abbreviate(list(candidates)))
            )
    if exclude is not None:
        pattern = re.compile(exclude)
        selected = {n: m for n, m in selected.items() if not pattern.search(n)}
    if not selected:
        raise ModuleSelectionError(
            f"no layer left to track after modules.exclude {exclude!r}; candidates are: "
            + ", ".join(_abbreviate(list(candidates)))
        )
    return selected


def _abbreviate(names: list[str], limit: int = 40) -> list[str]:
    return names if len(names) <= limit else names[:limit] + [f"... ({len(names) - limit} more)"]


class NonFiniteWeightsError(UserError, FloatingPointError):
    """A checkpoint whose weights hold NaN or inf: bad input, not a numerical bug of the engine."""


def check_finite_weights(model: nn.Module) -> None:
    """Raise NonFiniteWeightsError naming the first module whose parameters hold NaN or inf."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            module, _, kind = name.rpartition(".")
            raise NonFiniteWeightsError(f"non-finite {kind} in layer {module!r} of the model: the checkpoint is corrupt")


# Called once per tracked layer during backward with the augmented inputs a [B, T, in(+1)] and the
# output gradients s [B, T, out], both float32 (float64 when the model is float64).
LayerCallback = Callable[[str, torch.Tensor, torch.Tensor], None]


class LayerTaps:
    """Forward/backward hooks on the tracked layers (in the spirit of kronfluence's TrackedModule).

    During a forward pass inside :meth:`tapping`, each layer stores its augmented input a_t,
    zeroed on padding tokens; when the backward pass reaches the layer's output, the callback
    receives (name, a, s). Nothing is kept after the callback returns.
    """

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.specs = {name: layer_spec(name, m) for name, m in modules.items()}
        self._token_mask: torch.Tensor | None = None
        self._callback: LayerCallback | None = None

    @contextmanager
    def tapping(self, token_mask: torch.Tensor, callback: LayerCallback, layers: Sequence[str] | None = None) -> Iterator[None]:
        """Hooks active for one forward+backward; ``token_mask`` [B, T] is 1 on real tokens.

        ``layers`` restricts the hooks to a subset of the tracked layers (a layer group).
        """
        self._token_mask = token_mask
        self._callback = callback
        names = self.modules if layers is None else layers
        handles = [self.modules[name].register_forward_hook(self._forward_hook(name)) for name in names]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._token_mask = self._callback = None

    def _forward_hook(self, name: str):
        has_bias = self.specs[name].has_bias

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            x = inputs[0].detach()
            dtype = torch.promote_types(x.dtype, torch.float32)
            mask = self._token_mask.to(device=x.device, dtype=dtype).unsqueeze(-1)
            a = x.to(dtype)
            if has_bias:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            a = a * mask
            callback = self._callback
            output.register_hook(lambda s: callback(name, a, s.detach().to(dtype)))

        return hook


@contextmanager
def activation_gradients_only(model: nn.Module) -> Iterator[None]:
    """Backward computes the gradients of activations but not of parameters.

    Per-example gradients come from the hooks, so autograd's summed weight gradients would be
    wasted FLOPs. Parameters are frozen and the input embeddings are made the leaf that
    requires grad, so every layer's output still receives its gradient s_t.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    handle = model.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: output.requires_grad_(True)
    )
    try:
        yield
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
