"""Linear datamodeling score (LDS): do summed scores predict what retraining without documents does?

    python benchmarks/bench_lds.py [--subsets 48] [--seed 0] [--entities 24] [--smoke]

On a small toy world (``msif_ray.demo.toy``): the scores of every method are computed once, at the
full-corpus models. Then, for each of K random 50% subsets S_k of the corpus, the tiny GPT-NeoX
is pre-trained again from the same initialisation (same steps, batch size and learning rate, on
S_k only), followed by the same fine-tuning (same pairs, steps and batch order), and each query's
log-probability log p(completion | prompt) is measured at the resulting fine-tuned model. For a
query q, the prediction for subset k is Σ_{m ∈ S_k} score(m, q); LDS(q) is the Spearman
correlation over the K subsets of prediction and measured log-probability; LDS is its mean over
queries. Spread: the standard deviation over queries, and a bootstrap standard error over
subsets (200 resamples of the K subsets).

Methods as in bench_fact_tracing.py: multi_stage (the engine's ``auto`` dampings), multi_stage at
λ = 0.01x mean Λ (``msif run``'s default ``auto:0.01``, chosen on fact-tracing queries of other
worlds, so every query here is held out from that choice), single_stage (θ_ft), grad_dot (θ_ft),
cosine (θ_ft), the normalisations, BM25, and a random-score baseline.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace

import torch
from transformers import GPTNeoXForCausalLM

from bench_fact_tracing import bm25_scores
from common import (corpus_pass, flat, inverse, load_world, multi_stage_chain, new_figure, print_table,
                    result_paths, save_figure, setup, spearman, write_json)
from msif_ray.demo import toy
from msif_ray.engine.api import Examples, TrackedLM
from msif_ray.demo.toy import ToySpec

FULL = ToySpec(num_entities=24, num_query_entities=8, paraphrases_per_fact=3, num_filler_docs=20, entity_distractors=1,
               value_distractors=1, hidden_size=64, pretrain_steps=250, pretrain_batch_size=16, finetune_steps=60,
               finetune_batch_size=8, finetune_lr=1e-3)
SMOKE = replace(FULL, num_entities=8, num_query_entities=2, paraphrases_per_fact=2, num_filler_docs=4,
                entity_distractors=0, value_distractors=0, hidden_size=16, pretrain_steps=20, finetune_steps=5)


def method_scores(lw, seed: int) -> dict[str, torch.Tensor]:
    """[N docs, Q] scores per method at the full-corpus models (sampled Fisher, auto dampings unless named)."""
    pt = TrackedLM(lw.pretrained, lw.tokenizer, max_length=128, batch_size=32)
    ft = TrackedLM(lw.finetuned, lw.tokenizer, max_length=128, batch_size=32)
    docs = Examples.documents(lw.texts)
    pairs = Examples.pairs([p for p, _ in lw.finetune], [c for _, c in lw.finetune])
    qx = Examples.pairs([q["prompt"] for q in lw.queries], [q["completion"] for q in lw.queries])
    h_pt, h_ft, h_c = pt.fit_factors(docs, "sampled", seed), ft.fit_factors(pairs, "sampled", seed), ft.fit_factors(docs, "sampled", seed)
    g = ft.gradients(qx)
    layers = pt.layers
    at_pt = corpus_pass(pt, lw.texts, {"multi_stage": flat(multi_stage_chain(g, h_pt, h_ft), layers),
                                       "multi_stage λ=0.01x": flat(multi_stage_chain(g, h_pt, h_ft, "0.01x"), layers)},
                        {"self": (h_pt, "auto"), "self@0.01x": (h_pt, "0.01x")})
    at_ft = corpus_pass(ft, lw.texts, {"single_stage": flat(inverse(h_c, g, "auto"), layers), "grad_dot": flat(g, layers)},
                        {"self": (h_c, "auto")})
    q_norm = flat(g, layers).double().norm(dim=1)
    return {
        "multi_stage": at_pt["multi_stage"], "multi_stage λ=0.01x (msif run's default)": at_pt["multi_stage λ=0.01x"],
        "multi_stage λ=0.01x /√self": at_pt["multi_stage λ=0.01x"] / at_pt["self@0.01x"].sqrt()[:, None],
        "single_stage": at_ft["single_stage"], "grad_dot": at_ft["grad_dot"],
        "cosine": at_ft["grad_dot"] / at_ft["__norm__"][:, None] / q_norm[None, :],
        "multi_stage /√self": at_pt["multi_stage"] / at_pt["self"].sqrt()[:, None],
        "single_stage /√self": at_ft["single_stage"] / at_ft["self"].sqrt()[:, None],
        "single_stage /self": at_ft["single_stage"] / at_ft["self"][:, None],
        "bm25": bm25_scores(lw.texts, [q["prompt"] + q["completion"] for q in lw.queries]),
        "random": torch.randn(len(lw.texts), len(lw.queries), generator=torch.Generator().manual_seed(seed), dtype=torch.float64),
    }


@torch.no_grad()
def query_log_probs(model, examples: list[toy.Example]) -> torch.Tensor:
    """log p(completion | prompt) per query: [Q]."""
    batch = toy._collate(examples, model.config.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    token = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    return token.sum(1)


def retrain(lw, keep: list[int], seed: int) -> torch.Tensor:
    """Pre-train from the full model's initialisation on the kept documents, fine-tune as the full model was; query log p."""
    spec = lw.spec
    tok = lw.tokenizer
    docs = [toy._document_example(tok, lw.texts[i]) for i in keep]
    ft_examples = [toy._completion_example(tok, p, c) for p, c in lw.finetune]
    q_examples = [toy._completion_example(tok, q["prompt"], q["completion"]) for q in lw.queries]
    torch.manual_seed(seed)  # the toy build's initialisation of the full model
    model = GPTNeoXForCausalLM(lw.pretrained.config)
    toy.train(model, docs, spec.pretrain_steps, spec.pretrain_batch_size, spec.pretrain_lr, random.Random(seed))
    toy.train(model, ft_examples, spec.finetune_steps, spec.finetune_batch_size, spec.finetune_lr, random.Random(seed + 1))
    return query_log_probs(model, q_examples)


def lds(scores: torch.Tensor, masks: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
    """Per-query LDS: Spearman over subsets of Σ_{kept} score and the measured log p. masks [K, N], measured [K, Q] -> [Q]."""
    return spearman(masks.double() @ scores.double(), measured)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--subsets", type=int, default=None, help="number of random 50%% subsets (default 48; smoke 4)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (and subsets' seed)")
    parser.add_argument("--entities", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    setup(args.threads)
    spec = SMOKE if args.smoke else FULL
    if args.entities:
        spec = replace(spec, num_entities=args.entities)
    num_subsets = args.subsets or (4 if args.smoke else 48)
    started = time.perf_counter()
    log = lambda line: print(line, flush=True)
    lw = load_world(spec, args.seed, log=log)
    scores = method_scores(lw, args.seed)
    n = len(lw.documents)
    gen = torch.Generator().manual_seed(10_000 + args.seed)
    masks = torch.zeros(num_subsets, n, dtype=torch.bool)
    measured = torch.zeros(num_subsets, len(lw.queries), dtype=torch.float64)
    t = time.process_time()
    for k in range(num_subsets):
        keep = torch.randperm(n, generator=gen)[: n // 2].sort().values
        masks[k, keep] = True
        measured[k] = retrain(lw, keep.tolist(), args.seed)
        if k == 0 or (k + 1) % 8 == 0:
            log(f"subset {k + 1}/{num_subsets}: {(time.process_time() - t) / (k + 1):.1f}s CPU per retraining")
    retrain_cpu = time.process_time() - t

    boot_gen = torch.Generator().manual_seed(1)
    results = {}
    for name, s in scores.items():
        per_query = lds(s, masks, measured)
        boots = []
        for _ in range(200):
            idx = torch.randint(0, num_subsets, (num_subsets,), generator=boot_gen)
            boots.append(float(lds(s, masks[idx], measured[idx]).nanmean()))
        results[name] = {"lds": float(per_query.nanmean()), "std_over_queries": float(per_query.std()),
                         "bootstrap_se": float(torch.tensor(boots).std()), "per_query": per_query.tolist()}
    spread = measured.std(0)
    print(f"\nLDS: {len(lw.queries)} queries, {n} documents, {num_subsets} subsets of 50% "
          f"(retraining {retrain_cpu / num_subsets:.1f}s CPU each, 1 torch thread); "
          f"std of a query's log p across subsets: median {float(spread.median()):.2f}")
    table = print_table(["method", "LDS (mean over queries)", "sd over queries", "bootstrap SE (subsets)"],
                        [[m, f"{r['lds']:.3f}", f"{r['std_over_queries']:.3f}", f"{r['bootstrap_se']:.3f}"]
                         for m, r in results.items()])
    json_path, png_path = result_paths("lds", args.smoke, args.out_dir)
    payload = {"command": "python benchmarks/bench_lds.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "spec": spec.__dict__, "seed": args.seed, "num_subsets": num_subsets, "num_documents": n,
               "num_queries": len(lw.queries), "world_stats": lw.world.stats(), "results": results,
               "measured_log_prob_std_over_subsets": spread.tolist(), "retrain_cpu_seconds_each": retrain_cpu / num_subsets,
               "table": table, "wall_seconds": time.perf_counter() - started}
    write_json(json_path, payload)
    fig, axes = new_figure(2, 1, size=(5.5, 4.0))
    names = list(results)
    ax = axes[0][0]
    ax.barh(names, [results[m]["lds"] for m in names], xerr=[results[m]["bootstrap_se"] for m in names], color="tab:blue")
    ax.invert_yaxis(); ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("LDS (Spearman, mean over queries; bars: bootstrap SE)"); ax.set_title(f"{num_subsets} subsets of 50%", fontsize=9)
    ax = axes[0][1]
    q = int(torch.tensor(results["multi_stage"]["per_query"]).nan_to_num(-2).argmax())
    ax.scatter((masks.double() @ scores["multi_stage"].double())[:, q], measured[:, q], s=12)
    ax.set_xlabel("Σ multi_stage score of kept documents"); ax.set_ylabel("measured log p")
    ax.set_title(f"best query {lw.queries[q]['id']}: LDS {results['multi_stage']['per_query'][q]:.2f}", fontsize=9)
    save_figure(fig, png_path)
    return payload


if __name__ == "__main__":
    main()
