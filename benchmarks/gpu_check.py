"""The prepared device check (run it through benchmarks/gpu_check.sh): bf16 throughput and GPU-vs-CPU agreement.

    benchmarks/gpu_check.sh [--out PATH] [--batch-size 8] [--seq-len 512] [--batches 3]
    benchmarks/gpu_check.sh --cpu-smoke       # tiny shapes on CPU, seconds (CI runs this)

1. Throughput of the engine's passes on randomly initialised GPT-NeoX models shaped like
   Pythia-410m and Pythia-1b (built from their configs; float32 weights, bf16 autocast: the
   engine's CUDA path, ``gradients.autocast_for``), over the same random-token batches:

     bare     forward + backward of Σ log p with parameter gradients (a training step without optimizer)
     cov      curvature.accumulate_covariances, sampled Fisher             (factor pass 1)
     lambda   curvature.accumulate_lambdas, sampled Fisher                 (factor pass 2)
     score    scoring.score_windows against ``--queries`` rank-32 preconditioned queries

   Each pass gets one warm-up batch, then ``--batches`` timed batches (CUDA synchronised); the
   JSON holds tokens/s, the ratio of each pass's time to the bare pass's, and the peak device
   memory of each pass (``torch.cuda.max_memory_allocated`` after a reset). The Λ and score passes
   use identity eigenbases and random query matrices: their cost is that of dense matmuls of the
   same shapes whatever the values, and a float64 eigendecomposition of the 1b model's 8192-wide
   factors would take minutes of this check's budget. This engine version has no gradient-index
   pass (scoring.mode: exact only), so none is timed.

2. Agreement on the demo's toy world (``msif_ray.demo.toy.ToySpec()``; built on the CPU first if it is
   not cached): multi_stage scores of every query against the corpus computed on the GPU (bf16
   autocast) and on the CPU (float32), same factors' recipe (fit on each device), per-query
   Pearson, with the empirical Fisher (differences are precision only) and the sampled one (the
   labels are drawn from per-device random streams, so sampling differs too); plus the share of
   each query's CPU top-10 found in its GPU top-10.

Budget: written to finish in < 8 minutes on one NVIDIA H200 (``gpu_check.sh`` stops it at 470 s).
The JSON is written after each part, so a stopped run still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from msif_ray.engine.curvature import Eigenbasis, accumulate_covariances, accumulate_lambdas
from msif_ray.engine.gradients import Batch, log_prob_objective
from msif_ray.engine.api import Examples, TrackedLM
from msif_ray.engine.vectors import LayerVectors, QueryVectors
from msif_ray.engine.influence import precondition
from msif_ray.engine.scoring import QueryGroup, score_windows
from msif_ray.engine.modules import LayerTaps, select_modules

SHAPES = {
    "pythia-410m": dict(vocab_size=50304, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096, rotary_pct=0.25),
    "pythia-1b": dict(vocab_size=50304, hidden_size=2048, num_hidden_layers=16, num_attention_heads=8,
                      intermediate_size=8192, rotary_pct=0.25),
}
SMOKE_SHAPES = {"tiny": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=256, rotary_pct=0.25)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(shape: dict, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(**shape, max_position_embeddings=2048, use_parallel_residual=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    with device:  # initialise on the device: the 1b model's CPU init alone would take a minute
        return AutoModelForCausalLM.from_config(config).float().eval()


def random_batches(num: int, batch_size: int, seq_len: int, vocab: int, seed: int) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
        loss = torch.ones_like(ids, dtype=torch.bool)
        loss[:, 0] = False
        out.append(Batch(ids, torch.ones_like(ids), loss, torch.arange(batch_size)))
    return out


def bare_pass(model, batches: list[Batch], device: torch.device) -> None:
    """Forward + backward with parameter gradients, bf16 autocast on CUDA (no optimizer)."""
    from msif_ray.engine.gradients import autocast_for

    for p in model.parameters():
        p.requires_grad_(True)
    for batch in batches:
        batch = batch.to(device)
        model.zero_grad(set_to_none=True)
        with autocast_for(device):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        log_prob_objective(logits, batch, "empirical").sum().backward()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(seconds, peak device memory in GiB; 0 on CPU) of one call."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return seconds, peak


def throughput(name: str, shape: dict, device: torch.device, args) -> dict:
    model = build_model(shape, device)
    taps = LayerTaps(select_modules(model))
    batches = random_batches(args.batches, args.batch_size, args.seq_len, shape["vocab_size"], seed=1)
    warmup = random_batches(1, args.batch_size, args.seq_len, shape["vocab_size"], seed=2)
    tokens = args.batches * args.batch_size * args.seq_len
    eye = {n: Eigenbasis(torch.eye(s.in_dim, device=device), torch.eye(s.out_features, device=device),
                         torch.ones(s.in_dim, device=device), torch.ones(s.out_features, device=device))
           for n, s in taps.specs.items()}
    g = torch.Generator(device=device).manual_seed(3)
    rank = 32  # scoring.query_rank's default: the production path (rank-r query vectors, factored or G-form)
    queries = QueryGroup(QueryVectors([str(q) for q in range(args.queries)], {
        n: LayerVectors(left=torch.randn(args.queries, s.out_features, rank, device=device, generator=g),
                        right=torch.randn(args.queries, s.in_dim, rank, device=device, generator=g))
        for n, s in taps.specs.items()}), device)
    passes = {
        "bare": lambda bs: bare_pass(model, bs, device),
        "cov": lambda bs: accumulate_covariances(model, taps, bs, "sampled"),
        "lambda": lambda bs: accumulate_lambdas(model, taps, bs, eye, "sampled"),
        "score": lambda bs: [score_windows(model, taps, b, queries) for b in bs],
    }
    out = {"shape": shape, "num_parameters": sum(p.numel() for p in model.parameters()),
           "tracked_layers": len(taps.modules), "tokens": tokens, "passes": {}}
    for pass_name, run in passes.items():
        run(warmup)
        seconds, peak = timed(lambda: run(batches), device)
        out["passes"][pass_name] = {"seconds": seconds, "tokens_per_s": tokens / seconds, "peak_memory_gib": peak}
        print(f"{name:12s} {pass_name:7s} {tokens / seconds:10.0f} tok/s  {seconds:7.2f} s  peak {peak:6.1f} GiB", flush=True)
    bare = out["passes"]["bare"]["seconds"]
    for p in out["passes"].values():
        p["x_bare"] = p["seconds"] / bare
    del model, queries
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def multi_stage_scores(world_models, world_data, device: torch.device, fisher: str) -> torch.Tensor:
    """multi_stage scores [N, Q] with everything (factors, gradients, scores) computed on ``device``."""
    tokenizer, pt_model, ft_model = world_models
    texts, pairs, queries = world_data
    pt = TrackedLM(pt_model.to(device), tokenizer, max_length=64, batch_size=32)
    ft = TrackedLM(ft_model.to(device), tokenizer, max_length=64, batch_size=32)
    docs = Examples.documents(texts)
    h_pt = pt.fit_factors(docs, fisher)
    h_ft = ft.fit_factors(Examples.pairs(*zip(*pairs)), fisher)
    v = precondition(ft.gradients(Examples.pairs(*zip(*queries))), "multi_stage", h_pt, h_ft)
    return pt.score(docs, v).total.double()


def agreement(device: torch.device, smoke: bool, workdir: Path) -> dict:
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from msif_ray.demo.toy import ToySpec, build_toy_world

    spec = replace(ToySpec.small(), pretrain_steps=30, finetune_steps=5) if smoke else ToySpec()
    t = time.perf_counter()
    world = build_toy_world(workdir / ("toy-smoke" if smoke else "toy"), spec, log=lambda line: print(line, flush=True))
    build_seconds = time.perf_counter() - t
    texts = pq.read_table(world.corpus_path).column("text").to_pylist()
    pairs = [(r["prompt"], r["completion"]) for r in pq.read_table(world.finetune_path).to_pylist()]
    queries = [(q["prompt"], q["completion"]) for q in map(json.loads, world.queries_path.read_text().splitlines())]
    tokenizer = AutoTokenizer.from_pretrained(world.finetuned_dir)

    def models():
        return (tokenizer, AutoModelForCausalLM.from_pretrained(world.pretrained_dir).float().eval(),
                AutoModelForCausalLM.from_pretrained(world.finetuned_dir).float().eval())

    out = {"world": str(world.root), "build_seconds": build_seconds, "num_documents": len(texts), "num_queries": len(queries)}
    for fisher in ("empirical", "sampled"):
        t = time.perf_counter()
        cpu = multi_stage_scores(models(), (texts, pairs, queries), torch.device("cpu"), fisher)
        cpu_s = time.perf_counter() - t
        t = time.perf_counter()
        dev = multi_stage_scores(models(), (texts, pairs, queries), device, fisher).cpu()
        dev_s = time.perf_counter() - t
        a, b = cpu - cpu.mean(0), dev - dev.mean(0)
        pearson = (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))
        top = min(10, len(texts))
        overlap = [len(set(cpu[:, q].topk(top).indices.tolist()) & set(dev[:, q].topk(top).indices.tolist())) / top
                   for q in range(cpu.shape[1])]
        out[fisher] = {"pearson_per_query": pearson.tolist(), "pearson_min": float(pearson.min()),
                       "pearson_mean": float(pearson.mean()), "top10_overlap_mean": sum(overlap) / len(overlap),
                       "cpu_seconds": cpu_s, "device_seconds": dev_s}
        print(f"agreement ({fisher} Fisher): per-query Pearson min {float(pearson.min()):.4f} mean "
              f"{float(pearson.mean()):.4f}; top-10 overlap {sum(overlap) / len(overlap):.2f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the script, measures nothing")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/gpu_check[.smoke].json)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default 8; smoke 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512; smoke 32)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per pass (default 3; smoke 1)")
    parser.add_argument("--queries", type=int, default=None, help="preconditioned queries in the score pass (default 4)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the toy world is built (default: a temp dir)")
    parser.add_argument("--skip-agreement", action="store_true")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    args.batch_size = args.batch_size or (2 if smoke else 8)
    args.seq_len = args.seq_len or (32 if smoke else 512)
    args.batches = args.batches or (1 if smoke else 3)
    args.queries = args.queries or (2 if smoke else 4)
    if smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device = torch.device("cuda")  # TF32 left at PyTorch's default (off), as the engine runs
    else:
        parser.error("no CUDA device: run with --cpu-smoke for the CPU check")
    out_path = args.out or Path(__file__).resolve().parent / "results" / ("gpu_check.smoke.json" if smoke else "gpu_check.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_smoke": smoke,
              "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "batches": args.batches, "queries": args.queries,
              "throughput": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}

    def save() -> None:
        out_path.write_text(json.dumps(report, indent=2) + "\n")

    started = time.perf_counter()
    for name, shape in (SMOKE_SHAPES if smoke else SHAPES).items():
        report["throughput"][name] = throughput(name, shape, device, args)
        save()
    if not args.skip_agreement:
        with tempfile.TemporaryDirectory() as tmp:
            report["agreement"] = agreement(device, smoke, args.workdir or Path(tmp))
    report["total_seconds"] = time.perf_counter() - started
    save()
    print(f"wrote {out_path} ({report['total_seconds']:.0f}s)", flush=True)
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
