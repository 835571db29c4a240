"""msif-ray vs kronfluence, like for like: the same work, first runs in fresh processes, median of N.

    python benchmarks/bench_vs_kronfluence.py --world demo             # 444 documents, 24 queries
    python benchmarks/bench_vs_kronfluence.py --world 160m --docs 1000 # a random Pythia-160m-shaped model
    python benchmarks/bench_vs_kronfluence.py --world 20k --repeats 1  # the 20,080-document toy world
    python benchmarks/bench_vs_kronfluence.py --smoke                  # CI: a tiny world, 1 repeat

What is the same on both sides (each side is one fresh ``python`` process per run, so every run is
a first run: interpreter start, imports, Ray start, model load and every pass are inside it):

  model        the world's fine-tuned model (single-stage EK-FAC at θ_ft: kronfluence has no
               multi-stage), float32, CPU, ``--threads`` torch threads (msif: 1 Ray worker with
               that many CPUs; kronfluence: ``torch.set_num_threads``)
  documents    msif's own tokenization and windows (``data.max_length``), handed to kronfluence
               pre-encoded, in msif's batch order (longest first) and padded per batch to its
               longest, as msif pads; a document's score is the sum of its windows' on both sides
  factors      fitted on every document on both sides (msif ``factors.max_examples: null``), the
               empirical Fisher (deterministic, so the scores can be compared to float tolerance),
               damping 0.1 x mean Λ per layer (msif ``auto``, kronfluence's heuristic), batches of 16
  queries      full rank on both sides (msif ``scoring.query_rank: null``); msif's default rank 32
               is a third side, for information
  output       every (document, query) score: msif ``top_k`` = the corpus size (its topk.parquet
               then holds every pair), kronfluence its pairwise score matrix, windows summed

Each figure is the median of ``--repeats`` runs with their min and max; the sides run in turns
(msif, kronfluence, msif r32, then again), and the machine's load average is recorded around every
run. Inside each run the child reports where its time went (imports, Ray start, the passes from
msif's manifest; kronfluence's model load and two calls). The two sides' scores are compared per query (Pearson)
and must cover the same pairs; tests/benchmarks checks this at smoke size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SIDES = ("msif", "kronfluence", "msif r32")


# --------------------------------------------------------------------------- the two sides (child processes)


def msif_side(job: dict) -> dict:
    """One fresh run as ``msif run`` makes it (``run_locked``: storage checks, the lock, Ray started,
    inputs validated, the plan checked, then ``Pipeline.run``), without the report kronfluence lacks."""
    started = time.perf_counter()
    from msif_ray.config import config_from_dict
    from msif_ray.pipeline.locked import run_locked

    seconds = {"imports": time.perf_counter() - started}
    run_dir = Path(job["workdir"]) / "run"
    config = config_from_dict({
        "run_dir": str(run_dir),
        "models": {"pretrained": job["model"], "finetuned": job["model"]},
        "data": {"max_length": job["max_length"], "rows_per_shard": 1000, "corpus": {"paths": [job["corpus"]]},
                 "queries": {"paths": [job["queries"]]}},
        "method": "single_stage",
        "factors": {"fisher": "empirical", "damping_pretrain": "auto", "max_examples": None},
        "scoring": {"top_k": job["num_documents"], "query_rank": job["rank"]},
        "ray": {"num_workers": 1, "batch_size": job["batch_size"], "num_cpus_per_worker": job["threads"]},
    }, run_dir.parent)
    done = {}

    def work(pipeline, inputs) -> None:
        seconds["Ray start, validation, plan"] = time.perf_counter() - started - seconds["imports"]
        t = time.perf_counter()
        done["topk"] = pipeline.run(inputs)
        done["manifest"] = pipeline.manifest
        seconds["Pipeline.run"] = time.perf_counter() - t

    run_locked(config, "run", work)
    stages = {}
    for stage, record in done["manifest"]["stages"].items():
        for name, p in record.get("passes", {}).items():
            stages[f"{stage}: {name}"] = p["seconds"]
        stages[f"{stage}: other"] = record["seconds"] - sum(p["seconds"] for p in record.get("passes", {}).values())
    seconds["until the scores"] = time.perf_counter() - started
    import pyarrow.parquet as pq

    rows = pq.read_table(done["topk"], columns=["query_id", "doc_id", "score"]).to_pylist()
    return {"seconds": seconds, "stages": stages, "scores": [[r["query_id"], r["doc_id"], r["score"]] for r in rows]}


def kronfluence_side(job: dict) -> dict:
    """kronfluence's ``fit_all_factors`` then ``compute_pairwise_scores`` on msif's windows, in process."""
    started = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM

    from kf import PaddedTexts, kronfluence_single_stage

    seconds = {"imports": time.perf_counter() - started}
    torch.set_num_threads(job["threads"])
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["model"]).float().eval()
    seconds["model load"] = time.perf_counter() - t
    encoded = json.loads(Path(job["encoded"]).read_text())
    train = PaddedTexts([(w["ids"], w["mask"]) for w in encoded["windows"]], encoded["pad"])
    queries = PaddedTexts([(q["ids"], q["mask"]) for q in encoded["queries"]], encoded["pad"])
    scores, kf_seconds = kronfluence_single_stage(model, encoded["layers"], train, queries, [None],
                                                  Path(job["workdir"]) / "kf", empirical=True,
                                                  batch_size=job["batch_size"])
    seconds["fit_all_factors"], seconds["compute_pairwise_scores"] = kf_seconds["factors"], kf_seconds["scores0"]
    t = time.perf_counter()
    per_window = scores[None]  # [windows, Q]
    documents = torch.zeros(len(encoded["doc_ids"]), per_window.shape[1], dtype=torch.float64)
    documents.index_add_(0, torch.tensor([w["document"] for w in encoded["windows"]]), per_window)
    seconds["windows summed"] = time.perf_counter() - t
    seconds["until the scores"] = time.perf_counter() - started
    return {"seconds": seconds, "stages": {},
            "scores": [[q, d, float(documents[i, j])] for i, d in enumerate(encoded["doc_ids"])
                       for j, q in enumerate(encoded["query_ids"])]}


def child(side: str, job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    sys.path.insert(0, str(BENCH))
    result = (kronfluence_side if side == "kronfluence" else msif_side)(job)
    Path(job["result"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------- worlds and inputs (the parent)


def world_inputs(name: str, docs: int, log) -> dict:
    """Paths of the world's model, corpus and queries (built once into the bench cache)."""
    from common import cache_dir

    if name == "160m":
        from bench_scale import build_world

        built = build_world(cache_dir() / f"vs-kf-160m-{docs}", "160m", docs, 64)
        return {"model": built["model"], "corpus": built["corpus"], "queries": str(Path(built["corpus"]).parent / "queries-8.jsonl"),
                "max_length": 128}
    from bench_index import SCALE_SPEC
    from msif_ray.demo.toy import ToySpec, build_toy_world

    smoke = replace(ToySpec.small(), pretrain_steps=30, finetune_steps=5)
    spec = {"smoke": smoke, "demo": ToySpec(), "20k": SCALE_SPEC}[name]
    world = build_toy_world(cache_dir() / f"vs-kf-{name}", spec, log=log)
    return {"model": str(world.finetuned_dir), "corpus": str(world.corpus_path), "queries": str(world.queries_path),
            "max_length": 64}


def encode_for_kronfluence(inputs: dict, path: Path) -> dict:
    """msif's windows of every document and query, in msif's batch order (longest first)."""
    import pyarrow.parquet as pq
    from transformers import AutoConfig, AutoTokenizer

    from msif_ray.engine.api import Examples
    from msif_ray.engine.gradients import make_windows, pad_token_id
    from msif_ray.engine.modules import select_modules
    from msif_ray.store.models import model_skeleton

    tokenizer = AutoTokenizer.from_pretrained(inputs["model"])
    corpus = pq.read_table(inputs["corpus"], columns=["id", "text"])
    queries = [json.loads(line) for line in Path(inputs["queries"]).read_text().splitlines()]
    windows = make_windows(Examples.documents(corpus.column("text").to_pylist()).encode(tokenizer), inputs["max_length"])
    windows.sort(key=lambda w: -len(w.input_ids))  # stable: make_batches's order
    query_windows = make_windows(Examples.pairs([q["prompt"] for q in queries], [q["completion"] for q in queries])
                                 .encode(tokenizer), inputs["max_length"])
    assert len(query_windows) == len(queries), "a query longer than max_length"
    layers = list(select_modules(model_skeleton(AutoConfig.from_pretrained(inputs["model"]))))
    encoded = {"pad": pad_token_id(tokenizer), "layers": layers, "doc_ids": corpus.column("id").to_pylist(),
               "query_ids": [q["id"] for q in queries],
               "windows": [{"ids": w.input_ids, "mask": w.loss_mask, "document": w.example} for w in windows],
               "queries": [{"ids": w.input_ids, "mask": w.loss_mask} for w in query_windows]}
    path.write_text(json.dumps(encoded))
    return {"documents": len(encoded["doc_ids"]), "windows": len(windows), "queries": len(queries),
            "tokens": sum(len(w.input_ids) for w in windows), "layers": len(layers)}


def run_side(side: str, job: dict, workdir: Path, env: dict) -> dict:
    """One fresh process of ``side``; its wall time (interpreter start to exit) and the load around it."""
    job = dict(job, workdir=str(workdir), result=str(workdir / "result.json"), rank=32 if side == "msif r32" else None)
    workdir.mkdir(parents=True)
    (workdir / "job.json").write_text(json.dumps(job))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", side.split()[0], str(workdir / "job.json")],
                   check=True, env=env, cwd=workdir)
    wall = time.perf_counter() - started
    result = json.loads((workdir / "result.json").read_text())
    return result | {"process wall": wall, "load": [load_before, os.getloadavg()[0]]}


def median_min_max(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def agreement(a: list, b: list) -> dict:
    """Per-query Pearson of two sides' scores over the same (query, document) pairs."""
    import torch

    from common import pearson

    left = {(q, d): s for q, d, s in a}
    right = {(q, d): s for q, d, s in b}
    if left.keys() != right.keys():
        raise AssertionError(f"the sides scored different pairs: {len(left.keys() - right.keys())} only in msif, "
                             f"{len(right.keys() - left.keys())} only in kronfluence")
    queries = sorted({q for q, _ in left})
    docs = sorted({d for _, d in left})
    x = torch.tensor([[left[q, d] for q in queries] for d in docs], dtype=torch.float64)
    y = torch.tensor([[right[q, d] for q in queries] for d in docs], dtype=torch.float64)
    r = pearson(x, y)
    return {"pairs": len(left), "pearson_min": float(r.min()), "pearson_mean": float(r.mean())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", choices=["demo", "20k", "160m"], default="demo")
    parser.add_argument("--docs", type=int, default=1000, help="documents of the 160m world")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated, of: " + ", ".join(SIDES))
    parser.add_argument("--msif-path", default=None, help="import msif_ray from this checkout (a before/after)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "JOB"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child)
    sys.path.insert(0, str(BENCH))
    from common import machine, new_figure, print_table, provenance, result_paths, save_figure, write_json

    log = lambda line: print(line, flush=True)  # noqa: E731
    world = "smoke" if args.smoke else args.world
    repeats = 1 if args.smoke else args.repeats
    sides = [s.strip() for s in args.sides.split(",")]
    assert set(sides) <= set(SIDES), f"--sides: of {SIDES}"
    inputs = world_inputs(world, args.docs, log)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (args.msif_path, str(BENCH),
                                                                  os.environ.get("PYTHONPATH")) if p))
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = encode_for_kronfluence(inputs, tmp / "encoded.json")
        job = {"model": inputs["model"], "corpus": inputs["corpus"], "queries": inputs["queries"],
               "max_length": inputs["max_length"], "batch_size": 16, "threads": args.threads,
               "num_documents": sizes["documents"], "encoded": str(tmp / "encoded.json")}
        log(f"{world}: {sizes['documents']} documents ({sizes['windows']} windows, {sizes['tokens']:,} tokens), "
            f"{sizes['queries']} queries, {sizes['layers']} tracked layers; {args.threads} torch thread(s)")
        for repeat in range(repeats):
            for side in sides:
                run = run_side(side, job, tmp / f"{side.replace(' ', '-')}-{repeat}", env)
                log(f"  run {repeat + 1}/{repeats} {side:<12} {run['process wall']:7.1f} s "
                    f"(load {run['load'][0]:.1f} -> {run['load'][1]:.1f})")
                runs[side].append(run)
    checks = {side: agreement(runs[side][0]["scores"], runs["kronfluence"][0]["scores"])
              for side in sides if side != "kronfluence" and "kronfluence" in sides}
    summary = {}
    for side, rs in runs.items():
        keys = ["process wall", *rs[0]["seconds"], *rs[0]["stages"]]
        summary[side] = {k: median_min_max([r.get(k, r["seconds"].get(k, r["stages"].get(k))) for r in rs]) for k in keys}
    rows = [[side, k, f"{v['median']:.2f}", f"{v['min']:.2f}", f"{v['max']:.2f}"]
            for side, figures in summary.items() for k, v in figures.items()]
    print()
    table = print_table(["side", "seconds of", "median", "min", "max"], rows)
    ratios = {}
    if "kronfluence" in summary:
        for side in sides:
            if side != "kronfluence":
                ratios[side] = summary[side]["process wall"]["median"] / summary["kronfluence"]["process wall"]["median"]
        print("process wall, msif / kronfluence: " + ", ".join(f"{s} {r:.2f}x" for s, r in ratios.items()))
        for side, c in checks.items():
            print(f"scores {side} vs kronfluence: {c['pairs']} pairs, per-query Pearson min {c['pearson_min']:.6f}, "
                  f"mean {c['pearson_mean']:.6f}")
    json_path, png_path = result_paths(f"vs_kronfluence_{world}", False, args.out_dir)
    payload = {"command": "python benchmarks/bench_vs_kronfluence.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "msif_commit": provenance(Path(args.msif_path or BENCH))["commit"], "machine": machine() | {"threads": args.threads}, "world": world, "sizes": sizes,
               "summary": summary, "ratios_process_wall": ratios, "agreement": checks,
               "loads": {side: [r["load"] for r in rs] for side, rs in runs.items()}, "table": table}
    write_json(json_path, payload)
    fig, axes = new_figure(1, 1, size=(7.5, 0.6 + 0.5 * len(summary)))
    ax = axes[0][0]
    for row, (side, figures) in enumerate(summary.items()):
        wall = figures["process wall"]
        ax.barh(row, wall["median"], xerr=[[wall["median"] - wall["min"]], [wall["max"] - wall["median"]]], capsize=3)
    ax.set_yticks(range(len(summary)), list(summary))
    ax.set_xlabel(f"seconds, a fresh process to its scores ({world}; median, min-max of {repeats})")
    save_figure(fig, png_path)
    return payload


if __name__ == "__main__":
    main()
