"""msif-ray vs kronfluence end to end (factor fit + scores) on the same model, data and queries, in one run.

    python benchmarks/bench_end_to_end.py [--smoke] [--copies 1]

Both explain the demo toy world's queries (``msif_ray.demo.toy.ToySpec()``; the corpus replicated
``--copies`` times with fresh ids) with single-stage EK-FAC at the fine-tuned model — kronfluence
has no multi-stage — sampled Fisher, auto damping (0.1 x mean Λ on both), float32, batches of
16, one torch thread each. msif runs its pipeline (``Pipeline.run``) on an embedded Ray with one
worker of one CPU; kronfluence runs its ``Analyzer`` (``fit_all_factors`` then
``compute_pairwise_scores``) in this process. msif's multi_stage run on the same data is shown
for information.

Fixed costs are measured apart from the passes:

  process start   a fresh interpreter importing each library (``python -c "import ..."``)
  Ray start       ``ray.init`` of the embedded local cluster (msif only)
  model load      one ``from_pretrained`` of the fine-tuned model; msif's workers load it lazily
                  inside their first pass, so msif's first pass also holds one load and the
                  worker actor's start-up (``worker start`` row: the first pass's time minus the
                  same pass's time on a rerun into a fresh run directory with the pool warm)

Passes: msif's manifest records each stage's seconds (covariance pass, eigendecomposition,
Λ pass, query preconditioning, scoring); kronfluence's stages are timed around its calls.
Scores of the two are compared per query (Pearson; the sampled Fisher's labels come from
different random streams, so they agree closely but not exactly).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from common import new_figure, pearson, print_table, result_paths, save_figure, setup, write_json
from kf import PaddedTexts, kronfluence_single_stage
from msif_ray.demo.toy import ToySpec, build_toy_world

SMOKE = replace(ToySpec.small(), pretrain_steps=30, finetune_steps=5)


def process_start(module: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, capture_output=True)
    return time.perf_counter() - started


def replicate(source: Path, copies: int, target: Path) -> Path:
    table = pq.read_table(source)
    parts = [table.set_column(table.schema.get_field_index("id"), "id",
                              pa.array([f"{i}-c{c}" for i in table["id"].to_pylist()])) for c in range(copies)]
    pq.write_table(pa.concat_tables(parts), target, row_group_size=100)
    return target


def msif_run(world, corpus: Path, run_dir: Path, method: str, top_k: int, pipeline_cls, config_from_dict) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    values = {
        "run_dir": str(run_dir),
        "models": {"pretrained": str(world.pretrained_dir), "finetuned": str(world.finetuned_dir)},
        "data": {"max_length": 64, "rows_per_shard": 1000, "corpus": {"paths": [str(corpus)]},
                 "finetune": {"paths": [str(world.finetune_path)]}, "queries": {"paths": [str(world.queries_path)]}},
        "method": method, "scoring": {"top_k": top_k},
        "ray": {"num_workers": 1, "batch_size": 16, "num_cpus_per_worker": 1},
    }
    pipeline = pipeline_cls(config_from_dict(values, run_dir.parent), log=lambda line: None)
    started = time.perf_counter()
    topk = pipeline.run()
    total = time.perf_counter() - started
    manifest = pipeline.store.read_json("manifest.json")
    stages = {}
    for stage, record in manifest["stages"].items():
        passes = {name: p["seconds"] for name, p in record.get("passes", {}).items()}
        stages[stage] = {"seconds": record["seconds"], "passes": passes,
                         "other": record["seconds"] - sum(passes.values())}  # reduces, eigendecompositions, writes
    return {"total": total, "stages": stages, "topk": topk}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--copies", type=int, default=1, help="replicate the toy corpus this many times")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    setup(1)
    logging.getLogger("ray").setLevel(logging.WARNING)
    log = lambda line: print(line, flush=True)
    fixed = {"process start, msif (import msif_ray.pipeline)": process_start("msif_ray.pipeline"),
             "process start, kronfluence (import kronfluence.analyzer)": process_start("kronfluence.analyzer")}

    import ray
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from msif_ray.config import config_from_dict
    from msif_ray.engine.api import Examples
    from msif_ray.pipeline.run import Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from common import cache_dir
        world = build_toy_world(cache_dir() / ("e2e-smoke" if args.smoke else "e2e-demo"), SMOKE if args.smoke else ToySpec(), log=log)
        corpus = replicate(world.corpus_path, args.copies, tmp / "corpus.parquet")
        texts = pq.read_table(corpus).column("text").to_pylist()
        ids = pq.read_table(corpus).column("id").to_pylist()
        queries = [q for q in map(__import__("json").loads, world.queries_path.read_text().splitlines())]

        own_ray = not ray.is_initialized()  # a test session's Ray is reused (and its start not measured)
        t = time.perf_counter()
        if own_ray:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
            fixed["Ray start (ray.init, msif only)"] = time.perf_counter() - t
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(world.finetuned_dir).float().eval()
        tokenizer = AutoTokenizer.from_pretrained(world.finetuned_dir)
        fixed["model + tokenizer load (each side, once)"] = time.perf_counter() - t
        try:
            single = msif_run(world, corpus, tmp / "run-single", "single_stage", len(texts), Pipeline, config_from_dict)
            again = msif_run(world, corpus, tmp / "run-single-2", "single_stage", len(texts), Pipeline, config_from_dict)
            multi = None if args.smoke else msif_run(world, corpus, tmp / "run-multi", "multi_stage", 10, Pipeline,
                                                     config_from_dict)
        finally:
            if own_ray:
                ray.shutdown()
        table = pq.read_table(single["topk"]).to_pylist()

        layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("gpt_neox.layers.")]
        pad = tokenizer.pad_token_id
        train = PaddedTexts(Examples.documents(texts).encode(tokenizer), pad)
        qset = PaddedTexts(Examples.pairs([q["prompt"] for q in queries], [q["completion"] for q in queries]).encode(tokenizer), pad)
        kf_scores, kf_seconds = kronfluence_single_stage(model, layers, train, qset, [None], tmp / "kf", batch_size=16)

    index = {d: i for i, d in enumerate(ids)}
    qindex = {q["id"]: k for k, q in enumerate(queries)}
    ours = torch.zeros(len(ids), len(queries), dtype=torch.float64)
    for row in table:
        ours[index[row["doc_id"]], qindex[row["query_id"]]] = row["score"]
    agreement = pearson(ours, kf_scores[None])

    first_cov = single["stages"]["factors/pretrain"]["passes"]["covariance"]
    warm_cov = again["stages"]["factors/pretrain"]["passes"]["covariance"]
    passes = {
        "msif single_stage": {
            "covariance pass (first; holds worker start + model load)": first_cov,
            "worker start + model load (first − rerun covariance pass)": first_cov - warm_cov,
            "eigendecompositions, reduces, writes": single["stages"]["factors/pretrain"]["other"],
            "Λ pass": single["stages"]["factors/pretrain"]["passes"]["lambdas"],
            "queries (gradients + preconditioning)": single["stages"]["queries"]["seconds"],
            "scoring pass": single["stages"]["scores"]["passes"]["scores"],
            "scores: merge + write": single["stages"]["scores"]["other"],
            "pipeline total (Pipeline.run)": single["total"],
            "pipeline total, rerun with a warm pool": again["total"],
        },
        "kronfluence single-stage": {
            "fit_all_factors (covariance, eigen, Λ)": kf_seconds["factors"],
            "compute_pairwise_scores (query gradients + scoring)": kf_seconds["scores0"],
            "total": kf_seconds["factors"] + kf_seconds["scores0"],
        },
    }
    if multi is not None:
        passes["msif multi_stage (information)"] = {**{stage: rec["seconds"] for stage, rec in multi["stages"].items()},
                                                    "pipeline total": multi["total"]}
    print(f"\nend to end: {len(texts)} documents, {len(queries)} queries; 1 torch thread each "
          f"(msif: 1 Ray worker with 1 CPU); seconds (wall)")
    tables = {"fixed": print_table(["fixed cost", "s"], [[k, f"{v:.2f}"] for k, v in fixed.items()])}
    tables["passes"] = print_table(["side / stage", "s"], [[f"{side}: {k}", f"{v:.2f}"] for side, rows in passes.items()
                                                          for k, v in rows.items()])
    print(f"score agreement msif vs kronfluence (per-query Pearson): min {float(agreement.min()):.4f}, "
          f"mean {float(agreement.mean()):.4f}")
    json_path, png_path = result_paths("end_to_end", args.smoke, args.out_dir)
    payload = {"command": "python benchmarks/bench_end_to_end.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "num_documents": len(texts), "num_queries": len(queries), "fixed_seconds": fixed, "pass_seconds": passes,
               "agreement_pearson": {"min": float(agreement.min()), "mean": float(agreement.mean())},
               "msif_manifest_stages": {"single_stage": single["stages"], "single_stage_rerun": again["stages"],
                                        "multi_stage": multi["stages"] if multi else None}, "tables": tables}
    write_json(json_path, payload)
    fig, axes = new_figure(1, 1, size=(7.5, 3.2))
    ax = axes[0][0]
    m, k = passes["msif single_stage"], passes["kronfluence single-stage"]
    bars = [("msif", [("cov (warm)", warm_cov), ("worker+load", first_cov - warm_cov),
                      ("eigen etc.", m["eigendecompositions, reduces, writes"]), ("Λ", m["Λ pass"]),
                      ("queries", m["queries (gradients + preconditioning)"]), ("score", m["scoring pass"]),
                      ("merge", m["scores: merge + write"])]),
            ("kronfluence", [("factors", k["fit_all_factors (covariance, eigen, Λ)"]),
                             ("scores", k["compute_pairwise_scores (query gradients + scoring)"])])]
    for row, (name, parts) in enumerate(bars):
        left = 0.0
        for label, value in parts:
            ax.barh(row, value, left=left)
            if value > 0.05 * sum(v for _, v in parts):
                ax.text(left + value / 2, row, label, ha="center", va="center", fontsize=7)
            left += value
    ax.set_yticks([0, 1], [b[0] for b in bars]); ax.set_xlabel("seconds (wall, passes only; fixed costs in the JSON)")
    save_figure(fig, png_path)
    return payload


if __name__ == "__main__":
    main()
