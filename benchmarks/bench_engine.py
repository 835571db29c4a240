"""Throughput of msif's engine passes against a bare training step, their FLOP bounds and kronfluence.

    python benchmarks/bench_engine.py [--quick] [--out results.json] [--threads 1] [--clock cpu|wall]
                                      [--profile score,lambda]

Model: a randomly initialised GPT-NeoX shaped like Pythia-70m (hidden 512, 6 layers, 8 heads,
intermediate 2048, vocab 50304, rotary_pct 0.25, untied LM head), built from its config (no
download), float32 on CPU. ``--quick`` swaps in a tiny model and one small batch (a smoke run).

Data: the same ``--batches`` batches of ``--batch-size`` x ``--seq-len`` random tokens for every
pass, no padding; documents carry loss on every token after the first, the ``--queries`` queries
(random tokens too) on their second half.

Passes (all timed over the same batches, interleaved in ``--rounds`` rounds after one warm-up
batch of each; the reported time of a pass is its best round, the median is in the JSON):

  bare        forward + backward of Σ log p with parameter gradients on (a training step
              without optimizer; gradients set to None before each batch); Σ log p written as
              Hugging Face's causal-LM loss is (flattened logits, labels shifted and padded)
  bare/msif-obj  the same step with msif's gradients.log_prob_objective (information: what the
              objective itself costs; not a target)
  cov/emp     curvature.accumulate_covariances, empirical Fisher      (msif pass 1)
  cov/sampled curvature.accumulate_covariances, sampled Fisher        (msif pass 1, default)
  lambda      curvature.accumulate_lambdas, empirical Fisher          (msif pass 2)
  score       scoring.score_windows against Q preconditioned dense (full-rank) queries (single_stage)

and kronfluence 1.0.1 doing the same work on a deep copy of the same model, same batches, float32,
same thread count: covariance fit (empirical and sampled Fisher), Λ fit (empirical) and pairwise
scores against the same Q queries. Kronfluence is timed around its pass functions
(``fit_covariance_matrices_with_loader``, ``fit_lambda_matrices_with_loader``, and for scores
``compute_pairwise_scores_with_loaders`` from the first training-batch fetch to its return, which
leaves out its query-gradient stage exactly as msif's ``precondition`` is left out), i.e. without
the Analyzer's writing of factors to disk. Its task is written like kronfluence's own LM examples.

Clock: by default this process's CPU time (``time.process_time``). With one torch thread it is the
pass's compute time, far less disturbed than the wall clock when other jobs share the machine;
use ``--clock wall`` with ``--threads`` > 1. Whole-call wall times are kept in the JSON too.

FLOP counting (analytic, multiply-add = 2 FLOPs; per batch of B sequences of T tokens, t = B·T):

  N       = Σ in·out over the matmul weights: every tracked block Linear plus the LM head
            (embedding lookups, layer norms, softmax, GELU, rotary and the loss are elementwise
            and not counted: < 0.5% of the FLOPs, though a few % of the bare pass's time)
  attn    = 4·B·T²·d·layers  forward QKᵀ and AV, counted as full T x T products
  bare    = 6·N·t + 3·attn   forward 2Nt + attn; backward: activation grads 2Nt + 2·attn,
                             weight grads 2Nt
  frozen  = bare − 2·N·t     every msif pass (and kronfluence's) freezes the parameters
                             (modules.activation_gradients_only): no weight-gradient matmuls
  cov     extra Σ_layers t·2·(in² + out²)                   A = Σ a aᵀ and S = Σ s sᵀ
  lambda  extra Σ_layers t·2·(in² + out²)                   rotations a·Q_A and s·Q_S
                + Σ_layers t·2·in·out + 2·B·in·out          per-example G, its square and sum
  score   extra Σ_layers t·2·in·out + B·Q·2·in·out          per-example G, then G·Ṽᵀ

  (in includes the folded bias column.) A pass's FLOP bound is bare_time x pass_FLOPs / bare_FLOPs
  with pass_FLOPs = frozen + extra: the time the pass would take at the bare pass's FLOP rate.
  The JSON also holds the literal "(bare + extra) / bare" bound, which does not credit the
  skipped weight gradients and is therefore looser.

Targets (issue): every pass within 1.2x of its FLOP bound; scoring within 1.3x of the bare pass;
every pass faster than kronfluence's.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from msif_ray.engine.curvature import accumulate_covariances, accumulate_lambdas, eigendecompose_layer, finish_factors
from msif_ray.engine.gradients import Batch, example_gradients, log_prob_objective
from msif_ray.engine.vectors import QueryVectors
from msif_ray.engine.influence import precondition
from msif_ray.engine.scoring import QueryGroup, score_windows
from msif_ray.engine.modules import LayerTaps, select_modules

_CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
_clock = ["cpu"]


def now() -> float:
    """The benchmark's clock: this process's CPU time (default) or wall-clock time (``--clock wall``)."""
    return _CLOCKS[_clock[0]]()


PYTHIA_70M = dict(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                  intermediate_size=2048, max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True,
                  tie_word_embeddings=False)
QUICK = dict(vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
             max_position_embeddings=256, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)


# --------------------------------------------------------------------------- setup


def build_model(config: dict, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(GPTNeoXConfig(**config)).float().eval()


def random_batches(num: int, batch_size: int, seq_len: int, vocab: int, seed: int, completion_only: bool = False) -> list[Batch]:
    """Unpadded batches of random tokens; loss on every token after the first (or on the second half)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
        loss = torch.ones_like(ids, dtype=torch.bool)
        loss[:, : (seq_len // 2 if completion_only else 1)] = False
        out.append(Batch(ids, torch.ones_like(ids), loss, torch.arange(batch_size)))
    return out


# --------------------------------------------------------------------------- FLOPs


def flop_counts(model, taps: LayerTaps, config: dict, batch_size: int, seq_len: int, num_queries: int) -> dict[str, float]:
    """Analytic FLOPs per batch (see the module docstring)."""
    t = batch_size * seq_len
    specs = list(taps.specs.values())
    head = model.get_output_embeddings()
    n_matmul = sum(s.in_features * s.out_features for s in specs) + head.in_features * head.out_features
    attn = 4 * batch_size * seq_len**2 * config["hidden_size"] * config["num_hidden_layers"]
    bare = 6 * n_matmul * t + 3 * attn
    weight_grads = 2 * n_matmul * t
    frozen = bare - weight_grads
    per_example_g = sum(t * 2 * s.in_dim * s.out_features for s in specs)
    cov = sum(t * 2 * (s.in_dim**2 + s.out_features**2) for s in specs)
    lam = cov + per_example_g + sum(2 * batch_size * s.in_dim * s.out_features for s in specs)
    score = per_example_g + sum(batch_size * num_queries * 2 * s.in_dim * s.out_features for s in specs)
    return dict(n_matmul_params=n_matmul, tokens=t, bare=bare, weight_grads=weight_grads, frozen=frozen,
                attention=3 * attn, extra_cov=cov, extra_lambda=lam, extra_score=score)


# --------------------------------------------------------------------------- kronfluence side


class KronfluenceSide:
    """kronfluence on its own deep copy of the model; batches as a map-style dataset of dicts."""

    def __init__(self, model, taps: LayerTaps, batches: list[Batch], queries: list[Batch], out_dir: Path):
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task

        tracked = list(taps.modules)

        class CausalLM(Task):
            def compute_train_loss(self, batch, model, sample=False):
                return _summed_nll(batch, model, sample)

            def compute_measurement(self, batch, model):
                return _summed_nll(batch, model, False)

            def get_influence_tracked_modules(self):
                return tracked

            def get_attention_mask(self, batch):
                return batch["attention_mask"]

        self.task = CausalLM()
        self.model = prepare_model(copy.deepcopy(model), self.task)
        self.analyzer = Analyzer("bench", self.model, self.task, cpu=True, disable_tqdm=True,
                                 log_level=logging.WARNING, output_dir=str(out_dir))
        self.state = self.analyzer.state
        self.batch_size = len(batches[0].examples)
        self.train = TimedRows(batches)
        self.queries = TimedRows(queries)
        self.factor_args = {
            fisher: FactorArguments(strategy="ekfac", use_empirical_fisher=fisher == "empirical")
            for fisher in ("empirical", "sampled")
        }
        self.score_args = ScoreArguments(damping_factor=None)  # kronfluence's heuristic, as msif's "auto"
        self.eigen = None
        self.lambdas = None

    def loader(self, rows: "TimedRows", batch_size: int | None = None):
        return torch.utils.data.DataLoader(rows, batch_size=batch_size or self.batch_size, shuffle=False, num_workers=0)

    def covariances(self, fisher: str, rows: "TimedRows | None" = None):
        from kronfluence.factor.covariance import fit_covariance_matrices_with_loader

        _, factors = fit_covariance_matrices_with_loader(
            self.model, self.state, self.task, self.loader(rows or self.train), self.factor_args[fisher], disable_tqdm=True)
        return factors

    def fit_eigen(self) -> None:
        from kronfluence.factor.eigen import perform_eigendecomposition

        cov = self.covariances("empirical")
        self.eigen = perform_eigendecomposition(cov, self.model, self.state, self.factor_args["empirical"], disable_tqdm=True)

    def lambda_pass(self, rows: "TimedRows | None" = None):
        from kronfluence.factor.eigen import fit_lambda_matrices_with_loader

        _, factors = fit_lambda_matrices_with_loader(
            self.model, self.state, self.task, self.loader(rows or self.train), self.factor_args["empirical"],
            eigen_factors=self.eigen, disable_tqdm=True)
        return factors

    def score(self, rows: "TimedRows | None" = None) -> tuple[torch.Tensor, float]:
        """Pairwise scores [Q, N] and the seconds from the first training-batch fetch to the return."""
        from kronfluence.score.pairwise import compute_pairwise_scores_with_loaders

        rows = rows or self.train
        if self.lambdas is None:
            self.lambdas = self.lambda_pass()
        loaded = dict(self.eigen) | dict(self.lambdas)
        rows.first_fetch = None
        scores = compute_pairwise_scores_with_loaders(
            loaded_factors=loaded, model=self.model, state=self.state, task=self.task,
            query_loader=self.loader(self.queries, len(self.queries)), per_device_query_batch_size=len(self.queries),
            train_loader=self.loader(rows), score_args=self.score_args, factor_args=self.factor_args["empirical"],
            tracked_module_names=None, disable_tqdm=True)
        return scores["all_modules"], now() - rows.first_fetch


class TimedRows(torch.utils.data.Dataset):
    """Rows of msif batches as dicts (labels −100 where msif carries no loss); notes its first fetch."""

    def __init__(self, batches: list[Batch]):
        self.input_ids = torch.cat([b.input_ids for b in batches])
        self.attention_mask = torch.cat([b.attention_mask for b in batches])
        self.labels = torch.where(torch.cat([b.loss_mask for b in batches]), self.input_ids, -100)
        self.first_fetch: float | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.first_fetch is None:
            self.first_fetch = now()
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}

    def subset(self, n_rows: int) -> "TimedRows":
        sub = copy.copy(self)
        sub.input_ids, sub.attention_mask, sub.labels = self.input_ids[:n_rows], self.attention_mask[:n_rows], self.labels[:n_rows]
        sub.first_fetch = None
        return sub


def _summed_nll(batch, model, sample: bool) -> torch.Tensor:
    """Σ −log p over label tokens, written like kronfluence's own language-model examples
    (shifted logits made contiguous and flattened; sampled labels from ``torch.multinomial``)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[..., :-1, :].contiguous().view(-1, logits.size(-1))
    labels = batch["labels"][..., 1:].contiguous().view(-1)
    if sample:
        with torch.no_grad():
            drawn = torch.multinomial(torch.softmax(shift_logits.detach(), -1), num_samples=1).flatten()
        labels = torch.where(labels == -100, labels, drawn)
    return F.cross_entropy(shift_logits, labels, ignore_index=-100, reduction="sum")


# --------------------------------------------------------------------------- the msif passes


def summed_log_prob(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Σ log p over loss tokens, written as Hugging Face's own causal-LM loss is (ForCausalLMLoss):
    labels shifted left and padded with -100, cross-entropy over the flattened [B·T, V] logits (a view)."""
    labels = torch.where(batch.loss_mask, batch.input_ids, -100)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    return -F.cross_entropy(logits.flatten(0, 1).float(), shifted.reshape(-1), ignore_index=-100, reduction="sum")


def bare_pass(model, batches: list[Batch], objective: str = "hf") -> None:
    """A training step without optimizer: parameter gradients on, Σ log p, backward.

    ``objective="hf"`` (the reference) computes Σ log p the way HF's causal-LM loss does;
    ``"msif"`` uses msif's ``gradients.log_prob_objective`` instead (informational row).
    """
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            if objective == "hf":
                summed_log_prob(logits, batch).backward()
            else:
                log_prob_objective(logits, batch, "empirical").sum().backward()
        model.zero_grad(set_to_none=True)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@dataclass
class Pass:
    name: str
    run: Callable[[list[Batch]], float | None]  # returns its own measured seconds, or None for wall clock
    extra_flops: str | None  # key in flop_counts, None for the bare pass and kronfluence
    kronfluence_of: str | None = None


def discard(fn: Callable[[list[Batch]], object]) -> Callable[[list[Batch]], None]:
    """Run ``fn`` for its cost only (wall clock timing)."""
    def run(bs: list[Batch]) -> None:
        fn(bs)
    return run


def time_pass(p: Pass, batches: list[Batch]) -> float:
    start = now()
    own = p.run(batches)
    return own if own is not None else now() - start


def profile_pass(p: Pass, batches: list[Batch], rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        p.run(batches)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one small batch: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--batches", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds over all passes (best one reported)")
    parser.add_argument("--clock", choices=sorted(_CLOCKS), default="cpu",
                        help="cpu: process CPU time (robust on a shared machine with 1 thread); wall: wall clock")
    parser.add_argument("--no-kronfluence", action="store_true")
    parser.add_argument("--profile", default=None, help="comma-separated pass names to profile (torch.profiler) after timing")
    parser.add_argument("--workdir", type=Path, default=None, help="kronfluence's output dir (default: a temp dir)")
    args = parser.parse_args(argv)

    _clock[0] = args.clock
    if args.clock == "cpu" and args.threads > 1:
        parser.error("--clock cpu sums the CPU time of all threads; use --clock wall with --threads > 1")
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    config = QUICK if args.quick else PYTHIA_70M
    num_batches = args.batches or (1 if args.quick else 3)
    seq_len = args.seq_len or (32 if args.quick else 128)
    rounds = args.rounds or (1 if args.quick else 3)
    batch_size = 2 if args.quick and args.batch_size == 8 else args.batch_size
    num_queries = args.queries

    load_before = os.getloadavg()
    model = build_model(config)
    taps = LayerTaps(select_modules(model))
    vocab = config["vocab_size"]
    batches = random_batches(num_batches, batch_size, seq_len, vocab, seed=1)
    warmup = random_batches(1, batch_size, seq_len, vocab, seed=2)
    query_batches = random_batches(1, num_queries, seq_len, vocab, seed=3, completion_only=True)
    flops = flop_counts(model, taps, config, batch_size, seq_len, num_queries)
    tokens = num_batches * batch_size * seq_len

    print(f"msif-ray engine benchmark: {'QUICK ' if args.quick else ''}GPT-NeoX "
          f"{config['hidden_size']}h x {config['num_hidden_layers']}L, vocab {vocab}, {len(taps.modules)} tracked layers; "
          f"{num_batches} batches x {batch_size} x {seq_len} tokens; {num_queries} queries; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) (torch.set_num_threads({args.threads})), "
          f"{rounds} round(s) + warm-up, clock: {args.clock}", flush=True)

    # Factors for the Λ and scoring passes (untimed): msif's own passes 1 and 2 on the same batches.
    covariances = accumulate_covariances(model, taps, batches, "empirical")
    bases = {name: eigendecompose_layer(name, covariances) for name in taps.modules}
    factors = finish_factors(bases, accumulate_lambdas(model, taps, batches, bases, "empirical"), {})
    query_grads = example_gradients(model, taps, query_batches, num_queries)
    preconditioned = QueryGroup(QueryVectors.from_dense(precondition(query_grads, "single_stage", factors,
                                                                     damping_pretrain="auto")), torch.device("cpu"))
    msif_scores: list[torch.Tensor] = []

    def score_run(bs: list[Batch]) -> None:
        out = [score_windows(model, taps, b, preconditioned).sum(0) for b in bs]
        if len(bs) == num_batches:
            msif_scores.append(torch.cat(out))

    passes = [
        Pass("bare", lambda bs: bare_pass(model, bs), None),
        Pass("bare/msif-obj", lambda bs: bare_pass(model, bs, "msif"), None),
        Pass("cov/emp", discard(lambda bs: accumulate_covariances(model, taps, bs, "empirical")), "extra_cov"),
        Pass("cov/sampled", discard(lambda bs: accumulate_covariances(model, taps, bs, "sampled")), "extra_cov"),
        Pass("lambda", discard(lambda bs: accumulate_lambdas(model, taps, bs, bases, "empirical")), "extra_lambda"),
        Pass("score", lambda bs: score_run(bs), "extra_score"),
    ]

    kf_scores: list[torch.Tensor] = []
    if not args.no_kronfluence:
        import tempfile

        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_kf_"))
        kf = KronfluenceSide(model, taps, batches, query_batches, workdir)
        kf.fit_eigen()

        def rows_for(bs: list[Batch]) -> TimedRows:
            return kf.train if len(bs) == num_batches else kf.train.subset(len(bs) * batch_size)

        def kf_score(bs: list[Batch]) -> float:
            scores, seconds = kf.score(rows_for(bs))
            if len(bs) == num_batches:
                kf_scores.append(scores.t())
            return seconds

        passes += [
            Pass("kf cov/emp", discard(lambda bs: kf.covariances("empirical", rows_for(bs))), None, "cov/emp"),
            Pass("kf cov/sampled", discard(lambda bs: kf.covariances("sampled", rows_for(bs))), None, "cov/sampled"),
            Pass("kf lambda", discard(lambda bs: kf.lambda_pass(rows_for(bs))), None, "lambda"),
            Pass("kf score", kf_score, None, "score"),
        ]

    for p in passes:  # warm-up: one batch each (allocator, oneDNN/MKL kernels, kronfluence's einsum paths)
        time_pass(p, warmup if not p.name.startswith("kf") else batches[:1])
    times: dict[str, list[float]] = {p.name: [] for p in passes}
    wall: dict[str, list[float]] = {p.name: [] for p in passes}  # whole call, wall clock (information only)
    for r in range(rounds):
        for p in passes:
            start = time.perf_counter()
            times[p.name].append(time_pass(p, batches))
            wall[p.name].append(time.perf_counter() - start)
            print(f"  round {r + 1}/{rounds} {p.name:<15} {times[p.name][-1]:8.2f} s {args.clock}"
                  f"   ({wall[p.name][-1]:.2f} s wall, whole call)", flush=True)
    load_after = os.getloadavg()

    best = {name: min(ts) for name, ts in times.items()}
    bare_t = best["bare"]
    rows = []
    for p in passes:
        if p.name.startswith("kf"):
            continue
        t = best[p.name]
        row = dict(name=p.name, seconds=t, median_seconds=statistics.median(times[p.name]), tokens_per_s=tokens / t,
                   vs_bare=t / bare_t)
        if p.extra_flops is not None:
            extra = flops[p.extra_flops] * num_batches
            pass_flops = (flops["frozen"] * num_batches) + extra
            bound = bare_t * pass_flops / (flops["bare"] * num_batches)
            literal = bare_t * (flops["bare"] * num_batches + extra) / (flops["bare"] * num_batches)
            row |= dict(flops=pass_flops, flop_bound_seconds=bound, vs_flop_bound=t / bound,
                        vs_flop_bound_literal=t / literal)
        else:  # the bare pass, or the same work with msif's objective
            row |= dict(flops=flops["bare"] * num_batches, flop_bound_seconds=bare_t, vs_flop_bound=t / bare_t,
                        vs_flop_bound_literal=t / bare_t)
        kf_name = next((k.name for k in passes if k.kronfluence_of == p.name), None)
        if kf_name is not None:
            row |= dict(kronfluence_seconds=best[kf_name], kronfluence_tokens_per_s=tokens / best[kf_name],
                        vs_kronfluence=t / best[kf_name])
        rows.append(row)

    agreement = None
    if msif_scores and kf_scores:
        a, b = msif_scores[-1].double().flatten(), kf_scores[-1].double().flatten()
        agreement = float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    print()
    print(f"{'pass':<13} {'tok/s':>8} {'s':>8} {'x bare':>7} {'x FLOP bound':>13} {'(literal)':>9} {'kf tok/s':>9} {'x kf':>6}")
    for row in rows:
        kf_tps = f"{row['kronfluence_tokens_per_s']:9.0f}" if "vs_kronfluence" in row else f"{'-':>9}"
        kf_ratio = f"{row['vs_kronfluence']:6.2f}" if "vs_kronfluence" in row else f"{'-':>6}"
        print(f"{row['name']:<13} {row['tokens_per_s']:8.0f} {row['seconds']:8.2f} {row['vs_bare']:7.2f} "
              f"{row['vs_flop_bound']:13.2f} {row['vs_flop_bound_literal']:9.2f} {kf_tps} {kf_ratio}")
    print(f"\nFLOPs per batch (G): bare {flops['bare'] / 1e9:.1f} (weight grads {flops['weight_grads'] / 1e9:.1f}), "
          f"extra cov {flops['extra_cov'] / 1e9:.1f}, lambda {flops['extra_lambda'] / 1e9:.1f}, score {flops['extra_score'] / 1e9:.1f}; "
          f"bare rate {flops['bare'] * num_batches / bare_t / 1e9:.1f} GFLOP/s")
    if agreement is not None:
        print(f"msif vs kronfluence scores (auto damping on both): Pearson {agreement:.6f}")
    print(f"threads: {torch.get_num_threads()}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")

    targets = {}
    for row in rows:
        if row["name"].startswith("bare"):
            continue
        targets[row["name"]] = dict(
            within_1_2x_flop_bound=row["vs_flop_bound"] <= 1.2,
            faster_than_kronfluence=row.get("vs_kronfluence", float("nan")) < 1.0 if "vs_kronfluence" in row else None,
        )
    score_row = next(r for r in rows if r["name"] == "score")
    targets["score"]["within_1_3x_bare"] = score_row["vs_bare"] <= 1.3
    missed = [f"{k}: {t}" for k, v in targets.items() for t, ok in v.items() if ok is False]
    print("targets missed: " + ("; ".join(missed) if missed else "none"))

    profiles = {}
    if args.profile:
        for name in args.profile.split(","):
            p = next(p for p in passes if p.name == name)
            profiles[name] = profile_pass(p, batches[:1])
            print(f"\n--- torch.profiler, {name}, one batch ---\n{profiles[name]}")

    from common import provenance

    result = dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command="python benchmarks/bench_engine.py " + " ".join(sys.argv[1:]),
        **provenance(),
        machine=dict(platform=platform.platform(), processor=_cpu_model(), cpus=os.cpu_count(),
                     torch=torch.__version__, threads=torch.get_num_threads(), load_before=load_before, load_after=load_after),
        config=dict(model=config, batches=num_batches, batch_size=batch_size, seq_len=seq_len, queries=num_queries,
                    rounds=rounds, tokens=tokens, quick=args.quick, tracked_layers=len(taps.modules)),
        flops_per_batch=flops, clock=args.clock, times=times, wall_times_whole_call=wall, rows=rows, targets=targets, score_pearson_vs_kronfluence=agreement,
        profiles=profiles,
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return result


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
