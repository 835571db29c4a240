"""Fact tracing on a generated world with known sources: MRR, Recall@1, Recall@10 per method, over seeds.

    python benchmarks/bench_fact_tracing.py [--seeds 0 1 2] [--entities 80] [--query-entities 30] [--smoke]
    python benchmarks/bench_fact_tracing.py --alias-links 6 --pretrain-steps 1500 --name fact_tracing_aliases

World (``msif_ray.demo.toy`` with distractors): made-up people with a birthplace and an occupation;
each fact stated by ``paraphrases`` documents among filler, entity distractors (name the person,
state nothing) and value distractors (name a city or a job, no person). A tiny GPT-NeoX is
pre-trained on it, then fully fine-tuned on question/answer pairs about the other people; the
queries ask about the held-out people (2 per person), and their gold documents are that fact's
paraphrases.

A query names the person and its answer, and in that world only the gold documents name both, so
BM25 over the query finds them perfectly. ``--alias-links N`` builds the world where lexical
overlap cannot find the source (``ToySpec.alias_links``): every person also has an alias that
shares no word with any name, the fact documents name the alias only, N link documents per person
say that alias and name are the same person, and the questions (fine-tuning pairs and queries)
name the person by name. A gold document then shares only the answer word with its query, and
that word with the same fact of every other person with that value (80 people, 12 values each
relation) and with the value distractors; answering needs two hops (name -> alias -> value), and
the top-10 analysis counts the person's own links as a kind of their own ("alias link"). At
the sizes measured the tiny model learns each hop but not the two together: it answers the
held-out queries at chance, so no method finds their sources there (benchmarks/README.md).

Methods (all in-process through the Python API, ``TrackedLM``; one torch thread):

  multi_stage     α(H_pt+λ)⁻¹(H_ft+α)⁻¹ G_q(θ_ft) · G_m(θ_pt), sampled Fisher, auto dampings (defaults)
  single_stage    (H+λ)⁻¹ G_q · G_m at θ_ft, H fitted on the corpus at θ_ft (the pipeline's single_stage)
  grad_dot        G_q · G_m at θ_ft
  cosine          unit-normalised G_q, G_m at θ_ft: the normalisation TrackStar uses, without its
                  projection or its optimizer second-moment correction (not TrackStar itself)
  bm25            bm25s over prompt + completion (the answer is in the query text)

plus prototypes of score normalisations (``/√self``: divide by √(G_mᵀ(H+λ)⁻¹G_m), which for
ranking equals the cosine after symmetric preconditioning; ``/self``: RelatIF-style division by
the self-influence), and the puzzle's variants: a ladder from single_stage to multi_stage that
changes one thing at a time, the pre-training damping, the fine-tuning damping, the Fisher type,
and the checkpoint of the corpus gradients. What fills each method's top 10 is counted by kind
(gold, same entity, same value, other facts of the same relation, other facts, no fact).

Held-out selection: the held-out people are split in two (seeded per world); every configurable
setting (method x damping_pretrain auto:<m> x damping_finetune x normalize, ``candidate_settings``)
is ranked by MRR on the first half's queries, and the chosen one is measured on the other half,
with 95% bootstrap intervals over the test queries of all seeds: a default chosen on the queries
it is measured on would overstate itself.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import replace

import torch

from common import (bootstrap_interval, corpus_pass, flat, fmt, inverse, load_world, mean_spread, multi_stage_chain,
                    new_figure, print_table, query_entity, result_paths, retrieval, save_figure, setup, write_json)
from msif_ray.engine.api import Examples, TrackedLM
from msif_ray.demo.toy import ToySpec

FULL = ToySpec(num_entities=80, num_query_entities=30, paraphrases_per_fact=4, num_filler_docs=60,
               entity_distractors=1, value_distractors=3, pretrain_steps=700)
SMOKE = replace(ToySpec.small(), entity_distractors=1, value_distractors=1, pretrain_steps=60, finetune_steps=20)

MAIN = ["multi_stage", "single_stage", "grad_dot", "cosine", "bm25"]
NORMALISED = ["single_stage /√self", "single_stage /self", "multi_stage /√self", "multi_stage /self",
              "multi_stage /‖G_m‖"]
LADDER = [  # single_stage -> multi_stage, one change at a time
    ("single_stage", "A. single_stage: H(θ_ft, corpus), G_q(θ_ft), G_m(θ_ft)"),
    ("H_pt, G_m(θ_ft)", "B. A with H(θ_pt, corpus)"),
    ("H_pt, G_m(θ_pt)", "C. B with corpus gradients at θ_pt"),
    ("multi_stage", "D. C with the fine-tuning stage α(H_ft+α)⁻¹ = multi_stage"),
    ("multi_stage, G_m(θ_ft)", "E. D with corpus gradients at θ_ft"),
    ("ft stage only, G_m(θ_pt)", "F. α(H_ft+α)⁻¹G_q · G_m(θ_pt) (no pre-training inverse)"),
    ("grad_dot, G_q(θ_ft)·G_m(θ_pt)", "G. G_q(θ_ft) · G_m(θ_pt) (no inverse)"),
    ("single_stage@θ_pt", "H. single_stage at θ_pt: G_q, G_m, H all at θ_pt"),
    ("grad_dot@θ_pt", "I. grad_dot at θ_pt"),
]
LAMBDA_SCALES = ["0.001x", "0.01x", "0.1x", "1x", "10x"]
ALPHAS = ["auto", 0.01, 1.0]
KINDS = ["gold", "same entity", "same value", "fact, same relation", "fact, other relation", "no fact"]
ALIAS_KINDS = KINDS[:1] + ["alias link"] + KINDS[1:]  # alias worlds: the query person's own links apart


def bm25_scores(texts: list[str], queries: list[str]) -> torch.Tensor:
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    out = torch.zeros(len(texts), len(queries), dtype=torch.float64)
    for q, text in enumerate(queries):
        tokens = bm25s.tokenize([text], stopwords="en", show_progress=False, return_ids=False)[0]
        out[:, q] = torch.as_tensor(retriever.get_scores(tokens), dtype=torch.float64)
    return out


def kinds_of(spec: ToySpec) -> list[str]:
    """The kinds of document the top-10 analysis counts in a world of ``spec``."""
    return ALIAS_KINDS if spec.alias_links else KINDS


def top10_kinds(scores: torch.Tensor, lw) -> dict[str, float]:
    """Mean share of each kind of document in the top 10, over queries (other people's alias links
    count as "no fact")."""
    counts = dict.fromkeys(kinds_of(lw.spec), 0.0)
    for q, query in enumerate(lw.queries):
        entity, value, gold = query_entity(query), query["completion"].strip(), set(query["gold_doc_ids"])
        relation = next(d.relation for d in lw.documents if d.id in gold)
        for i in scores[:, q].topk(10).indices.tolist():
            d = lw.documents[i]
            kind = ("gold" if d.id in gold else "alias link" if d.link and d.entity == entity
                    else "same entity" if d.entity == entity else "same value" if d.value == value
                    else "fact, same relation" if d.relation == relation else "fact, other relation" if d.relation
                    else "no fact")
            counts[kind] += 1 / (10 * len(lw.queries))
    return counts


def norm_percentile_top10(scores: torch.Tensor, norms: torch.Tensor) -> float:
    """Mean percentile (0-100) of ‖G_m‖ among each query's top 10 documents."""
    pct = norms.argsort().argsort().double() / (len(norms) - 1) * 100
    return float(pct[scores.topk(10, dim=0).indices].mean())


def run_seed(spec: ToySpec, seed: int, log) -> dict:
    t0 = time.process_time()
    lw = load_world(spec, seed, log=log)
    build = lw.world.stats()
    pt = TrackedLM(lw.pretrained, lw.tokenizer, max_length=128, batch_size=32)
    ft = TrackedLM(lw.finetuned, lw.tokenizer, max_length=128, batch_size=32)
    docs = Examples.documents(lw.texts)
    pairs = Examples.pairs([p for p, _ in lw.finetune], [c for _, c in lw.finetune])
    qx = Examples.pairs([q["prompt"] for q in lw.queries], [q["completion"] for q in lw.queries])
    factors = {
        "pt/sampled": pt.fit_factors(docs, "sampled", seed), "pt/empirical": pt.fit_factors(docs, "empirical"),
        "ft/sampled": ft.fit_factors(pairs, "sampled", seed), "ft/empirical": ft.fit_factors(pairs, "empirical"),
        "ftcorpus/sampled": ft.fit_factors(docs, "sampled", seed),
    }
    g_ft, g_pt = ft.gradients(qx), pt.gradients(qx)
    H_pt, H_ft, H_c = factors["pt/sampled"], factors["ft/sampled"], factors["ftcorpus/sampled"]
    layers = pt.layers

    at_pt = {
        "multi_stage": multi_stage_chain(g_ft, H_pt, H_ft),
        "multi_stage, empirical Fisher": multi_stage_chain(g_ft, factors["pt/empirical"], factors["ft/empirical"]),
        "multi_stage, paper's fixed dampings (λ=1e-4, α=2e-4)": multi_stage_chain(g_ft, H_pt, H_ft, 1e-4, 2e-4),
        "H_pt, G_m(θ_pt)": inverse(H_pt, g_ft, "auto"),
        "ft stage only, G_m(θ_pt)": {n: H_ft.layers[n].damping("auto") * v for n, v in inverse(H_ft, g_ft, "auto").items()},
        "grad_dot, G_q(θ_ft)·G_m(θ_pt)": g_ft,
        "single_stage@θ_pt": inverse(H_pt, g_pt, "auto"),
        "grad_dot@θ_pt": g_pt,
        "cosine, G_q(θ_ft)·G_m(θ_pt)": {n: v for n, v in g_ft.items()},
    }
    for scale in LAMBDA_SCALES:
        at_pt[f"multi_stage λ={scale}"] = multi_stage_chain(g_ft, H_pt, H_ft, scale, "auto")
    for alpha in ALPHAS[1:]:
        at_pt[f"multi_stage α={alpha}"] = multi_stage_chain(g_ft, H_pt, H_ft, "auto", alpha)
    at_ft = {
        "single_stage": inverse(H_c, g_ft, "auto"),
        "single_stage λ=0.01x": inverse(H_c, g_ft, "0.01x"),
        "single_stage λ=1x": inverse(H_c, g_ft, "1x"),
        "grad_dot": g_ft,
        "H_pt, G_m(θ_ft)": inverse(H_pt, g_ft, "auto"),
        "multi_stage, G_m(θ_ft)": multi_stage_chain(g_ft, H_pt, H_ft),
    }
    scores: dict[str, torch.Tensor] = {}
    selfs_pt = {"self": (H_pt, "auto")} | {f"self@{scale}": (H_pt, scale) for scale in LAMBDA_SCALES}
    selfs_ft = {"self": (H_c, "auto")} | {f"self@{scale}": (H_c, scale) for scale in ("0.01x", "1x")}
    for lm, variants, selfs in ((pt, at_pt, selfs_pt), (ft, at_ft, selfs_ft)):
        out = corpus_pass(lm, lw.texts, {k: flat(v, layers) for k, v in variants.items()}, selfs)
        where = "pt" if lm is pt else "ft"
        scores |= {k: out[k] for k in variants}
        scores[f"__norm_{where}__"], scores[f"__self_{where}__"] = out["__norm__"], out["self"]
        scores |= {f"__{k}_{where}__": out[k] for k in selfs if k != "self"}
    q_norm = flat(g_ft, layers).double().norm(dim=1)
    scores["cosine"] = scores["grad_dot"] / scores["__norm_ft__"][:, None] / q_norm[None, :]
    scores["cosine, G_q(θ_ft)·G_m(θ_pt)"] = scores["cosine, G_q(θ_ft)·G_m(θ_pt)"] / scores["__norm_pt__"][:, None]
    scores["single_stage /√self"] = scores["single_stage"] / scores["__self_ft__"].sqrt()[:, None]
    scores["single_stage /self"] = scores["single_stage"] / scores["__self_ft__"][:, None]
    scores["multi_stage /√self"] = scores["multi_stage"] / scores["__self_pt__"].sqrt()[:, None]
    scores["multi_stage /self"] = scores["multi_stage"] / scores["__self_pt__"][:, None]
    scores["multi_stage /‖G_m‖"] = scores["multi_stage"] / scores["__norm_pt__"][:, None]
    scores["bm25"] = bm25_scores(lw.texts, [q["prompt"] + q["completion"] for q in lw.queries])

    gold = lw.gold_indices()
    methods = {k: v for k, v in scores.items() if not k.startswith("__")}
    metrics = {k: retrieval(v, gold) for k, v in methods.items()}
    held_out = held_out_selection(candidate_settings(scores), gold, [query_entity(q) for q in lw.queries], seed)
    kinds = {k: top10_kinds(methods[k], lw) for k in ("multi_stage", "single_stage", "grad_dot", "cosine",
                                                      "H_pt, G_m(θ_pt)", "multi_stage, G_m(θ_ft)",
                                                      "multi_stage /√self", "single_stage /√self")}
    checkpoint = {k: "pt" if k in at_pt or k.startswith("multi_stage /") else "ft" for k in methods}
    norm_pct = {k: norm_percentile_top10(methods[k], scores[f"__norm_{checkpoint[k]}__"]) for k in methods}
    # How much of a score's spread across documents is explained by the document's gradient norm.
    norm_corr = {k: float(torch.corrcoef(torch.stack([methods[k].abs().mean(1), scores[f"__norm_{'pt' if k in at_pt else 'ft'}__"]]))[0, 1])
                 for k in ("multi_stage", "single_stage", "grad_dot", "H_pt, G_m(θ_pt)")}
    # Scale of the curvature each damping is compared to: per-layer mean Λ (min and max over layers).
    lambda_means = {name: [min(m), max(m)] for name, f in factors.items()
                    for m in [[float(layer.lambdas.double().mean()) for layer in f.layers.values()]]}
    log(f"seed {seed}: {len(lw.documents)} documents, {len(lw.queries)} queries, "
        f"{time.process_time() - t0:.0f}s CPU; MRR multi {metrics['multi_stage']['mrr']:.3f} "
        f"single {metrics['single_stage']['mrr']:.3f} bm25 {metrics['bm25']['mrr']:.3f}")
    return {"seed": seed, "num_documents": len(lw.documents), "num_queries": len(lw.queries),
            "world_stats": build, "metrics": metrics, "held_out": held_out, "top10_kinds": kinds, "top10_norm_percentile": norm_pct,
            "score_vs_norm_correlation": norm_corr, "lambda_layer_mean_range": lambda_means, "cpu_seconds": time.process_time() - t0}


def candidate_settings(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every setting a user can configure, by its config values, with its scores [N, Q]: multi_stage
    and single_stage over damping_pretrain (auto:<m>), multi_stage over damping_finetune, each with
    normalize none and self (÷√ self-influence at the same λ), grad_dot none and unit (cosine)."""
    out = {"grad_dot, none": scores["grad_dot"], "grad_dot, unit": scores["cosine"]}
    for scale in LAMBDA_SCALES:
        name = "multi_stage" if scale == "0.1x" else f"multi_stage λ={scale}"
        out[f"multi_stage, λ auto:{scale[:-1]}, none"] = scores[name]
        out[f"multi_stage, λ auto:{scale[:-1]}, self"] = scores[name] / scores[f"__self@{scale}_pt__"].sqrt()[:, None]
    for alpha in ALPHAS[1:]:
        out[f"multi_stage, α {alpha}, none"] = scores[f"multi_stage α={alpha}"]
    for scale, name in (("0.01x", "single_stage λ=0.01x"), ("0.1x", "single_stage"), ("1x", "single_stage λ=1x")):
        self_influence = scores["__self_ft__"] if scale == "0.1x" else scores[f"__self@{scale}_ft__"]
        out[f"single_stage, λ auto:{scale[:-1]}, none"] = scores[name]
        out[f"single_stage, λ auto:{scale[:-1]}, self"] = scores[name] / self_influence.sqrt()[:, None]
    out["bm25 (sees the names)"] = scores["bm25"]
    return out


def held_out_selection(candidates: dict[str, torch.Tensor], gold: list[list[int]], entities: list[str],
                       seed: int) -> dict:
    """Choose a setting on half of the held-out people's queries (dev) and measure it on the other
    half (test): the people are split, so no person's queries are on both sides. Per query, the
    reciprocal rank and Recall@10 of every candidate on the test half are kept (for intervals)."""
    people = sorted(set(entities))
    random.Random(seed).shuffle(people)
    dev_people = set(people[: len(people) // 2])
    dev = [q for q, e in enumerate(entities) if e in dev_people]
    test = [q for q, e in enumerate(entities) if e not in dev_people]

    def on(queries: list[int], name: str) -> dict[str, list[float]]:
        return retrieval(candidates[name][:, queries], [gold[q] for q in queries], per_query=True)

    dev_mrr = {name: sum(on(dev, name)["mrr"]) / len(dev) for name in candidates if not name.startswith("bm25")}
    chosen = max(dev_mrr, key=dev_mrr.get)
    test_scores = {name: on(test, name) for name in candidates}
    return {"dev_queries": len(dev), "test_queries": len(test), "chosen": chosen, "dev_mrr": dev_mrr,
            "test": {name: {"mrr": v["mrr"], "recall@10": v["recall@10"]} for name, v in test_scores.items()}}


def held_out_summary(per_seed: list[dict]) -> tuple[dict, str]:
    """Test-half MRR and Recall@10 with 95% bootstrap intervals over the test queries of every seed,
    for the setting chosen on the dev half (per seed), the default and BM25; and each setting's."""
    def pooled(name_of) -> dict:
        rr = [v for s in per_seed for v in s["held_out"]["test"][name_of(s)]["mrr"]]
        recall = [v for s in per_seed for v in s["held_out"]["test"][name_of(s)]["recall@10"]]
        return {"mrr": sum(rr) / len(rr), "mrr_interval": bootstrap_interval(rr),
                "recall@10": sum(recall) / len(recall), "recall@10_interval": bootstrap_interval(recall)}

    rows = {"chosen on dev (per seed)": pooled(lambda s: s["held_out"]["chosen"]),
            "default (multi_stage, auto, none)": pooled(lambda s: "multi_stage, λ auto:0.1, none")}
    rows |= {name: pooled(lambda s, n=name: n) for name in per_seed[0]["held_out"]["test"]}
    lines = [[name, f"{r['mrr']:.3f} [{r['mrr_interval'][0]:.3f}, {r['mrr_interval'][1]:.3f}]",
              f"{r['recall@10']:.3f} [{r['recall@10_interval'][0]:.3f}, {r['recall@10_interval'][1]:.3f}]"]
             for name, r in rows.items()]
    table = print_table(["held-out test queries (setting chosen on the dev people)", "MRR [95% CI]", "Recall@10 [95% CI]"],
                        lines)
    chosen = [s["held_out"]["chosen"] for s in per_seed]
    print("chosen on dev, per seed: " + "; ".join(chosen))
    return {"rows": rows, "chosen_per_seed": chosen}, table


def summarise(per_seed: list[dict]) -> dict[str, dict[str, dict]]:
    names = per_seed[0]["metrics"].keys()
    return {m: {k: mean_spread([s["metrics"][m][k] for s in per_seed]) for k in ("mrr", "recall@1", "recall@10")}
            for m in names}


def plot(summary: dict, per_seed: list[dict], path) -> None:
    fig, axes = new_figure(3, 1, size=(6.0, 4.2))
    groups = [("methods", MAIN + NORMALISED), ("single_stage → multi_stage", [k for k, _ in LADDER]),
              ("multi_stage damping", [f"multi_stage λ={s}" for s in LAMBDA_SCALES] + [f"multi_stage α={a}" for a in ALPHAS[1:]]
               + ["multi_stage, empirical Fisher", "multi_stage, paper's fixed dampings (λ=1e-4, α=2e-4)"])]
    for ax, (title, names) in zip(axes[0], groups):
        y = range(len(names))
        for offset, key, color in ((-0.2, "mrr", "tab:blue"), (0.2, "recall@10", "tab:orange")):
            ax.barh([i + offset for i in y], [summary[n][key]["mean"] for n in names], height=0.4,
                    xerr=[summary[n][key]["std"] for n in names], color=color, label=key.upper() if key == "mrr" else "Recall@10")
        ax.set_yticks(list(y), [n if len(n) < 38 else n[:36] + "…" for n in names], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(f"{title} ({len(per_seed)} seeds, mean ± sd)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a seconds-long world (CI)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="world seeds (default 0 1 2; smoke: 0)")
    parser.add_argument("--entities", type=int, default=None)
    parser.add_argument("--query-entities", type=int, default=None, help="held-out people; 2 queries each")
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument("--entity-distractors", type=int, default=None, help="per person (default 1)")
    parser.add_argument("--value-distractors", type=int, default=None, help="per city or job (default 3)")
    parser.add_argument("--alias-links", type=int, default=None,
                        help="per person: > 0 builds the alias world, where facts name an alias only (default 0)")
    parser.add_argument("--name", default="fact_tracing", help="results file stem (another world: another name)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    setup(args.threads)
    spec = SMOKE if args.smoke else FULL
    overrides = {k: v for k, v in (("num_entities", args.entities), ("num_query_entities", args.query_entities),
                                   ("pretrain_steps", args.pretrain_steps), ("entity_distractors", args.entity_distractors),
                                   ("value_distractors", args.value_distractors), ("alias_links", args.alias_links))
                 if v is not None}
    spec = replace(spec, **overrides)
    seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    started = time.perf_counter()
    per_seed = [run_seed(spec, seed, log=lambda line: print(line, flush=True)) for seed in seeds]
    summary = summarise(per_seed)

    print(f"\nfact tracing: {per_seed[0]['num_queries']} queries x {len(seeds)} seeds, "
          f"{per_seed[0]['num_documents']} documents; mean ± sd over seeds")
    rows = lambda names: [[n, fmt(summary[n]["mrr"]), fmt(summary[n]["recall@1"]), fmt(summary[n]["recall@10"])] for n in names]
    tables = {
        "methods": print_table(["method", "MRR", "Recall@1", "Recall@10"], rows(MAIN + NORMALISED)),
        "ladder": print_table(["step", "MRR", "Recall@1", "Recall@10"],
                              [[d] + r[1:] for (k, d), r in zip(LADDER, rows([k for k, _ in LADDER]))]),
        "damping": print_table(["multi_stage variant", "MRR", "Recall@1", "Recall@10"],
                               rows([f"multi_stage λ={s}" for s in LAMBDA_SCALES] + [f"multi_stage α={a}" for a in ALPHAS[1:]]
                                    + ["multi_stage, empirical Fisher", "multi_stage, paper's fixed dampings (λ=1e-4, α=2e-4)",
                                       "single_stage λ=0.01x", "single_stage λ=1x", "cosine, G_q(θ_ft)·G_m(θ_pt)"])),
    }
    held_out, tables["held_out"] = held_out_summary(per_seed)
    kind_names = kinds_of(spec)
    kinds = {m: {k: mean_spread([s["top10_kinds"][m][k] for s in per_seed])["mean"] for k in kind_names}
             for m in per_seed[0]["top10_kinds"]}
    norm_pct = {m: mean_spread([s["top10_norm_percentile"][m] for s in per_seed])["mean"] for m in kinds}
    tables["top10"] = print_table(["top 10 of", *kind_names, "‖G_m‖ pct"],
                                  [[m, *(f"{kinds[m][k]:.2f}" for k in kind_names), f"{norm_pct[m]:.0f}"] for m in kinds])
    json_path, png_path = result_paths(args.name, args.smoke, args.out_dir)
    payload = {"command": "python benchmarks/bench_fact_tracing.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
               "spec": spec.__dict__, "seeds": seeds, "summary": summary, "held_out": held_out, "top10_kinds": kinds,
               "top10_norm_percentile": norm_pct, "tables": tables, "per_seed": per_seed,
               "wall_seconds": time.perf_counter() - started}
    write_json(json_path, payload)
    plot(summary, per_seed, png_path)
    return payload


if __name__ == "__main__":
    main()
