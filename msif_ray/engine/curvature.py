"""EK-FAC curvature: covariance factors, eigenbases, eigenvalue corrections and the damped inverse.

Per tracked layer, with augmented inputs a_t [in] and output gradients s_t [out]:

    A = Σ_t a_t a_tᵀ / N_tokens            S = Σ_t s_t s_tᵀ / N_tokens
    A = Q_A diag(d_A) Q_Aᵀ                  S = Q_S diag(d_S) Q_Sᵀ          (float64 eigh)
    Λ = Σ_windows (Q_Sᵀ G Q_A)² / N_windows G = Σ_t s_t a_tᵀ  [out, in]
    (H + λI)⁻¹ V = Q_S [ (Q_Sᵀ V Q_A) ⊘ (Λ + λ) ] Q_Aᵀ

H is the Fisher of Σ log p over a window (labels sampled from the model, or the data's labels for
the empirical Fisher). Only the eigenvectors of A and S enter the inverse, so their token
normalisation does not matter; Λ carries the scale. A window of a long document counts as one
example when fitting curvature.

Partial sums are plain tensors that add up: this is what the distributed map-reduce ships
through storage (``CovarianceSums`` and ``LambdaSums`` ``.to_tensors()`` / ``.from_tensors()``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from msif_ray.engine.gradients import Batch, Fisher, backward_through_layers, model_device, per_example_gradient
from msif_ray.engine.modules import LayerTaps

Damping = float | str  # a positive float (absolute), "auto" or "auto:<m>" (relative: see relative_damping)
AUTO_DAMPING_SCALE = 0.1  # auto damping = 0.1 x mean of Λ in the layer (kronfluence's heuristic)


def relative_damping(damping: Damping) -> float | None:
    """The multiplier m of a relative damping, λ = m x the layer's mean Λ: ``auto`` is m = 0.1
    (``AUTO_DAMPING_SCALE``), ``auto:<m>`` any positive m (``auto:0.01``); None for a float (absolute)."""
    if not isinstance(damping, str):
        return None
    if damping == "auto":
        return AUTO_DAMPING_SCALE
    head, _, tail = damping.partition(":")
    try:
        m = float(tail) if head == "auto" else math.nan
    except ValueError:
        m = math.nan
    if not (math.isfinite(m) and m > 0):
        raise ValueError(f"damping {damping!r}: expected a positive number, auto, or auto:<m> with m > 0 (auto:0.01)")
    return m


def batch_generator(device: torch.device, seed: int, batch_index: int) -> torch.Generator:
    """The generator that samples Fisher labels for one batch: fixed by (seed, batch index)."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + batch_index) % 2**63)


def check_finite(name: str, tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(
            f"non-finite {what} in layer {name!r}: the model produced NaN/inf activations or gradients "
            "(check its weights and dtype)"
        )


def _sum_by_name(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Layer-wise sum of two partial results (a layer missing from one side counts as zero)."""
    return {n: x[n] + y[n] if n in x and n in y else (x[n] if n in x else y[n]).clone() for n in x.keys() | y.keys()}


# --------------------------------------------------------------------------- pass 1: covariances


@dataclass
class CovarianceSums:
    """Σ_t a aᵀ [in, in] and Σ_t s sᵀ [out, out] per layer, over ``num_tokens`` real tokens."""

    activation: dict[str, torch.Tensor] = field(default_factory=dict)
    gradient: dict[str, torch.Tensor] = field(default_factory=dict)
    num_tokens: int = 0
    num_windows: int = 0

    def add_layer(self, name: str, a: torch.Tensor, s: torch.Tensor) -> None:
        """Add one batch of one layer: a [B, T, in] (zero on padding), s [B, T, out]."""
        a2, s2 = a.flatten(0, 1), s.flatten(0, 1)
        for sums, x in ((self.activation, a2), (self.gradient, s2)):
            if name in sums:
                sums[name].addmm_(x.t(), x)
            else:
                sums[name] = x.t() @ x

    def merge(self, other: "CovarianceSums") -> "CovarianceSums":
        """Sum of two partials (the reduce step)."""
        return CovarianceSums(
            _sum_by_name(self.activation, other.activation),
            _sum_by_name(self.gradient, other.gradient),
            self.num_tokens + other.num_tokens,
            self.num_windows + other.num_windows,
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"{n}/A": t for n, t in self.activation.items()} | {f"{n}/S": t for n, t in self.gradient.items()}
        tensors["num_tokens"] = torch.tensor(self.num_tokens, dtype=torch.int64)
        tensors["num_windows"] = torch.tensor(self.num_windows, dtype=torch.int64)
        return {k: v.contiguous().cpu() for k, v in tensors.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "CovarianceSums":
        return cls(
            activation={k[:-2]: v for k, v in tensors.items() if k.endswith("/A")},
            gradient={k[:-2]: v for k, v in tensors.items() if k.endswith("/S")},
            num_tokens=int(tensors["num_tokens"]),
            num_windows=int(tensors["num_windows"]),
        )


def backward_over_batches(
    model: nn.Module, taps: LayerTaps, batches: Iterable[Batch], add_layer: Callable[[str, torch.Tensor, torch.Tensor], None],
    fisher: Fisher, seed: int, layers: Sequence[str] | None = None,
) -> tuple[int, int]:
    """One forward+backward per batch, each layer's (a, s) handed to ``add_layer``.

    Sampled Fisher labels come from a generator fixed by (seed, batch index), so a shard gives
    the same sums on any worker, and every layer group of a pass sees the same labels.
    ``layers`` restricts the pass to a layer group. Returns the number of (real) tokens and of
    windows seen.
    """
    device = model_device(model)
    tokens = windows = 0
    for index, batch in enumerate(batches):
        generator = batch_generator(device, seed, index) if fisher == "sampled" else None
        backward_through_layers(model, taps, batch, add_layer, fisher, generator, layers)
        tokens += batch.num_tokens
        windows += len(batch.examples)
    return tokens, windows


def accumulate_covariances(
    model: nn.Module, taps: LayerTaps, batches: Iterable[Batch], fisher: Fisher = "sampled", seed: int = 0,
    layers: Sequence[str] | None = None, sums: CovarianceSums | None = None,
) -> CovarianceSums:
    """Map step of pass 1 over ``batches`` (for the layer group ``layers``, default all), added
    in place into ``sums`` when given (a worker's running sum: no second copy of the factors)."""
    sums = sums if sums is not None else CovarianceSums()
    tokens, windows = backward_over_batches(model, taps, batches, sums.add_layer, fisher, seed, layers)
    sums.num_tokens += tokens
    sums.num_windows += windows
    return sums


# --------------------------------------------------------------------------- eigendecomposition


@dataclass
class Eigenbasis:
    """Eigenvectors of A [in, in] and S [out, out], columns sorted by ascending eigenvalue."""

    a_vectors: torch.Tensor
    s_vectors: torch.Tensor
    a_values: torch.Tensor
    s_values: torch.Tensor


def symmetric_eigh(total: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of total / count in float64, returned in total's dtype."""
    matrix = total.double() / max(count, 1)
    matrix = 0.5 * (matrix + matrix.t())
    values, vectors = torch.linalg.eigh(matrix)
    return values.to(total.dtype), vectors.to(total.dtype).contiguous()


def eigendecompose_layer(name: str, sums: CovarianceSums) -> Eigenbasis:
    """One layer's eigenbasis (the unit of the Ray fan-out)."""
    a, s = sums.activation[name], sums.gradient[name]
    check_finite(name, a, "activation covariance")
    check_finite(name, s, "gradient covariance")
    a_values, a_vectors = symmetric_eigh(a, sums.num_tokens)
    s_values, s_vectors = symmetric_eigh(s, sums.num_tokens)
    return Eigenbasis(a_vectors, s_vectors, a_values, s_values)


# --------------------------------------------------------------------------- pass 2: eigenvalue correction


@dataclass
class LambdaSums:
    """Σ_windows (Q_Sᵀ G Q_A)² per layer [out, in]."""

    squares: dict[str, torch.Tensor] = field(default_factory=dict)
    num_windows: int = 0

    def merge(self, other: "LambdaSums") -> "LambdaSums":
        return LambdaSums(_sum_by_name(self.squares, other.squares), self.num_windows + other.num_windows)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"{n}/lambda": t.contiguous().cpu() for n, t in self.squares.items()}
        tensors["num_windows"] = torch.tensor(self.num_windows, dtype=torch.int64)
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "LambdaSums":
        squares = {k[: -len("/lambda")]: v for k, v in tensors.items() if k.endswith("/lambda")}
        return cls(squares, int(tensors["num_windows"]))


def rotated_square_sum(a: torch.Tensor, s: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor) -> torch.Tensor:
    """Σ_b (Q_Sᵀ G_b Q_A)² for one batch: a [B, T, in], s [B, T, out] -> [out, in].

    a and s are rotated into the eigenbases before G is formed: T·(in² + out²) FLOPs per window
    instead of out·in·(out + in).
    """
    return per_example_gradient(a @ q_a.to(a.dtype), s @ q_s.to(s.dtype)).square_().sum(dim=0)


def accumulate_lambdas(
    model: nn.Module, taps: LayerTaps, batches: Iterable[Batch], bases: dict[str, Eigenbasis],
    fisher: Fisher = "sampled", seed: int = 0, sums: LambdaSums | None = None,
) -> LambdaSums:
    """Map step of pass 2 over ``batches``, given the eigenbases of pass 1 (of the layers to cover),
    added in place into ``sums`` when given."""
    device = model_device(model)
    on_device = {n: (b.a_vectors.to(device), b.s_vectors.to(device)) for n, b in bases.items()}
    sums = sums if sums is not None else LambdaSums()

    def add_layer(name: str, a: torch.Tensor, s: torch.Tensor) -> None:
        square_sum = rotated_square_sum(a, s, *on_device[name])
        if name in sums.squares:
            sums.squares[name] += square_sum
        else:
            sums.squares[name] = square_sum

    # A seed stream apart from pass 1's, so that pass 2 draws fresh labels.
    _, windows = backward_over_batches(model, taps, batches, add_layer, fisher, seed + 7919, list(bases))
    sums.num_windows += windows
    return sums


# --------------------------------------------------------------------------- the fitted factors


@dataclass
class LayerFactors:
    """What the damped inverse of one layer needs: Q_A [in, in], Q_S [out, out], Λ [out, in]."""

    a_vectors: torch.Tensor
    s_vectors: torch.Tensor
    lambdas: torch.Tensor

    def damping(self, damping: Damping) -> float:
        """λ for this layer: a float, or m x mean(Λ) for ``auto`` (m = 0.1) and ``auto:<m>``."""
        m = relative_damping(damping)
        return float(damping) if m is None else m * float(self.lambdas.double().mean())

    def inverse_apply(self, v: torch.Tensor, damping: float) -> torch.Tensor:
        """(H + λI)⁻¹ v for a stack of matrices v [Q, out, in]."""
        dtype = torch.promote_types(v.dtype, self.lambdas.dtype)
        q_a, q_s, lam = (t.to(device=v.device, dtype=dtype) for t in (self.a_vectors, self.s_vectors, self.lambdas))
        rotated = q_s.t() @ v.to(dtype) @ q_a
        return q_s @ (rotated / (lam + damping)) @ q_a.t()


@dataclass
class Factors:
    """EK-FAC factors of one model on one dataset, per tracked layer, with their provenance."""

    layers: dict[str, LayerFactors]
    metadata: dict[str, str] = field(default_factory=dict)

    def layer(self, name: str) -> LayerFactors:
        if name not in self.layers:
            raise KeyError(f"factors have no layer {name!r}; they were fitted for {sorted(self.layers)[:5]}...")
        return self.layers[name]

    def dampings(self, damping: Damping) -> dict[str, float]:
        return {name: f.damping(damping) for name, f in self.layers.items()}

    def inverse_apply(self, grads: dict[str, torch.Tensor], damping: Damping) -> dict[str, torch.Tensor]:
        """(H + λI)⁻¹ applied layer by layer to name -> [Q, out, in]."""
        missing = grads.keys() - self.layers.keys()
        if missing:
            raise KeyError(f"factors have no layer {sorted(missing)[0]!r}; they were fitted for {sorted(self.layers)[:5]}...")
        return {name: self.layers[name].inverse_apply(v, self.layers[name].damping(damping)) for name, v in grads.items()}

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {}
        for name, f in self.layers.items():
            tensors |= {f"{name}/Q_A": f.a_vectors, f"{name}/Q_S": f.s_vectors, f"{name}/lambda": f.lambdas}
        return {k: v.contiguous().cpu() for k, v in tensors.items()}, dict(self.metadata, layers=json.dumps(list(self.layers)))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> "Factors":
        names = json.loads(metadata["layers"])
        layers = {n: LayerFactors(tensors[f"{n}/Q_A"], tensors[f"{n}/Q_S"], tensors[f"{n}/lambda"]) for n in names}
        return cls(layers, {k: v for k, v in metadata.items() if k != "layers"})

    def save(self, path: str) -> None:
        """Save as safetensors (local path); the pipeline uses storage.RunDir for remote paths."""
        from safetensors.torch import save_file

        tensors, metadata = self.to_tensors()
        save_file(tensors, path, metadata=metadata)

    @classmethod
    def load(cls, path: str) -> "Factors":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return cls.from_tensors({k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {})


def finish_factors(bases: dict[str, Eigenbasis], lambdas: LambdaSums, metadata: dict[str, str]) -> Factors:
    """Combine eigenbases and Λ sums (divided by the number of windows) into Factors."""
    layers = {}
    for name, basis in bases.items():
        lam = lambdas.squares[name] / max(lambdas.num_windows, 1)
        check_finite(name, lam, "eigenvalue correction")
        layers[name] = LayerFactors(basis.a_vectors, basis.s_vectors, lam.to(basis.a_vectors.dtype))
    return Factors(layers, dict(metadata, num_windows=str(lambdas.num_windows)))


def fit_factors(
    model: nn.Module, taps: LayerTaps, batches: Callable[[], Iterable[Batch]], fisher: Fisher = "sampled",
    seed: int = 0, metadata: dict[str, str] | None = None,
) -> Factors:
    """Both passes in one process. ``batches()`` must yield the same batches each time it is called."""
    covariances = accumulate_covariances(model, taps, batches(), fisher, seed)
    bases = {name: eigendecompose_layer(name, covariances) for name in taps.modules}
    lambdas = accumulate_lambdas(model, taps, batches(), bases, fisher, seed)
    meta = dict(metadata or {}, fisher=fisher, num_tokens=str(covariances.num_tokens))
    return finish_factors(bases, lambdas, meta)
