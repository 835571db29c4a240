"""The corpus gradient index (``scoring.mode: index``): designs compared, build cost, scale, end to end.

    python benchmarks/bench_index.py [--smoke] [--sections designs,throughput,scale]
                                     [--worlds demo,facts,20k]

Sections (each selectable; results are merged into ``benchmarks/results/index.json`` so that
sections, and the worlds of ``designs``, can run in separate processes; ``index.png`` is redrawn
from whatever is there):

designs      Per world (``--worlds``: the demo's ``ToySpec()``, 444 documents; the fact-tracing
             world of bench_fact_tracing, with distractors; the 20,080-document ``SCALE_SPEC``):
             exact multi-stage scores through the engine API (EK-FAC on a 2,000-document sample at
             θ_pt, as ``factors.max_examples``, and on the fine-tuning pairs at θ_ft, sampled
             Fisher, rank-32 query vectors, ``TrackedLM.score``) against three index designs at
             equal bytes per layer: the whitened random k x k sketch the project used before
             (``sketch_maps``), a fixed top k x k block of the eigenbasis (``block_maps``), and each
             document's top terms (``TrackedLM.index``, the engine's index: k²/3 terms of 6 bytes
             for the sketch's 2k² bytes), plus the default ``index.terms``. Metrics, mean over
             queries: Pearson and Spearman vs exact over all documents; top-10 overlap with exact
             of the index alone and of index + rerank R (each query's R best estimates re-scored
             exactly, the best 10 returned: what the pipeline does) at R = 1%, 2%, 5% of the
             corpus (at least 10) and R = 100 (the default); the gold-source MRR of index +
             rerank 100 beside exact's; bytes per token; CPU time of the index build + scan as a
             ratio to a bare forward+backward over the same batches. For the default design, the
             pipeline's adaptive re-scoring rounds replayed (``rounds_account``): the top-10
             overlap they reach, and how many of the queries missing an exact document the run
             would flag as still changing.
throughput   A random Pythia-160m-shaped GPT-NeoX (``bench_scale.neox_config("160m")``), batches
             of 8 x 128 random tokens, float32, CPU: best-of-3 CPU time (``time.process_time``),
             the passes interleaved round by round: a bare forward+backward (``bench_engine.bare_pass``),
             the index pass (``document_terms``) at the default terms and a quarter of them, the
             self_influence pass of ``scoring.normalize`` in exact mode (``document_self_influence``),
             the index pass with the self-influence beside it (index mode), and the exact scoring
             pass (``scoring.score_windows``) against 100 random rank-32 queries.
scale        A toy world of >= 20,000 documents and 200 queries (``ToySpec(num_entities=160,
             num_query_entities=100, num_filler_docs=18800)``; duplicate filler texts dropped),
             queries split into A and B (100 each), four ``Pipeline.run`` in one run directory
             (embedded Ray, 1 worker of 1 CPU, batch 16, max_length 64, 1000 rows per shard,
             ``factors.max_examples: 2000``, multi_stage, top 10): (1) index mode, A, fresh;
             (2) index mode, B (factors and index reused), default rerank; (2b) index mode, B,
             rerank 0, top_k = N; (3) exact mode, B, top_k = N.
(msif-ray against kronfluence, like for like: ``bench_vs_kronfluence.py``.)

Every timing: 1 torch thread; msif's pipeline on 1 Ray worker with 1 CPU.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from common import cache_dir, load_world, new_figure, pearson, print_table, result_paths, save_figure, setup, spearman, write_json
from bench_fact_tracing import FULL as FACTS_SPEC
from msif_ray.config import DEFAULT_INDEX_TERMS, DEFAULT_RERANK, DEFAULT_RERANK_MAX
from msif_ray.demo.toy import ToySpec

SECTIONS = ("designs", "throughput", "scale")
WORLDS = ("demo", "facts", "20k")
TOP = 10
RANK = 32
SMOKE_SPEC = replace(ToySpec.small(), pretrain_steps=30, finetune_steps=5)
SCALE_SPEC = ToySpec(num_entities=160, num_query_entities=100, num_filler_docs=18800)
SMOKE_SCALE_SPEC = replace(SMOKE_SPEC, num_filler_docs=300)
TIMING = "1 torch thread; pipeline: embedded Ray, 1 worker with 1 CPU"


def log(line: str) -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------- metrics


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = TOP) -> torch.Tensor:
    """|top-k(a) ∩ top-k(b)| / k per column of [N, Q] scores: [Q]."""
    k = min(k, a.shape[0])
    ta, tb = a.topk(k, dim=0).indices, b.topk(k, dim=0).indices
    return torch.tensor([len(set(ta[:, q].tolist()) & set(tb[:, q].tolist())) / k for q in range(a.shape[1])],
                        dtype=torch.float64)


def with_rerank(estimates: torch.Tensor, exact: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index + rerank r: (every document's score, each query's top-r candidates by estimate carrying
    their exact score and the rest their estimate; the candidates' exact scores, -inf elsewhere: what
    index mode ranks its top k from)."""
    out = estimates.clone().double()
    top = estimates.topk(min(r, estimates.shape[0]), dim=0).indices
    out.scatter_(0, top, exact.double().gather(0, top))
    returned = torch.full_like(out, -float("inf")).scatter_(0, top, exact.double().gather(0, top))
    return out, returned


# --------------------------------------------------------------------------- 1. index designs


def sketch_maps(lm, factors, k: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, ...]]:
    """The index this project used before (kept here for the comparison): Gaussian P_out [k, out],
    P_in [k, in] of variance 1/k, whitened halfway by a rank-one fit Λ ≈ d_S d_Aᵀ of the pre-training
    eigenvalues (M = D_S^-½ Q_Sᵀ, N = D_A^-½ Q_Aᵀ): documents (P M, P N), queries (P M⁻ᵀ, P N⁻ᵀ)."""
    maps = {}
    for i, (name, spec) in enumerate(lm.taps.specs.items()):
        f = factors.layer(name)
        lam = f.lambdas.double().clamp_min(0)
        g = torch.Generator().manual_seed(seed * 1000 + i)
        sides = []
        for q, d, width in ((f.s_vectors, lam.mean(1), spec.out_features), (f.a_vectors, lam.mean(0), spec.in_dim)):
            d = d / float(lam.mean()) ** 0.5
            d = d + 0.1 * float(d.mean()) + 1e-30
            p = torch.randn(k, width, generator=g, dtype=torch.float64) / k ** 0.5
            sides.append((p @ (d.rsqrt()[:, None] * q.double().t()), p @ (d.sqrt()[:, None] * q.double().t())))
        (out, q_out), (inp, q_inp) = sides
        maps[name] = (out.float(), inp.float(), q_out.float(), q_inp.float())
    return maps


def block_maps(lm, factors, k: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """A fixed top block of each layer's eigenbasis: the k eigenvectors of S and of A whose rows and
    columns of Λ/(Λ + λ) sum highest (the same block for every document; exact on the block)."""
    maps = {}
    for name in lm.layers:
        f = factors.layer(name)
        lam = f.lambdas.double()
        share = lam / (lam + f.damping("auto"))
        rows, cols = share.sum(1).topk(min(k, lam.shape[0])).indices, share.sum(0).topk(min(k, lam.shape[1])).indices
        out, inp = f.s_vectors[:, rows].t().float(), f.a_vectors[:, cols].t().float()
        maps[name] = (out, inp, out, inp)
    return maps


def mapped_estimates(lm, batches, n: int, maps, vectors) -> torch.Tensor:
    """Σ_layers ⟨(P_q,out Ṽ_q P_q,inᵀ), (P_out G_m P_inᵀ)⟩ with document blocks stored in float16 per layer: [N, Q]."""
    from msif_ray.engine.gradients import backward_through_layers

    rows = {name: torch.zeros(n, m[0].shape[0] * m[1].shape[0]) for name, m in maps.items()}
    for batch in batches:
        def add(name, a, s, batch=batch):
            out, inp = maps[name][:2]
            rows[name].index_add_(0, batch.examples, torch.bmm((s.float() @ out.t()).transpose(1, 2), a.float() @ inp.t()).flatten(1))
        backward_through_layers(lm.model, lm.taps, batch, add)
    total = torch.zeros(n, len(vectors.ids), dtype=torch.float64)
    for name, (_, _, q_out, q_inp) in maps.items():
        v = vectors.layers[name]
        queries = ((q_out @ v.left.float()) @ (q_inp @ v.right.float()).mT).flatten(1)
        scale = rows[name].abs().amax(1, keepdim=True).clamp_min(1e-30)
        stored = (rows[name] / scale).half().float() * scale
        total += (stored @ queries.t()).double()
    return total


def weighted_terms(lm, docs, factors, vectors, terms: int, power: float) -> torch.Tensor:
    """The engine's index with the terms chosen by |V_ij| (Λ_ij + λ)^-power instead of power ½."""
    from msif_ray.engine.index import TermBasis, document_terms, rotate_queries, scan, term_bases

    bases = {}
    for name, basis in term_bases(list(lm.taps.specs.values()), factors.layer).items():
        f = factors.layer(name)
        weight = (f.lambdas.double().clamp_min(0) + f.damping("auto")).pow(-power).float()
        bases[name] = TermBasis(basis.s_vectors, basis.a_vectors, weight)
    rows = document_terms(lm.model, lm.taps, lm.batches(docs, by_document=True), len(docs), bases, terms)
    return scan(rows, rotate_queries(vectors, bases, lm.layers), lm.layers)


def design_metrics(estimates: torch.Tensor, exact: torch.Tensor, fractions=(0.01, 0.02, 0.05), rerank: int = 100) -> dict:
    """Pearson, Spearman vs exact; top-10 overlap of the index alone and of index + rerank R (R = a
    fraction of the corpus, at least 10, and the default ``scoring.rerank``): each query's R best
    estimates re-scored exactly, the best 10 of them returned."""
    n = exact.shape[0]
    out = {"pearson": float(pearson(estimates, exact).mean()), "spearman": float(spearman(estimates, exact).mean()),
           "index alone": float(top_overlap(estimates, exact).mean())}
    for label, r in [(f"rerank {f:.0%}", max(TOP, math.ceil(f * n))) for f in fractions] + [(f"rerank {rerank}", rerank)]:
        out[label] = float(top_overlap(with_rerank(estimates, exact, r)[1], exact).mean())
        out[f"{label} (R)"] = min(r, n)
    return out


def rounds_account(estimates: torch.Tensor, exact: torch.Tensor, rerank: int, most: int) -> dict:
    """The pipeline's adaptive re-scoring on in-process scores [N, Q] (``topk.rerank_windows`` and
    ``top_changed``, as ``pipeline/index.py``): per query, rounds of exact re-scores down the estimate's
    ranking while a round changes the top 10, up to ``most``. Counts the queries whose returned top
    10 misses documents of exact's, and how many of them the run flags (``still_changing``: its last
    round, at ``most``, still changed the top 10): how far a user can trust an unflagged query."""
    from msif_ray.engine.topk import rerank_windows, top_changed

    n, num_queries = exact.shape
    overlap, rescored, missing, flagged, caught = [], [], 0, 0, 0
    for q in range(num_queries):
        order = estimates[:, q].argsort(descending=True).tolist()
        scores: dict[str, float] = {}
        changing, reached = True, 0
        for lo, hi in rerank_windows(rerank, min(most, n)):
            if not changing:
                break
            new = {str(d) for d in order[lo:hi]}
            scores |= {d: float(exact[int(d), q]) for d in new}
            reached, changing = hi, top_changed(scores, new, TOP)
        returned = {int(d) for d in sorted(scores, key=lambda d: -scores[d])[:TOP]}
        truth = set(exact[:, q].topk(min(TOP, n)).indices.tolist())
        flag = changing and reached >= min(most, n)
        overlap.append(len(returned & truth) / len(truth))
        rescored.append(reached)
        missing += returned != truth
        flagged += flag
        caught += flag and returned != truth
    return {"rerank": rerank, "rerank_max": most, "top-10 overlap": sum(overlap) / num_queries,
            "rescored per query": sum(rescored) / num_queries, "queries missing a document": missing,
            "queries flagged still changing": flagged, "missing and flagged": caught, "queries": num_queries}


def section_designs(args, world: str) -> dict:
    """One world: exact multi-stage scores, then each index design at each budget against them."""
    from bench_engine import bare_pass
    from common import retrieval
    from msif_ray.engine.api import Examples, TrackedLM
    from msif_ray.engine.influence import Chain

    spec = {"demo": ToySpec(), "facts": FACTS_SPEC, "20k": SCALE_SPEC}[world] if not args.smoke else SMOKE_SPEC
    lw = load_world(spec, 0, log=log)
    pt = TrackedLM(lw.pretrained, lw.tokenizer, max_length=64, batch_size=32)
    ft = TrackedLM(lw.finetuned, lw.tokenizer, max_length=64, batch_size=32)
    texts = [d.text for d in lw.documents]
    docs = Examples.documents(texts)
    pairs = Examples.pairs([p for p, _ in lw.finetune], [c for _, c in lw.finetune])
    qx = Examples.pairs([q["prompt"] for q in lw.queries], [q["completion"] for q in lw.queries])
    sample = Examples.documents(texts[:: max(1, len(texts) // 2000)])  # factors.max_examples 2000, as the pipeline
    h_pt, h_ft = pt.fit_factors(sample, "sampled", 0), ft.fit_factors(pairs, "sampled", 0)
    vectors = ft.query_vectors(qx, Chain.of("multi_stage", h_pt, h_ft), rank=RANK)
    started = time.process_time()
    exact = pt.score(docs, vectors).total  # [N, Q]
    exact_s = time.process_time() - started
    n, num_queries = exact.shape
    batches = pt.batches(docs)
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    started = time.process_time()
    with torch.enable_grad():
        bare_pass(pt.model, batches)
    bare_s = time.process_time() - started
    layers = len(pt.layers)
    ks = (16,) if args.smoke else (16, 32, 64)
    designs = []
    for k in ks:
        designs += [("sketch", f"k={k}", 2 * k * k, lambda k=k: mapped_estimates(pt, batches, n, sketch_maps(pt, h_pt, k), vectors)),
                    ("eigen block", f"k={k}", 2 * k * k, lambda k=k: mapped_estimates(pt, batches, n, block_maps(pt, h_pt, k), vectors)),
                    ("top terms", f"{k * k // 3} terms", 6 * (k * k // 3),
                     lambda k=k: pt.index_scores(pt.index(docs, k * k // 3, h_pt), vectors, h_pt))]
    if not args.smoke:
        designs.append(("top terms", f"{DEFAULT_INDEX_TERMS} terms (default)", 6 * DEFAULT_INDEX_TERMS,
                        lambda: pt.index_scores(pt.index(docs, DEFAULT_INDEX_TERMS, h_pt), vectors, h_pt)))
    if world == "demo":  # which weight chooses a document's terms: (Λ + λ)^-p, the default p = 0.5
        designs += [(f"top terms, weight p = {p}", f"{DEFAULT_INDEX_TERMS} terms", 6 * DEFAULT_INDEX_TERMS,
                     lambda p=p: weighted_terms(pt, docs, h_pt, vectors, DEFAULT_INDEX_TERMS, p)) for p in (0, 0.25, 0.75, 1)]
    gold = lw.gold_indices()
    results = {}
    for design, budget, layer_bytes, estimate in designs:
        started = time.process_time()
        estimates = estimate()
        seconds = time.process_time() - started
        if design == "top terms" and (budget.endswith("(default)") or args.smoke):
            rounded, rounded_estimates = f"{design} {budget}", estimates  # the default design (smoke: the last)
        entry = {"design": design, "budget": budget, "bytes_per_layer": layer_bytes,
                 "bytes_per_token": (layer_bytes + 4) * layers * n / tokens,
                 "build_and_scan_cpu_s": seconds, "x_bare": seconds / bare_s} | design_metrics(estimates, exact)
        top100 = with_rerank(estimates, exact, 100)[1]
        entry["gold MRR, index + rerank 100"] = retrieval(top100, gold)["mrr"]
        results[f"{design} {budget}"] = entry
        log(f"[designs {world}] {design} {budget}: Pearson {entry['pearson']:.3f}, top-10 alone {entry['index alone']:.3f}, "
            f"rerank 2% {entry['rerank 2%']:.3f} ({seconds:.1f}s)")
    exact_gold = retrieval(exact, gold)
    # the default design with the pipeline's re-scoring rounds (smoke: fewer, so that rounds happen on a tiny world)
    rerank, most = (5, 20) if args.smoke else (DEFAULT_RERANK, DEFAULT_RERANK_MAX)
    results[rounded]["rounds"] = rounds_account(rounded_estimates, exact, rerank, most)
    log(f"[designs {world}] {rounded} with re-scoring rounds: {results[rounded]['rounds']}")
    headers = ["design", "budget", "B/token", "Pearson", "Spearman", "top-10 alone", "+ rerank 1%", "+ rerank 2%",
               "+ rerank 5%", "+ rerank 100", "gold MRR (rerank 100)", "x bare"]
    rows = [[e["design"], e["budget"], f"{e['bytes_per_token']:.0f}", f"{e['pearson']:.3f}", f"{e['spearman']:.3f}",
             f"{e['index alone']:.3f}", f"{e['rerank 1%']:.3f}", f"{e['rerank 2%']:.3f}", f"{e['rerank 5%']:.3f}",
             f"{e['rerank 100']:.3f}", f"{e['gold MRR, index + rerank 100']:.3f}", f"{e['x_bare']:.2f}"]
            for e in results.values()]
    log(f"\ndesigns, {world} world: {n} documents, {num_queries} queries, multi_stage rank {RANK}; top-10 overlap with exact; "
        f"exact gold MRR {exact_gold['mrr']:.3f}; rerank R = 1/2/5% of N, at least 10")
    table = print_table(headers, rows)
    return {"world": world, "spec": str(spec), "num_documents": n, "num_queries": num_queries, "tokens": tokens,
            "exact_gold": exact_gold, "exact_scoring_cpu_s": exact_s, "bare_cpu_s": bare_s, "designs": results,
            "table": table}


# --------------------------------------------------------------------------- 2. build throughput


def section_throughput(args) -> dict:
    from transformers import AutoModelForCausalLM

    from bench_engine import bare_pass, random_batches
    from bench_scale import neox_config
    from msif_ray.engine.gradients import Batch
    from msif_ray.engine.index import TermBasis, document_self_influence, document_terms
    from msif_ray.engine.vectors import LayerVectors, QueryVectors
    from msif_ray.engine.modules import LayerTaps, select_modules
    from msif_ray.engine.scoring import QueryGroup, score_windows

    shape = "smoke" if args.smoke else "160m"
    config = neox_config(shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    taps = LayerTaps(select_modules(model))
    specs = list(taps.specs.values())
    batch_size, width = (2, 32) if args.smoke else (8, 128)
    num_batches = 1 if args.smoke else args.batches
    num_queries = 10 if args.smoke else 100
    batches = [Batch(b.input_ids, b.attention_mask, b.loss_mask, b.examples + i * batch_size)  # one document a window
               for i, b in enumerate(random_batches(num_batches, batch_size, width, config.vocab_size, seed=0))]
    num_documents = num_batches * batch_size
    g = torch.Generator().manual_seed(1)
    vectors = QueryVectors([str(q) for q in range(num_queries)], {
        s.name: LayerVectors(left=torch.randn(num_queries, s.out_features, RANK, generator=g),
                             right=torch.randn(num_queries, s.in_dim, RANK, generator=g)) for s in specs})
    group = QueryGroup(vectors, torch.device("cpu"))

    def orthogonal(n: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(n, n, generator=g)).Q

    bases = {s.name: TermBasis(orthogonal(s.out_features), orthogonal(s.in_dim), torch.rand(s.out_features, s.in_dim, generator=g))
             for s in specs}  # the cost does not depend on which orthogonal basis
    budgets = (DEFAULT_INDEX_TERMS // 4, DEFAULT_INDEX_TERMS)

    def exact(bs):
        for b in bs:
            score_windows(model, taps, b, group)

    passes = {"bare forward+backward": lambda bs: bare_pass(model, bs),
              **{f"index pass, {t} terms": lambda bs, t=t: document_terms(model, taps, bs, num_documents, bases, t)
                 for t in budgets},
              "self_influence pass (scoring.normalize, exact mode)": lambda bs: document_self_influence(
                  model, taps, bs, num_documents, bases),
              f"index pass, {DEFAULT_INDEX_TERMS} terms + self-influence (normalize, index mode)": lambda bs: document_terms(
                  model, taps, bs, num_documents, bases, DEFAULT_INDEX_TERMS, self_influence=torch.zeros(num_documents).double()),
              f"exact scoring, {num_queries} rank-{RANK} queries": exact}
    times: dict[str, list[float]] = {name: [] for name in passes}
    with torch.enable_grad():
        for round_ in range(3):
            for name, fn in passes.items():
                t = time.process_time()
                fn(batches)
                times[name].append(time.process_time() - t)
                log(f"[throughput] round {round_ + 1}: {name} {times[name][-1]:.2f}s")
    best = {name: min(v) for name, v in times.items()}
    bare, exact_s = best["bare forward+backward"], best[f"exact scoring, {num_queries} rank-{RANK} queries"]
    tokens = num_batches * batch_size * width
    rows = [[name, f"{s:.2f}", f"{tokens / s:.0f}", f"{s / bare:.2f}", f"{s / exact_s:.3f}"] for name, s in best.items()]
    params = sum(p.numel() for p in model.parameters())
    log(f"\nbuild throughput: GPT-NeoX {shape} shape ({params / 1e6:.0f}M parameters, random weights), {num_batches} "
        f"batches of {batch_size} x {width} tokens, float32, CPU, 1 torch thread, best of 3 rounds (CPU time), interleaved")
    table = print_table(["pass", "CPU s", "tokens/s", "x bare", "x exact scoring"], rows)
    return {"shape": shape, "params": params, "batches": num_batches, "batch": f"{batch_size} x {width}",
            "num_queries": num_queries, "rank": RANK, "times": times, "best": best,
            "ratios": {f"index {t} terms / {other}": best[f"index pass, {t} terms"] / base
                       for t in budgets for other, base in (("bare", bare), ("exact", exact_s))},
            "table": table}


# --------------------------------------------------------------------------- 3. scale


def scale_world(args):
    """The >= 20k-document world (built once, cached), its documents with duplicate texts dropped,
    and its queries split into A and B."""
    import pyarrow.parquet as pq

    from msif_ray.demo.toy import build_toy_world

    spec = SMOKE_SCALE_SPEC if args.smoke else SCALE_SPEC
    world = build_toy_world(cache_dir() / ("index-scale-smoke" if args.smoke else "index-scale"), spec, log=log)
    table = pq.read_table(world.corpus_path)
    seen, keep = set(), []
    for i, text in enumerate(table.column("text").to_pylist()):
        if text not in seen:
            seen.add(text)
            keep.append(i)
    queries = [json.loads(line) for line in world.queries_path.read_text().splitlines() if line.strip()]
    half = len(queries) // 2
    return world, table.take(keep), table.num_rows - len(keep), queries[:half], queries[half:]


def write_inputs(folder: Path, corpus, queries_a, queries_b) -> dict[str, Path]:
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"corpus": folder / "corpus.parquet", "A": folder / "queries-A.jsonl", "B": folder / "queries-B.jsonl"}
    pq.write_table(corpus, paths["corpus"], row_group_size=1000)
    for name, qs in (("A", queries_a), ("B", queries_b)):
        paths[name].write_text("".join(json.dumps(q) + "\n" for q in qs))
    return paths


def pipeline_run(world, paths: dict[str, Path], run_dir: Path, index_dir: Path, queries: str, **scoring) -> dict:
    import pyarrow.parquet as pq

    from msif_ray.config import config_from_dict
    from msif_ray.pipeline.run import Pipeline

    values = {
        "run_dir": str(run_dir),
        "models": {"pretrained": str(world.pretrained_dir), "finetuned": str(world.finetuned_dir)},
        "data": {"max_length": 64, "rows_per_shard": 1000, "corpus": {"paths": [str(paths["corpus"])]},
                 "finetune": {"paths": [str(world.finetune_path)]}, "queries": {"paths": [str(paths[queries])]}},
        "method": "multi_stage", "factors": {"max_examples": 2000}, "scoring": {"top_k": TOP, **scoring},
        "index": {"path": str(index_dir)},
        "ray": {"num_workers": 1, "batch_size": 16, "num_cpus_per_worker": 1},
    }
    lines: list[str] = []
    pipeline = Pipeline(config_from_dict(values, run_dir.parent), log=lambda line: (lines.append(line), log(line)))
    started = time.perf_counter()
    topk = pipeline.run()
    total = time.perf_counter() - started
    manifest = pipeline.store.read_json("manifest.json")
    skipped = {stage for stage, record in manifest["stages"].items() if record.get("outcome") == "reused"
               and stage != "index"}  # the index stage always runs: it counts its shards reused
    stages = {}
    for stage, record in manifest["stages"].items():
        if stage in skipped:
            stages[stage] = {"skipped": True}
            continue
        stages[stage] = {"seconds": record["seconds"],
                         "passes": {name: p if name == "candidates" else
                                    {k: p[k] for k in ("seconds", "computed", "reused", "documents", "tokens") if k in p}
                                    for name, p in record.get("passes", {}).items()}}
    return {"total": total, "stages": stages, "table": pq.read_table(topk).to_pydict(),
            "scores_key": manifest["stages"]["scores"]["fingerprint"], "scoring": scoring,
            "candidates": candidate_files(manifest, scoring) if scoring.get("mode") == "index" else []}


def candidate_files(manifest: dict, scoring: dict) -> list[str]:
    """The merged candidates of each query batch of an index-mode run (``layout.batch_candidates``)."""
    from msif_ray.config import Scoring
    from msif_ray.store.digests import digest
    from msif_ray.store.layout import batch_candidates

    settings = Scoring(**{"top_k": TOP} | {k: v for k, v in scoring.items() if k in ("top_k", "rerank", "rerank_max")})
    scan_key = digest(manifest["stages"]["index"]["inputs"], settings.candidates)
    return [batch_candidates(scan_key, batch, manifest["digests"]["data.corpus"])
            for batch in manifest["stages"]["queries"]["outputs"]]


def as_matrix(table: dict, doc_index: dict[str, int], query_index: dict[str, int]) -> torch.Tensor:
    out = torch.full((len(doc_index), len(query_index)), float("nan"), dtype=torch.float64)
    for q, d, s in zip(table["query_id"], table["doc_id"], table["score"]):
        out[doc_index[d], query_index[q]] = s
    return out


def seconds(run: dict, stage: str) -> float:
    return run["stages"].get(stage, {}).get("seconds", 0.0)


def stage_time(record: dict) -> str:
    return "skipped" if record.get("skipped") else f"{record['seconds']:.1f}"


def section_scale(args, tmp: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from msif_ray.config import DEFAULT_RERANK, DEFAULT_RERANK_MAX

    world, corpus, duplicates, queries_a, queries_b = scale_world(args)
    paths = write_inputs(tmp / "inputs", corpus, queries_a, queries_b)
    n = corpus.num_rows
    run_dir, index_dir = tmp / "run", tmp / "index"
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        runs = {"(1) index, queries A, fresh": pipeline_run(world, paths, run_dir, index_dir, "A", mode="index")}
        runs["(2) index, queries B"] = pipeline_run(world, paths, run_dir, index_dir, "B", mode="index")
        candidates = pa.concat_tables([pq.read_table(run_dir / name) for name in runs["(2) index, queries B"]["candidates"]])
        rescored = pq.read_table(run_dir / "scores" / runs["(2) index, queries B"]["scores_key"] / "candidates.parquet")
        runs["(2b) index, queries B, rerank 0, top_k N"] = pipeline_run(world, paths, run_dir, index_dir, "B",
                                                                        mode="index", rerank=0, top_k=n)
        runs["(3) exact, queries B, top_k N"] = pipeline_run(world, paths, run_dir, index_dir, "B", mode="exact", top_k=n)
    finally:
        if own_ray:
            ray.shutdown()
    r1, r2, r2b, r3 = runs.values()
    doc_index = {d: i for i, d in enumerate(corpus.column("id").to_pylist())}
    query_index = {q["id"]: i for i, q in enumerate(queries_b)}
    exact = as_matrix(r3["table"], doc_index, query_index)
    estimates = as_matrix(r2b["table"], doc_index, query_index)
    returned = as_matrix(r2["table"], doc_index, query_index)  # top 10 of (2), NaN elsewhere
    combined = estimates.clone()  # what (2) holds: exact scores on its re-scored candidates, estimates elsewhere
    reached = dict(zip(rescored["query_id"].to_pylist(), rescored["rescored"].to_pylist()))
    seen: dict[str, int] = {}
    for q, d, side in zip(*(candidates[c].to_pylist() for c in ("query_id", "doc_id", "side"))):
        if side == "top" and seen.setdefault(q, 0) < reached[q]:  # candidates are in the index's order
            combined[doc_index[d], query_index[q]] = exact[doc_index[d], query_index[q]]
            seen[q] += 1
    top2 = torch.nan_to_num(returned, nan=-float("inf"))
    quality = {
        "(2) index + rerank: top-10 overlap": float(top_overlap(top2, exact).mean()),
        "(2) index + rerank: Spearman (re-scored candidates exact, estimates elsewhere)": float(spearman(combined, exact).mean()),
        "(2b) index alone: top-10 overlap": float(top_overlap(estimates, exact).mean()),
        "(2b) index alone: Spearman": float(spearman(estimates, exact).mean()),
    }
    index_stage = r2["stages"]["index"]["passes"]["index"]
    shard_files = sorted((index_dir / "shards").glob("*.safetensors"))
    index_bytes = sum(p.stat().st_size for p in shard_files)
    index_tokens = r1["stages"]["index"]["passes"]["index"]["tokens"]
    passes = r2["stages"]["scores"]["passes"]
    rerank_documents = sum(p["documents"] for name, p in passes.items() if name.startswith("rerank"))
    q_s, idx_s, sc_s, exact_s = seconds(r2, "queries"), seconds(r2, "index"), seconds(r2, "scores"), seconds(r3, "scores")
    new_work = q_s + idx_s + sc_s
    speed = {
        "(2) queries stage (precondition B)": q_s, "(2) index stage (all shards reused)": idx_s,
        "(2) scores stage (scan + rerank)": sc_s, "(2) new-query work (queries + index + scores)": new_work,
        "(2) Pipeline.run wall": r2["total"],
        "(3) scores stage (exact pass)": exact_s, "(3) exact incl. preconditioning ((2)'s queries stage)": exact_s + q_s,
        "(3) Pipeline.run wall": r3["total"],
        "ratio: (3) exact scores / (2) new-query work": exact_s / new_work,
        "ratio: (3) exact scores + preconditioning / (2) new-query work": (exact_s + q_s) / new_work,
    }
    facts = {"documents": n, "duplicate texts dropped": duplicates, "queries A": len(queries_a), "queries B": len(queries_b),
             "index shards computed in (2) (must be 0)": index_stage["computed"],
             "index bytes per document": index_bytes / n, "index bytes per token": index_bytes / index_tokens,
             "index bytes total": index_bytes, "tokens indexed": index_tokens,
             "documents re-scored in (2), all rounds": rerank_documents,
             "rerank rounds in (2)": sum(name.startswith("rerank") for name in passes),
             "candidates re-scored per query in (2), mean": passes["candidates"]["rescored_per_query"],
             "queries whose last round still changed the top 10": passes["candidates"]["still_changing"],
             "scoring.rerank, rerank_max (defaults)": f"{DEFAULT_RERANK}, {DEFAULT_RERANK_MAX}",
             "index.terms (default)": DEFAULT_INDEX_TERMS}
    log(f"\nscale: {n} documents, queries A/B {len(queries_a)}/{len(queries_b)}; {TIMING}; wall seconds")
    tables = {"runs": print_table(["run", "wall s", "stages (s; skipped = reused)"],
                                  [[name, f"{r['total']:.1f}", ", ".join(f"{s} {stage_time(v)}" for s, v in r["stages"].items())]
                                   for name, r in runs.items()]),
              "speed": print_table(["new queries B", "s / ratio"], [[k, f"{v:.2f}"] for k, v in speed.items()]),
              "quality": print_table(["vs (3) exact", "mean over queries B"], [[k, f"{v:.3f}"] for k, v in quality.items()]),
              "facts": print_table(["", ""], [[k, f"{v:.1f}" if isinstance(v, float) else str(v)] for k, v in facts.items()])}
    for r in runs.values():
        del r["table"]
    return {"runs": runs, "speed": speed, "quality": quality, "facts": facts, "tables": tables, "timing": TIMING}


# --------------------------------------------------------------------------- output


def merge(json_path: Path, new: dict, command: str) -> dict:
    """Merge ``new`` sections into the JSON already there (sections may run in separate processes)."""
    with open(json_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(json_path.read_text()) if json_path.exists() else {}
        sections = old.get("sections", {})
        if "designs" in new:  # one world at a time
            new = new | {"designs": sections.get("designs", {}) | new["designs"]}
        sections = sections | new
        commands = old.get("commands", {}) | {name: command for name in new}
        write_json(json_path, {"timing": TIMING, "commands": commands, "sections": sections})
    json_path.with_suffix(".lock").unlink(missing_ok=True)
    return sections


def figure(sections: dict, png_path: Path) -> None:
    fig, axes = new_figure(3, 1, size=(4.6, 3.6))
    styles = {"sketch": ":", "eigen block": "--", "top terms": "-"}
    for world, entry in sections.get("designs", {}).items():
        for col, metric, label in ((0, "pearson", "Pearson vs exact"), (1, "rerank 2%", "top-10 overlap, index + rerank 2%")):
            ax = axes[0][col]
            for design, style in styles.items():
                points = sorted((e["bytes_per_token"], e[metric]) for e in entry["designs"].values() if e["design"] == design)
                ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=f"{world}: {design}")
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xlabel("index bytes per token")
            ax.set_ylabel(label)
            ax.legend(fontsize=6)
    ax = axes[0][2]
    bars = []
    if "throughput" in sections:
        t = sections["throughput"]["best"]
        bars += [(f"160m: {name}", s) for name, s in t.items()]
    if "scale" in sections:
        s = sections["scale"]["speed"]
        bars += [("scale: (2) new queries, index", s["(2) new-query work (queries + index + scores)"]),
                 ("scale: (3) exact scores", s["(3) scores stage (exact pass)"])]
    if bars:
        ax.barh(range(len(bars)), [b[1] for b in bars])
        ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=6)
        ax.set_xlabel("seconds (1 thread)")
        ax.set_xscale("log")
        ax.minorticks_off()
    save_figure(fig, png_path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--worlds", default=",".join(WORLDS), help="designs: which worlds")
    parser.add_argument("--batches", type=int, default=2, help="throughput: batches of 8 x 128 per pass")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    setup(1)
    logging.getLogger("ray").setLevel(logging.WARNING)
    command = "python benchmarks/bench_index.py " + " ".join(argv if argv is not None else sys.argv[1:])
    json_path, png_path = result_paths("index", args.smoke, args.out_dir)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            started = time.perf_counter()
            if name == "designs":
                worlds = ["smoke"] if args.smoke else [w.strip() for w in args.worlds.split(",") if w.strip()]
                results[name] = {}
                for world in worlds:
                    results[name][world] = section_designs(args, world)
                    results[name][world]["section_wall_s"] = time.perf_counter() - started
                    sections = merge(json_path, {name: {world: results[name][world]}}, command)
                    figure(sections, png_path)
                continue
            if name == "scale":
                results[name] = section_scale(args, Path(tmp) / name)
            else:
                results[name] = globals()[f"section_{name}"](args)
            results[name]["section_wall_s"] = time.perf_counter() - started
            sections = merge(json_path, {name: results[name]}, command)  # each section saved as soon as it is done
            figure(sections, png_path)
    return sections


if __name__ == "__main__":
    main()
