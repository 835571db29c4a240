"""Memory and work at scale (issue: every worker's memory bounded by a budget). One torch thread per worker.

Sections (``--sections``, default all):

  memory        ``msif run`` on a Pythia-160m-shaped random GPT-NeoX (85M tracked parameters): grad_dot
                with 1, 8, 64, 256 queries and multi_stage with 1, 8, 32, under a worker budget
                (``--budget-gb``); peak RSS of the whole process tree (driver, Ray, workers; sampled
                every 0.1 s), wall time per stage, and the plan's per-worker figure beside the
                measured worker peak (the plan must be within 25%).
  precondition  seconds per query of the preconditioning chain on that shape: before (dense G,
                each EK-FAC inverse as two full rotations, as the engine did) and after (token
                factors, one cross-basis rotation, randomized rank-r SVD), single and multi-stage.
  rank          error of rank r in {4, 8, 16, 32, 64, full} against full rank on the demo's trained
                toy model: per-query Pearson, Spearman and top-10 overlap of the multi-stage scores.
  scoring       the scoring pass against 1-1,000 rank-r queries as a ratio to its FLOP bound (a bare
                forward+backward scaled to scoring's FLOPs plus the cheaper per-query form).
  merge         driver peak memory of the tree merge of synthetic partials, at growing shard counts.
  factors       bytes written by the factor passes and reduce-task peak memory, 1 vs 64 shards.
  plan          ``msif plan`` figures for Pythia-410m, 1b, 6.9b shapes on one H200 and on eight.

    python benchmarks/bench_scale.py --smoke --out /tmp/smoke.json      # seconds; what CI runs
    python benchmarks/bench_scale.py --out benchmarks/results/scale.json # the real run (~1 h on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msif_ray.config import config_from_dict  # noqa: E402
from msif_ray.engine.curvature import LayerFactors  # noqa: E402
from msif_ray.engine.influence import Chain, TokenGradient, cross_rotations  # noqa: E402
from msif_ray.engine.modules import LayerSpec, layer_spec, select_modules  # noqa: E402
from msif_ray.pipeline.plan import NOMINAL_DEVICES, make_plan  # noqa: E402

PYTHIA = {  # hidden, layers, heads, intermediate (vocab 50304, rotary 0.25, untied head)
    "160m": (768, 12, 12, 3072), "410m": (1024, 24, 16, 4096), "1b": (2048, 16, 8, 8192), "6.9b": (4096, 32, 32, 16384),
    "smoke": (64, 2, 4, 256),
}
GB = 1 << 30


def neox_config(shape: str, vocab: int = 50304):
    from transformers import GPTNeoXConfig

    hidden, layers, heads, inter = PYTHIA[shape]
    return GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=inter, rotary_pct=0.25, max_position_embeddings=2048,
                         tie_word_embeddings=False)


def tracked_layers(config) -> tuple[list[LayerSpec], int]:
    from msif_ray.store.models import model_skeleton

    skeleton = model_skeleton(config)
    return ([layer_spec(n, m) for n, m in select_modules(skeleton).items()],
            sum(p.numel() for p in skeleton.parameters()))


# --------------------------------------------------------------------------- a world on the Pythia shape


def build_world(root: Path, shape: str, num_docs: int, num_queries: int) -> dict:
    """A random model of ``shape`` saved with save_pretrained, a small BPE, a corpus, fine-tuning pairs, queries."""
    from transformers import AutoModelForCausalLM

    from msif_ray.demo.toy import train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    words = "the of a in to was born lived worked town city river hill north south old new".split()
    rng = torch.Generator().manual_seed(0)
    sentence = lambda n: " ".join(words[int(i)] for i in torch.randint(len(words), (n,), generator=rng))  # noqa: E731
    docs = [{"id": f"d{i}", "text": sentence(110)} for i in range(num_docs)]
    queries = [{"id": f"q{i}", "prompt": f"Q: {sentence(12)}? A:", "completion": f" {sentence(4)}"}
               for i in range(num_queries)]
    model_dir = root / "model"
    if not (model_dir / "config.json").exists():
        tokenizer = train_tokenizer([d["text"] for d in docs] + [q["prompt"] + q["completion"] for q in queries], 512)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(neox_config(shape))
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del model
    pq.write_table(pa.Table.from_pylist(docs), root / "corpus.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": q["prompt"], "completion": q["completion"]} for q in queries[:16]]),
                   root / "finetune.parquet")
    for n in (1, 8, 32, 64, 256):
        (root / f"queries-{n}.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries[:n]))
    return {"model": str(model_dir), "corpus": str(root / "corpus.parquet"), "finetune": str(root / "finetune.parquet")}


class TreeMemory:
    """Peak summed RSS of this process and all its descendants (Ray's processes and workers), sampled."""

    def __init__(self, every: float = 0.1):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me] + me.children(recursive=True):
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.every)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def section_memory(args, results: dict) -> None:
    import ray

    from msif_ray.pipeline.run import Pipeline
    from msif_ray.store.storage import RunDir

    shape = "smoke" if args.smoke else "160m"
    world = build_world(Path(args.workdir) / f"world-{shape}", shape, 4, 256)  # 4 documents: memory, not speed
    counts = {"grad_dot": [1, 8] if args.smoke else [1, 8, 64, 256], "multi_stage": [1, 8] if args.smoke else [1, 8, 32]}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        for method, ns in counts.items():
            run_dir = Path(args.workdir) / f"run-{shape}-{method}"
            shutil.rmtree(run_dir, ignore_errors=True)
            for n in ns:  # one run directory per method: later runs reuse its factors, as a user's would
                values = {"run_dir": str(run_dir), "models": {"pretrained": world["model"], "finetuned": world["model"]},
                          "data": {"max_length": 128, "rows_per_shard": 4, "corpus": {"paths": [world["corpus"]]},
                                   "finetune": {"paths": [world["finetune"]]},
                                   "queries": {"paths": [str(Path(world["corpus"]).parent / f"queries-{n}.jsonl")]}},
                          "method": method, "scoring": {"top_k": 4},
                          "budget": {"worker_memory_gb": args.budget_gb},
                          "ray": {"num_workers": 1, "batch_size": 4, "num_cpus_per_worker": 1}}
                config = config_from_dict(values, Path(args.workdir))
                pipeline = Pipeline(config, log=lambda line: None)
                started = time.monotonic()
                with TreeMemory() as tree:
                    pipeline.run()
                wall = time.monotonic() - started
                manifest = RunDir(str(run_dir)).read_json("manifest.json")
                stages = {s: r.get("seconds") for s, r in manifest["stages"].items()}
                worker_peak = {f"{s}/{p}": v["worker_peak_rss_mb"] for s, r in manifest["stages"].items()
                               for p, v in r.get("passes", {}).items() if "worker_peak_rss_mb" in v}
                planned = {st["name"]: st["worker_bytes"] / 2**20 for st in manifest["plan"]["stages"]}
                row = {"method": method, "queries": n, "wall_s": round(wall, 1), "tree_peak_mb": round(tree.peak / 2**20),
                       "stage_seconds": stages, "worker_peak_mb": worker_peak, "planned_worker_mb": planned,
                       "query_group_size": manifest["plan"]["query_group_size"],
                       "precondition_s_per_query": round(manifest["stages"]["queries"]["passes"]["precondition"]["seconds"] / n, 3)}
                rows.append(row)
                print(f"{method:<12} Q={n:<4} wall {wall:7.1f}s  tree peak {row['tree_peak_mb']:6d} MB  "
                      f"worker peak {max(worker_peak.values()):6.0f} MB  group {row['query_group_size']}  "
                      f"precondition {row['precondition_s_per_query']} s/query", flush=True)
    finally:
        ray.shutdown()
    results["memory"] = rows
    for method in counts:
        peaks = [r["tree_peak_mb"] for r in rows if r["method"] == method]
        results.setdefault("memory_ratio_max_over_min", {})[method] = round(max(peaks) / min(peaks), 3)
    # The plan's worker figure against the measured worker peak, per stage (largest query count).
    checks = []
    for r in rows:
        for stage, planned in r["planned_worker_mb"].items():
            measured = max((v for k, v in r["worker_peak_mb"].items() if k.startswith(stage)), default=None)
            if measured:
                checks.append({"method": r["method"], "queries": r["queries"], "stage": stage,
                               "planned_mb": round(planned), "measured_mb": round(measured),
                               "ratio": round(planned / measured, 3)})
    results["plan_vs_measured"] = checks


def section_precondition(args, results: dict) -> None:
    """Before/after seconds per query of the chain on one Pythia-shaped set of layers (random factors)."""
    shape = "smoke" if args.smoke else "160m"
    layers, _ = tracked_layers(neox_config(shape))
    generator = torch.Generator().manual_seed(0)
    queries, tokens, rank = (2, 8, 8) if args.smoke else (4, 24, 32)

    def factors(s: LayerSpec) -> LayerFactors:  # timing only: the bases need not be orthogonal
        q_a = torch.randn(s.in_dim, s.in_dim, generator=generator) / s.in_dim**0.5
        q_s = torch.randn(s.out_features, s.out_features, generator=generator) / s.out_features**0.5
        return LayerFactors(q_a, q_s, torch.rand(s.out_features, s.in_dim, generator=generator) + 0.1)

    timings = {}
    for method in ("single_stage", "multi_stage"):
        before = after = rotations = 0.0
        for s in layers:
            pt, ft = factors(s), factors(s)
            a = torch.randn(queries, tokens, s.in_dim, generator=generator)
            g_s = torch.randn(queries, tokens, s.out_features, generator=generator)
            start = time.process_time()
            g = g_s.transpose(1, 2) @ a  # the old path: dense G, then each inverse rotates it in and out
            v = ft.inverse_apply(g, 0.1) if method == "multi_stage" else g
            pt.inverse_apply(v, 0.1)
            before += time.process_time() - start
            start = time.process_time()
            cross = cross_rotations(pt, ft) if method == "multi_stage" else None  # once per layer and worker (cached)
            rotations += time.process_time() - start
            chain = Chain(method, lambda name, f=pt: f, lambda name, f=ft: f, 0.1, 0.1, lambda name, c=cross: c)
            start = time.process_time()
            chain.layer(s.name, TokenGradient([(a, g_s, torch.arange(queries))], queries), rank)
            after += time.process_time() - start
        cold = after + rotations  # a cold query stage: its first batch computes the cross-basis rotations
        timings[method] = {"before_s_per_query": round(before / queries, 3), "after_s_per_query": round(after / queries, 3),
                           "cross_rotations_s": round(rotations, 3), "after_cold_s_per_query": round(cold / queries, 3),
                           "speedup": round(before / after, 2), "speedup_cold": round(before / cold, 2)}
        print(f"precondition {method:<12} before {before / queries:7.2f} s/query  after {after / queries:7.2f} s/query "
              f"({before / after:.1f}x), cold stage of {queries} queries {cold / queries:7.2f} s/query "
              f"({before / cold:.1f}x; rotations {rotations:.1f} s; rank {rank}, {tokens} tokens, 1 thread, CPU time)",
              flush=True)
    results["precondition"] = {"shape": shape, "rank": rank, "tokens_per_query": tokens, **timings}


def section_rank(args, results: dict) -> None:
    """Rank-r multi-stage scores against full rank on the demo's trained toy world."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from msif_ray.engine.api import Examples, TrackedLM
    from msif_ray.demo.toy import ToySpec, build_toy_world

    spec = ToySpec.small() if args.smoke else ToySpec()
    world = build_toy_world(Path(args.workdir) / ("toy-small" if args.smoke else "toy"), spec, log=lambda line: None)
    tokenizer = AutoTokenizer.from_pretrained(world.finetuned_dir)
    pt = TrackedLM(AutoModelForCausalLM.from_pretrained(world.pretrained_dir), tokenizer, max_length=64, batch_size=16)
    ft = TrackedLM(AutoModelForCausalLM.from_pretrained(world.finetuned_dir), tokenizer, max_length=64, batch_size=16)
    corpus = pq.read_table(world.corpus_path).to_pylist()
    docs = Examples.documents([d["text"] for d in corpus])
    finetune = pq.read_table(world.finetune_path).to_pylist()
    queries = [json.loads(line) for line in Path(world.queries_path).read_text().splitlines() if line.strip()]
    pt_factors = pt.fit_factors(docs)
    ft_factors = ft.fit_factors(Examples.pairs([r["prompt"] for r in finetune], [r["completion"] for r in finetune]))
    chain = Chain.of("multi_stage", pt_factors, ft_factors)
    q = Examples.pairs([x["prompt"] for x in queries], [x["completion"] for x in queries], [x["id"] for x in queries])
    full = pt.score(docs, ft.query_vectors(q, chain, None)).total
    table = []
    for rank in (4, 8, 16, 32, 64, None):
        scores = full if rank is None else pt.score(docs, ft.query_vectors(q, chain, rank)).total
        pearson = [pearson_r(scores[:, j], full[:, j]) for j in range(full.shape[1])]
        spearman = [pearson_r(ranks(scores[:, j]), ranks(full[:, j])) for j in range(full.shape[1])]
        overlap = [len(set(scores[:, j].topk(10).indices.tolist()) & set(full[:, j].topk(10).indices.tolist())) / 10
                   for j in range(full.shape[1])]
        row = {"rank": rank or "full", "pearson_mean": round(statistics.mean(pearson), 4),
               "pearson_min": round(min(pearson), 4), "spearman_mean": round(statistics.mean(spearman), 4),
               "top10_overlap_mean": round(statistics.mean(overlap), 3), "top10_overlap_min": round(min(overlap), 2)}
        table.append(row)
        print(f"rank {str(row['rank']):>4}: Pearson {row['pearson_mean']:.4f} (min {row['pearson_min']:.4f})  "
              f"Spearman {row['spearman_mean']:.4f}  top-10 overlap {row['top10_overlap_mean']:.3f} "
              f"(min {row['top10_overlap_min']:.2f})", flush=True)
    results["rank"] = {"queries": len(queries), "documents": len(corpus), "table": table}


def pearson_r(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([x.double(), y.double()]))[0, 1])


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 (ties broken by position): Spearman's rho is Pearson's r of the ranks."""
    return x.argsort().argsort().double()


MERGE_CHILD = r"""
import json, sys, time
import ray
sys.path.insert(0, sys.argv[1])
from msif_ray.distributed.memory import peak_rss_mb, reset_peak_rss
from msif_ray.distributed.merge import tree_merge
from msif_ray.store.storage import RunDir
run_dir, shards, k = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
store = RunDir(run_dir)
names = [f"partials/{i:06d}.parquet" for i in range(shards)]
merge = ray.remote(lambda job: job.run(RunDir(run_dir)))  # elsewhere, as the pipeline's workers run them
reset_peak_rss()
base = peak_rss_mb()
start = time.monotonic()
levels = tree_merge(store, names, k, lambda level, i: f"merge/{level}-{i:05d}.parquet",
                    run=lambda jobs: ray.get([merge.remote(job) for job in jobs]))
print(json.dumps({"driver_peak_mb": peak_rss_mb(), "driver_base_mb": base, "seconds": time.monotonic() - start,
                  "levels": levels}))
"""


def section_merge(args, results: dict) -> None:
    """Tree merge of synthetic partials; the driver (a fresh process per size) reports its peak RSS."""
    import numpy as np

    from msif_ray.engine.topk import EXTREMES_SCHEMA

    sizes = [(10, 20, 5), (100, 20, 5)] if args.smoke else [(100, 1000, 100), (1000, 100, 10), (10000, 100, 10)]
    rows = []
    for shards, queries, k in sizes:
        run_dir = Path(args.workdir) / f"merge-{shards}-{queries}-{k}"
        shutil.rmtree(run_dir, ignore_errors=True)
        (run_dir / "partials").mkdir(parents=True)
        rng = np.random.default_rng(0)
        query_ids = np.repeat([f"q{j:04d}" for j in range(queries)], 2 * k)
        sides = np.tile(np.repeat(["top", "bottom"], k), queries)
        for i in range(shards):
            table = pa.table({"query_id": query_ids, "doc_id": [f"s{i}-d{j}" for j in range(len(query_ids))],
                              "score": rng.standard_normal(len(query_ids)), "side": sides}, schema=EXTREMES_SCHEMA)
            pq.write_table(table, run_dir / "partials" / f"{i:06d}.parquet")
        out = subprocess.run([sys.executable, "-c", MERGE_CHILD, str(ROOT), str(run_dir), str(shards), str(k)],
                             capture_output=True, text=True, check=True)
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        topk = pq.read_table(run_dir / "scores" / "topk.parquet")
        assert topk.num_rows == queries * k
        rows.append({"shards": shards, "queries": queries, "k": k, "partial_rows": shards * queries * 2 * k, **figures})
        print(f"merge {shards:>6} shards x {queries} queries x k={k}: driver peak {figures['driver_peak_mb']:.0f} MB "
              f"(at start {figures['driver_base_mb']:.0f} MB), {figures['seconds']:.1f}s, {figures['levels']} levels",
              flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    results["merge"] = rows


def section_factors(args, results: dict) -> None:
    """Factor passes on the toy world's pre-trained model with 1 vs 64 shards: bytes and reduce memory."""
    import ray

    from msif_ray.pipeline.run import Pipeline
    from msif_ray.store.storage import RunDir
    from msif_ray.demo.toy import ToySpec, build_toy_world

    spec = ToySpec.small() if args.smoke else ToySpec()
    world = build_toy_world(Path(args.workdir) / ("toy-small" if args.smoke else "toy"), spec, log=lambda line: None)
    rows_total = pq.read_metadata(world.corpus_path).num_rows
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    out = []
    try:
        for shards in (1, 64):
            run_dir = Path(args.workdir) / f"factors-{shards}"
            shutil.rmtree(run_dir, ignore_errors=True)
            values = {"run_dir": str(run_dir), "models": {"pretrained": str(world.pretrained_dir)},
                      "data": {"max_length": 64, "rows_per_shard": math.ceil(rows_total / shards),
                               "corpus": {"paths": [str(world.corpus_path)]}, "queries": {"paths": [str(world.queries_path)]}},
                      "method": "single_stage", "scoring": {"top_k": 5},
                      "ray": {"num_workers": 2, "batch_size": 16}}
            Pipeline(config_from_dict(values, Path(args.workdir)), log=lambda line: None).run()
            record = RunDir(str(run_dir)).read_json("manifest.json")["stages"]["factors/pretrain"]["passes"]
            row = {"shards": record["covariance"]["shards_total"], **record["reduce"]}
            out.append(row)
            print(f"factors with {row['shards']:>3} shards: {row['checkpoints']} checkpoints, "
                  f"{row['checkpoint_bytes'] / 2**20:.1f} MB written, reduce task peak {row['peak_rss_mb']:.0f} MB", flush=True)
    finally:
        ray.shutdown()
    results["factors"] = out


def section_plan(args, results: dict) -> None:
    rows = []
    for shape in ("410m", "1b", "6.9b"):
        config = neox_config(shape)
        layers, params = tracked_layers(config)
        for workers in (1, 8):
            values = {"run_dir": "/tmp/x", "models": {"pretrained": "p", "finetuned": "f"},
                      "data": {"max_length": 512, "rows_per_shard": 2000, "corpus": {"paths": ["c"]},
                               "finetune": {"paths": ["f"]}, "queries": {"paths": ["q"]}},
                      "method": "multi_stage", "factors": {"max_examples": 100_000},
                      "ray": {"num_workers": workers, "num_gpus_per_worker": 1, "batch_size": 8}}
            config_obj = config_from_dict(values, "/")
            plan = make_plan(config_obj, config, layers, 1000, 10_000_000, 400.0, NOMINAL_DEVICES["h200"], params,
                             50_000, 64.0)
            row = {"shape": shape, "gpus": workers, "params": params, "layer_groups": len(plan.layer_groups),
                   "query_batch": plan.query_batch_size, "query_group": plan.query_group_size,
                   "stages": {s.name: {"worker_gb": round(s.worker_bytes / GB, 1), "storage_gb": round(s.storage_bytes / GB, 1),
                                       "hours": round(s.seconds / 3600, 2), "reduce_gb": round(s.reduce_bytes / GB, 2)}
                              for s in plan.stages}, "problems": plan.problems}
            rows.append(row)
            print(f"plan pythia-{shape} on {workers} x H200: layer groups {row['layer_groups']}, query batch "
                  f"{row['query_batch']}, query group {row['query_group']}", flush=True)
            for name, st in row["stages"].items():
                print(f"    {name:<18} worker {st['worker_gb']:6.1f} GB  storage {st['storage_gb']:7.1f} GB  "
                      f"~{st['hours']:6.2f} h  reduce {st['reduce_gb']:.2f} GB")
    results["plan"] = {"assumptions": "multi_stage, 1,000 queries, 10M documents x 400 tokens, max_examples 100k, "
                                      "50k fine-tuning pairs of 64 tokens, max_length 512, batch 8, rank 32, nominal H200 "
                                      "(139 GiB, 40% of 790 TFLOP/s bf16)", "rows": rows}


def section_scoring(args, results: dict) -> None:
    """The scoring pass against Q rank-r queries vs its FLOP bound: the bare forward+backward (a
    training step's time, scaled by FLOPs to what scoring needs of it) plus the cheaper per-query form."""
    from transformers import AutoModelForCausalLM

    from msif_ray.engine.gradients import Batch
    from msif_ray.engine.vectors import LayerVectors, QueryVectors
    from msif_ray.engine.api import TrackedLM
    from msif_ray.engine.scoring import QueryGroup, choose_form, score_windows, scoring_flops

    hidden, blocks, heads, inter = (64, 2, 4, 256) if args.smoke else (256, 4, 4, 1024)
    from transformers import GPTNeoXConfig

    config = GPTNeoXConfig(vocab_size=50304, hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=heads,
                           intermediate_size=inter, rotary_pct=0.25, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    lm = TrackedLM(model, tokenizer=None)
    batch_size, width, rank = (2, 32, 8) if args.smoke else (8, 128, 32)
    ids = torch.randint(50304, (batch_size, width))
    batch = Batch(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool), torch.arange(batch_size))
    params = sum(p.numel() for p in model.parameters())

    def bare() -> None:
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()

    def best_time(fn, repeats: int = 3) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        return min(times)

    t_bare = best_time(bare)
    tokens = batch_size * width
    bare_flops = 6 * params * tokens  # forward 2P, backward 4P (activations and weights)
    rows = []
    for queries in ([1, 10] if args.smoke else [1, 10, 100, 1000]):
        vectors = QueryVectors([str(q) for q in range(queries)], {
            spec.name: LayerVectors(left=torch.randn(queries, spec.out_features, rank),
                                    right=torch.randn(queries, spec.in_dim, rank)) for spec in lm.taps.specs.values()})
        group = QueryGroup(vectors, torch.device("cpu"))
        with torch.enable_grad():
            t_score = best_time(lambda: score_windows(model, lm.taps, batch, group), repeats=2)
        per_query = 0
        forms = {}
        for name, spec in lm.taps.specs.items():
            form = choose_form(group.layers[name], batch_size, width, spec.out_features, spec.in_dim, queries)
            forms[form] = forms.get(form, 0) + 1
            per_query += scoring_flops(form, batch_size, width, spec.out_features, spec.in_dim, queries, rank)
        score_flops = 4 * params * tokens + per_query  # no weight gradients
        bound = t_bare * score_flops / bare_flops
        row = {"queries": queries, "rank": rank, "scoring_s": round(t_score, 3), "bare_s": round(t_bare, 3),
               "x_bare": round(t_score / t_bare, 2), "x_flop_bound": round(t_score / bound, 2), "forms": forms}
        rows.append(row)
        print(f"scoring Q={queries:<5} rank {rank}: {t_score:7.3f}s  x bare {row['x_bare']:6.2f}  "
              f"x FLOP bound {row['x_flop_bound']:5.2f}  forms {forms}  (1 thread, CPU time)", flush=True)
    results["scoring"] = {"model": f"GPT-NeoX hidden {hidden}, {blocks} blocks, vocab 50304 ({params / 1e6:.1f}M)",
                          "batch": f"{batch_size} x {width}", "rows": rows}


SECTIONS = {"plan": section_plan, "scoring": section_scoring, "precondition": section_precondition, "rank": section_rank, "merge": section_merge,
            "factors": section_factors, "memory": section_memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CI)")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--workdir", default="/tmp/msif-bench-scale")
    parser.add_argument("--budget-gb", type=float, default=2.6, help="budget.worker_memory_gb of the memory runs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out) if args.out else None
    results = json.loads(out.read_text()) if out and out.exists() else {}  # sections run now replace theirs
    results |= {"threads": 1, "machine": f"{os.cpu_count()} CPU cores", "smoke": args.smoke}
    for name in args.sections.split(","):
        SECTIONS[name](args, results)
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
