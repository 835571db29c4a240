"""``msif plan``: memory, storage and time of every stage, from shapes alone, before anything heavy runs.

The plan is arithmetic over the tracked layers' shapes (``LayerSpec``: out x in, bias folded in),
the model's size, the batch and the budget. It also makes the choices that keep every process
within the budget: the layer groups of the factor passes, the query batch size of the
preconditioning pass, and how many queries one scoring pass can hold (the query group).

Memory per worker (bytes; w = weight bytes, f = 4 for float32 sums):

    model             n_params · w
    activations       B·T · (L·(ACT_PER_HIDDEN·h + 2·heads·T)·f + 3·V·f + Σ in·f)      forward+backward
    covariance pass   3 · Σ_group (in² + out²) · f                                      sums + commit buffers
    Λ pass            2 · Σ_group out·in · f + Σ_group (in² + out²) · f + 2·B·max(out·in)·f
    preconditioning   Q_b · (T_q·Σ(in + out) + 3·max(out·in)) · f + factor cache
    scoring           Q_g · r · Σ(out + in) · f  (dense: Q_g · Σ out·in · f) + 2·WORKING_SET + B·max(out·in)·f

Time: FLOPs over a measured (or, for a named device, nominal) matmul throughput, divided over the
workers: a lower bound that the passes reach within 1.0-1.3x (benchmarks/README.md).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from msif_ray.config import Config
from msif_ray.engine.index import SCAN_BLOCK_BYTES, layer_terms
from msif_ray.engine.modules import LayerSpec
from msif_ray.engine.scoring import WORKING_SET_ELEMENTS
from msif_ray.errors import UserError

GB = 1 << 30
F32 = 4
ACT_PER_HIDDEN = 24  # float32 numbers saved per token, block and hidden unit for the backward (measured: bench_scale)
PROCESS_OVERHEAD = int(0.6 * GB)  # a Ray worker with torch and transformers imported, before any model
MAX_QUERY_BATCH = 64


class PlanError(UserError, ValueError):
    """The configuration cannot run within its memory budget; the message names the knob to turn."""


class WorkerMemoryError(UserError, MemoryError):
    """A worker was killed for memory although the plan fitted; the message has the stage, the figures, the knobs."""


@dataclass(frozen=True)
class DeviceProfile:
    """What one worker has: memory and a matmul throughput (FLOP/s) in the precision it computes in."""

    name: str
    memory_bytes: int
    matmul_flops: float
    weight_bytes: int  # 4 for float32 weights, 2 for bf16


NOMINAL_DEVICES = {
    # 139 GiB usable; bf16 dense peak ~790 TFLOP/s, of which transformer passes reach about 40%.
    "h200": DeviceProfile("NVIDIA H200 (nominal)", 139 * GB, 0.4 * 790e12, 2),
    "h100": DeviceProfile("NVIDIA H100 80GB (nominal)", 79 * GB, 0.4 * 700e12, 2),
}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """A short calibration: FLOP/s of a size x size matmul on ``device`` (best of ``repeats``)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def local_profile(config: Config) -> DeviceProfile:
    """This machine as one worker would see it, with the budget of the config where it is set."""
    from msif_ray.store.models import weight_dtype

    cuda = config.ray.num_gpus_per_worker > 0 and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = weight_dtype(config.ray.precision, device)
    if cuda:
        memory = torch.cuda.get_device_properties(0).total_memory
        name = torch.cuda.get_device_name(0)
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8 // max(config.ray.num_workers, 1)
        name = f"CPU ({config.ray.num_cpus_per_worker} thread(s) per worker)"
    threads = torch.get_num_threads()
    torch.set_num_threads(config.ray.num_cpus_per_worker)
    try:
        flops = measure_matmul_flops(device, dtype)
    finally:
        torch.set_num_threads(threads)
    return DeviceProfile(name, int(memory), flops, torch.finfo(dtype).bits // 8)


@dataclass
class StagePlan:
    name: str
    worker_bytes: int
    storage_bytes: int
    flops: float
    seconds: float = 0.0
    reduce_bytes: int = 0
    note: str = ""


@dataclass
class ResourcePlan:
    """The choices and figures of a run; ``check()`` refuses one that cannot fit."""

    device: DeviceProfile
    num_workers: int
    budget_bytes: int
    layers: list[LayerSpec]
    layer_groups: list[list[str]]
    query_batch_size: int
    query_group_batches: int
    factor_cache_bytes: int
    stages: list[StagePlan] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    corpus: str = ""  # documents and tokens of the corpus, and where the count comes from

    def job_seconds(self, pass_name: str, jobs: int) -> float:
        """The estimate of one of ``jobs`` jobs of a pass: its stage's seconds x workers / jobs (the
        stage named by the pass name's first word; 0 when the plan has none, as for reduce jobs)."""
        stage = pass_name.split()[0]
        seconds = sum(s.seconds for s in self.stages if s.name.split()[0] == stage)
        return seconds * self.num_workers / max(jobs, 1)

    @property
    def query_group_size(self) -> int:
        return self.query_batch_size * self.query_group_batches

    def check(self) -> None:
        if self.problems:
            raise PlanError("the run does not fit its memory budget:\n  - " + "\n  - ".join(self.problems))

    def out_of_memory_message(self, stage: str, detail: str) -> str:
        figures = next((s for s in self.stages if stage.startswith(s.name.split()[0])), None)
        planned = f"; the plan expected {_gb(figures.worker_bytes)} per worker" if figures else ""
        return (f"[{stage}] {detail}{planned} within a budget of {_gb(self.budget_bytes)}. Lower budget.worker_memory_gb "
                "to what the workers really have, or turn a knob: ray.batch_size, scoring.query_rank, "
                "budget.query_group_size, budget.query_batch_size, budget.layer_groups, or more ray.num_workers "
                "on more machines")

    def summary_lines(self) -> list[str]:
        return ([self.corpus] if self.corpus else []) + [
            f"{self.device.name}; budget {_gb(self.budget_bytes)} per worker, {self.num_workers} worker(s)",
            f"layer groups {len(self.layer_groups)}, query batches of {self.query_batch_size}, "
            f"query groups of {self.query_group_size}",
        ] + [f"{s.name:<22} worker {_gb(s.worker_bytes):>9}  storage {_gb(s.storage_bytes):>9}  "
             f"~{_duration(s.seconds)}" + (f"  reduce job {_gb(s.reduce_bytes)}" if s.reduce_bytes else "")
             + (f"  ({s.note})" if s.note else "") for s in self.stages]

    def to_dict(self) -> dict:
        return {"device": self.device.name, "budget_bytes": self.budget_bytes, "num_workers": self.num_workers,
                "layer_groups": len(self.layer_groups), "query_batch_size": self.query_batch_size,
                "query_group_size": self.query_group_size, "stages": [asdict(s) for s in self.stages],
                "problems": self.problems}


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _model_numbers(model_config) -> tuple[int, int, int, int]:
    """(hidden, blocks, heads, vocab) from a Hugging Face config."""
    c = model_config.to_dict()
    return (c.get("hidden_size") or c.get("n_embd"), c.get("num_hidden_layers") or c.get("n_layer"),
            c.get("num_attention_heads") or c.get("n_head"), c["vocab_size"])


@dataclass(frozen=True)
class _Sizes:
    """What every figure of the plan starts from: the tracked layers, the model, a batch, the free memory."""

    config: Config
    layers: list[LayerSpec]
    profile: DeviceProfile
    params: int
    budget: int  # bytes per worker
    weights: int  # bytes of the model's weights
    base: int  # bytes of a worker with the model loaded and one batch's activations
    free: int  # bytes left beside them (0 when none)

    @property
    def batch(self) -> int:
        return self.config.ray.batch_size

    @property
    def window(self) -> int:
        return self.config.data.max_length

    @property
    def rank(self) -> int | None:
        return self.config.scoring.query_rank

    @property
    def tracked(self) -> int:
        return sum(s.out_features * s.in_dim for s in self.layers)

    @property
    def largest(self) -> int:
        return max(s.out_features * s.in_dim for s in self.layers)

    @property
    def factors_total(self) -> int:
        """Bytes of every layer's stored factors: Q_A, Q_S and Λ."""
        return sum(F32 * (s.in_dim**2 + s.out_features**2 + s.out_features * s.in_dim) for s in self.layers)

    @property
    def pass_flops(self) -> int:
        """Forward + backward of the activations, per token (no weight gradients)."""
        return 4 * self.params

    @property
    def vector_bytes(self) -> int:
        """One query's preconditioned vectors, rank-r or dense."""
        rank = self.rank
        return F32 * (sum(rank * (s.in_dim + s.out_features) for s in self.layers) if rank else self.tracked)

    def covariance_bytes(self, s: LayerSpec) -> int:
        return 3 * F32 * (s.in_dim**2 + s.out_features**2)

    def lambda_bytes(self, s: LayerSpec) -> int:
        return F32 * (2 * s.out_features * s.in_dim + s.in_dim**2 + s.out_features**2)

    def scoring_work(self, queries: int) -> int:
        """The blocked intermediates of the factored or G-form scores (engine/scoring.py), and one batch's G."""
        return F32 * (2 * min(WORKING_SET_ELEMENTS, self.batch * self.window * queries * (self.rank or 1))
                      + self.batch * self.largest)


def _sizes(config: Config, model_config, layers: list[LayerSpec], profile: DeviceProfile, num_params: int | None,
           problems: list[str]) -> _Sizes:
    """The model's and a batch's memory against the budget; a problem when they alone exceed it."""
    hidden, blocks, heads, vocab = _model_numbers(model_config)
    params = num_params or (sum(s.out_features * s.in_dim for s in layers) + 2 * vocab * hidden)
    budget = int(config.budget.worker_memory_gb * GB) if config.budget.worker_memory_gb else profile.memory_bytes
    batch, window = config.ray.batch_size, config.data.max_length
    weights = params * profile.weight_bytes
    activations = batch * window * F32 * (blocks * (ACT_PER_HIDDEN * hidden + 2 * heads * window) + 3 * vocab
                                          + sum(s.in_dim for s in layers))
    base = PROCESS_OVERHEAD + weights + activations
    if budget - base <= 0:
        problems.append(f"the model ({_gb(weights)}) and the activations of a batch of {batch} x {window} tokens "
                        f"({_gb(activations)}) exceed the budget of {_gb(budget)}: lower ray.batch_size or "
                        "data.max_length, or raise budget.worker_memory_gb")
    return _Sizes(config, layers, profile, params, budget, weights, base, max(budget - base, 0))


def make_plan(config: Config, model_config, layers: list[LayerSpec], num_queries: int, corpus_rows: int,
              tokens_per_document: float, profile: DeviceProfile | None = None, num_params: int | None = None,
              finetune_rows: int = 0, tokens_per_query: float = 32.0, corpus_tokens: int | None = None) -> ResourcePlan:
    """The plan of ``config`` for a model of ``layers`` (tracked) on ``profile`` (default: measured here).

    ``corpus_tokens``: the corpus's exact token count where the files' metadata has it (token formats);
    else it is estimated from ``tokens_per_document``."""
    problems: list[str] = []
    z = _sizes(config, model_config, layers, profile or local_profile(config), num_params, problems)
    groups = _layer_groups(layers, config.budget.layer_groups, z.free - 2 * z.batch * z.largest * F32,
                           lambda s: max(z.covariance_bytes(s), z.lambda_bytes(s)), problems)
    chain_models = {"multi_stage": 2, "single_stage": 1, "grad_dot": 0}[config.method]
    factor_cache = min(chain_models * z.factors_total, max(z.free // 4, 0))
    per_query = F32 * (tokens_per_query * sum(s.in_dim + s.out_features for s in layers) + 3 * z.largest)
    query_batch, group_batches = _query_batches(z, num_queries, factor_cache, per_query, problems)
    plan = ResourcePlan(z.profile, config.ray.num_workers, z.budget, layers, [list(g) for g in groups], query_batch,
                        group_batches, int(factor_cache), problems=problems)
    _factor_stages(plan, z, corpus_rows, tokens_per_document, finetune_rows, tokens_per_query)
    query_flops = num_queries * (tokens_per_query * (z.pass_flops + 2 * sum(s.in_dim**2 + s.out_features**2
                                                                          for s in layers)) + _chain_flops(z))
    _stage(plan, z, "queries", z.base + min(query_batch, max(num_queries, 1)) * per_query + factor_cache,
           num_queries * z.vector_bytes, query_flops, note=f"batches of {query_batch}")
    _scoring_stages(plan, z, num_queries, corpus_rows, tokens_per_document)
    if corpus_tokens is not None:
        plan.corpus = f"corpus: {corpus_rows:,} documents, {corpus_tokens:,} tokens (from the files' metadata)"
    else:
        plan.corpus = (f"corpus: {corpus_rows:,} documents, ~{round(corpus_rows * tokens_per_document):,} tokens "
                       f"(~{tokens_per_document:.0f} per document, from a sample of the first shard)")
    return plan


def _query_batches(z: _Sizes, num_queries: int, factor_cache: int, per_query: int, problems: list[str]
                   ) -> tuple[int, int]:
    """(queries preconditioned together, query batches scored by one corpus pass) that fit beside the model."""
    budget = z.config.budget
    query_batch = budget.query_batch_size or int(max(z.free - factor_cache, 0) // per_query)
    query_batch = max(1, min(query_batch, MAX_QUERY_BATCH))  # not cut to the queries: batches stay when queries are added
    if query_batch * per_query + factor_cache > z.free and z.free > 0:
        problems.append(f"one query's preconditioning needs {_gb(per_query)} beyond the model: "
                        "lower data.max_length or raise budget.worker_memory_gb")
    group_queries = budget.query_group_size or int(max(z.free - z.scoring_work(num_queries), 0) // z.vector_bytes)
    group_batches = max(1, min(group_queries // query_batch, math.ceil(max(num_queries, 1) / query_batch)))
    if group_queries < query_batch:
        if budget.query_group_size is None and z.free > 0 and group_queries < 1:
            problems.append(f"one query's preconditioned vectors ({_gb(z.vector_bytes)}) do not fit beside the model: "
                            "lower scoring.query_rank or raise budget.worker_memory_gb")
        query_batch = max(1, min(query_batch, group_queries or 1))
    return query_batch, group_batches


def _stage(plan: ResourcePlan, z: _Sizes, name: str, worker: float, storage: float, flops: float, reduce: int = 0,
           note: str = "") -> None:
    plan.stages.append(StagePlan(name, int(worker), int(storage), flops,
                                 flops / z.profile.matmul_flops / plan.num_workers, int(reduce), note))


def _factor_stages(plan: ResourcePlan, z: _Sizes, corpus_rows: int, tokens_per_document: float, finetune_rows: int,
                   tokens_per_query: float) -> None:
    """factors/finetune and factors/pretrain: two passes per layer group, and the reduce jobs."""
    config, layers, groups = z.config, z.layers, plan.layer_groups
    cov_flops = 2 * sum(s.in_dim**2 + s.out_features**2 for s in layers)
    per_token = len(groups) * (2 * z.pass_flops + 2 * cov_flops + 2 * z.tracked)
    cov_group = max(sum(z.covariance_bytes(s) for s in layers if s.name in g) for g in groups)
    lam_group = max(sum(z.lambda_bytes(s) for s in layers if s.name in g) for g in groups)
    reduce = max(32 * max(s.in_dim, s.out_features) ** 2 for s in layers)
    storage = (plan.num_workers * z.factors_total + z.factors_total
               + F32 * sum(s.in_dim**2 + s.out_features**2 for s in layers))
    if config.method == "multi_stage":
        _stage(plan, z, "factors/finetune", z.base + max(cov_group, lam_group), storage,
               finetune_rows * tokens_per_query * per_token, reduce)
    if config.method in ("multi_stage", "single_stage"):
        sample_rows = min(config.factors.max_examples or corpus_rows, corpus_rows)
        _stage(plan, z, "factors/pretrain", z.base + max(cov_group, lam_group), storage,
               sample_rows * tokens_per_document * per_token, reduce,
               f"{len(groups)} layer group(s)" if len(groups) > 1 else "")


def _chain_flops(z: _Sizes) -> float:
    """Per query, beyond its gradient: multi_stage's rotations between the two eigenbases, the rank-r SVD."""
    rotations = 2 * sum(s.out_features * s.in_dim * (s.out_features + s.in_dim) for s in z.layers)
    return (rotations if z.config.method == "multi_stage" else 0) + 24 * (z.rank or 0) * z.tracked


def _scoring_stages(plan: ResourcePlan, z: _Sizes, num_queries: int, corpus_rows: int,
                    tokens_per_document: float) -> None:
    """scores (exact), or in index mode: the index pass, the scan, the exact re-scoring."""
    config, layers, window = z.config, z.layers, z.window
    corpus_tokens = corpus_rows * min(tokens_per_document, window * math.ceil(tokens_per_document / window))
    group = min(num_queries, plan.query_group_size)
    num_groups = math.ceil(max(num_queries, 1) / plan.query_group_size)
    shards = math.ceil(corpus_rows / config.data.rows_per_shard)
    groups_note = f"{num_groups} query group(s) of up to {plan.query_group_size}" if num_groups > 1 else ""
    score_flops_per_token = z.pass_flops + sum(_scoring_flops_per_token(s, group, z.rank, window) for s in layers)
    # index and self_influence passes: per token, rotate its factors into the eigenbasis and add its outer
    # product to V (engine/index.py); one forward+backward per layer group, whose bases (Q_S, Q_A, the
    # weights: the Λ pass's need) are in memory together
    groups = plan.layer_groups
    by_name = {s.name: s for s in layers}
    bases = max(sum(z.lambda_bytes(by_name[n]) for n in g) for g in groups)
    v_flops = corpus_tokens * (len(groups) * z.pass_flops + sum(2 * (s.out_features ** 2 + s.in_dim ** 2)
                                                                + 2 * s.out_features * s.in_dim for s in layers))
    per_batch_v = config.ray.batch_size * max(s.out_features * s.in_dim for s in layers) * F32 * 3  # one layer's V
    group_note = f"; {len(groups)} layer groups: {len(groups)} passes over each shard" if len(groups) > 1 else ""
    if config.scoring.normalize != "none" and config.scoring.mode == "index":  # in the index pass (pipeline/index.py)
        _stage(plan, z, "self_influence", 0, corpus_rows * 8, 0,
               note="computed by the index pass, beside the terms of the shards it indexes")
    elif config.scoring.normalize != "none":
        _stage(plan, z, "self_influence", z.base + per_batch_v + bases, corpus_rows * 8, v_flops,
               note="once per corpus, base model and factors" + group_note)
    if config.scoring.mode == "exact":
        _stage(plan, z, "scores", z.base + group * z.vector_bytes + z.scoring_work(group),
               shards * num_groups * group * 2 * config.scoring.top_k * 48,
               num_groups * corpus_tokens * score_flops_per_token, note=groups_note)
        return
    rows = config.data.rows_per_shard
    width = sum(layer_terms(layers, config.index.terms))  # terms per document
    _stage(plan, z, "index", z.base + rows * width * (F32 + 4) + per_batch_v + bases,
           corpus_rows * (width * 6 + len(layers) * F32), v_flops,
           note="reused for every shard already in index.path" + group_note)
    one_basis = max(z.lambda_bytes(s) for s in layers)  # queries are rotated one layer's basis at a time
    scan_work = rows * width * (2 + 4 + F32) + SCAN_BLOCK_BYTES + rows * group * 8 + one_basis
    build = num_groups * group * sum(2 * s.out_features * s.in_dim * (z.rank or s.in_dim) for s in layers) * shards
    candidates = config.scoring.candidates
    _stage(plan, z, "scan (index)", PROCESS_OVERHEAD + z.weights + scan_work,
           shards * num_groups * group * 2 * candidates * 56, num_groups * corpus_rows * 2 * width * group + build,
           note=groups_note)
    if config.scoring.rerank:
        reranked = min(corpus_rows, num_queries * (candidates + config.scoring.top_k))
        _stage(plan, z, "rerank (exact)", z.base + group * z.vector_bytes + z.scoring_work(group), 0,
               num_groups * reranked * tokens_per_document * score_flops_per_token,
               note=f"at most {reranked} documents, if every query takes every round")


def _scoring_flops_per_token(s: LayerSpec, queries: int, rank: int | None, window: int) -> float:
    """The cheaper scoring form of one layer per corpus token (see scoring.py), for ``queries`` queries."""
    out, inp = s.out_features, s.in_dim
    if rank is None:
        return 2 * out * inp * (1 + queries / window)
    return min(2 * queries * rank * (out + inp), 2 * out * inp * (1 + queries * rank / window))


def _layer_groups(layers: list[LayerSpec], count: int | None, room: int, need, problems: list[str]) -> list[list[str]]:
    """Split the layers (in model order) into ``count`` groups, or into as few as fit ``room`` each."""
    names = [s.name for s in layers]
    if count is not None:
        size = math.ceil(len(names) / count)
        return [names[i : i + size] for i in range(0, len(names), size)]
    groups: list[list[str]] = [[]]
    used = 0
    for s in layers:
        n = need(s)
        if n > room:
            problems.append(f"layer {s.name} alone needs {_gb(n)} for its factor sums beside the model: "
                            "raise budget.worker_memory_gb or exclude it with modules.exclude")
        if groups[-1] and used + n > room:
            groups.append([])
            used = 0
        groups[-1].append(s.name)
        used += n
    return groups
