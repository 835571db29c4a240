"""What a night costs: nights on one run directory when nothing, 10 queries, 5% of the corpus or the fine-tune is new.

    python benchmarks/bench_nightly.py [--smoke]

World: the index benchmark's scale world (``bench_index.scale_world``: ``ToySpec(num_entities=160,
num_query_entities=100, num_filler_docs=18800)``, built once and cached; filler texts that repeat
are dropped, so every text is distinct), its corpus written as files of ``ROWS`` rows (one shard
each). One file (``ROWS`` rows, ~5% of the corpus) and 10 queries are held back.

Config: multi_stage, ``scoring.mode: index`` (default ``index.dim`` and ``scoring.rerank``),
``factors.max_examples: 2000``, ``data.max_length: 64``, ``rows_per_shard: 1000``, top 10, an
embedded Ray with 1 worker of 1 CPU, batch 16, 1 torch thread.

Nights, each a fresh ``python -m msif_ray nightly CONFIG --date D`` process on one run directory
(so each pays what a real night pays: process start, imports, validation and digests, Ray start,
the worker's start and model loads, the report and the publication):

  1  fresh: every stage (the denominator)
  2  nothing new
  3  10 new queries appended to the queries file
  4  the held-back corpus file appended to ``data.corpus.paths`` (pre-training factors kept)
  5  a new fine-tuned checkpoint (the fine-tuned weights perturbed, saved to a new directory the
     config then points to)

and, for the denominator's sake, night 1's inputs in exact mode (``scoring.mode: exact``) on a
new run directory. Per night: wall time of the process, its fraction of night 1's, and per stage
(from ``nights/<date>/night.json``) recomputed or reused, shards computed / total, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from common import print_table, result_paths, new_figure, save_figure, setup, write_json

ROWS, SMOKE_ROWS = 1000, 40            # rows per corpus file = data.rows_per_shard
NEW_QUERIES, SMOKE_NEW_QUERIES = 10, 2
FIRST_QUERIES = 100                    # queries of night 1 (the smoke world has fewer: all but the held-back ones)
MAX_EXAMPLES, SMOKE_MAX_EXAMPLES = 2000, 100
TOP = 10
TIMING = "1 torch thread; embedded Ray, 1 worker with 1 CPU; each night a fresh `python -m msif_ray nightly` process"
NIGHTS = [("2026-01-01", "1 fresh"), ("2026-01-02", "2 nothing new"), ("2026-01-03", "3 +10 queries"),
          ("2026-01-04", "4 +5% corpus (1 file)"), ("2026-01-05", "5 new fine-tune")]
EXACT = ("2026-01-01", "exact mode, fresh (night 1's inputs)")


def log(line: str) -> None:
    print(line, flush=True)


def write_corpus(corpus, folder: Path, rows: int) -> tuple[list[Path], Path]:
    """The corpus as files of ``rows`` rows; returns the files of night 1 and the held-back one (a full file)."""
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, lo in enumerate(range(0, corpus.num_rows, rows)):
        path = folder / f"corpus-{i:03d}.parquet"
        pq.write_table(corpus.slice(lo, rows), path, row_group_size=rows)
        files.append(path)
    held = max(i for i, f in enumerate(files) if pq.read_metadata(f).num_rows == rows)  # the last full file
    return [f for i, f in enumerate(files) if i != held], files[held]


def perturbed_checkpoint(source: Path, target: Path, scale: float = 1e-3, seed: int = 1) -> Path:
    """A "new fine-tune": ``source``'s weights moved by ``scale`` x N(0, 1) x their RMS, saved to ``target``
    with the same tokenizer files."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(source, target)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.pow(2).mean().sqrt() * torch.randn(p.shape, generator=generator))
    model.save_pretrained(target, safe_serialization=True)
    return target


def night(config: Path, date: str, logs: Path) -> float:
    """One ``msif nightly`` process; returns its wall seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    out = logs / f"{config.stem}-{date}.log"
    started = time.perf_counter()
    with out.open("w") as f:
        code = subprocess.run([sys.executable, "-m", "msif_ray", "nightly", str(config), "--date", date],
                              stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"msif nightly {config} --date {date} exited {code}:\n{out.read_text()[-3000:]}")
    return seconds


def read_night(run_dir: str, date: str, log_path: Path) -> dict:
    """The night's record, with the pipeline's own time (its ``done in X s`` line) and the report's."""
    from msif_ray.store import layout
    from msif_ray.store.storage import RunDir

    store = RunDir(run_dir)
    record = store.read_json(layout.night_record(date))
    done = [line for line in log_path.read_text().splitlines() if line.startswith("done in ")]
    record["pipeline_seconds"] = float(done[-1].split()[2].rstrip("s:")) if done else float("nan")
    report = store.read_json("report/report.json") if store.exists("report/report.json") else {}
    skipped = any(line.startswith("[report] up to date") for line in log_path.read_text().splitlines())
    record["report_seconds"] = 0.0 if skipped else float(report.get("seconds", 0.0))
    return record


def describe(record: dict) -> dict:
    """Per stage of a night record: recomputed, shards computed / total (all passes), seconds."""
    out = {}
    for name, stage in record["stages"].items():
        passes = stage["passes"].values()
        out[name] = {"recomputed": stage["recomputed"], "seconds": stage["seconds"],
                     "shards_computed": sum(p["computed"] for p in passes),
                     "shards_total": sum(p["shards_total"] for p in passes),
                     "passes": {n: [p["computed"], p["shards_total"]] for n, p in stage["passes"].items()}}
    return out


def cell(stage: dict) -> str:
    word = "recomputed" if stage["recomputed"] else "reused"
    shards = f" {stage['shards_computed']}/{stage['shards_total']}" if stage["shards_total"] else ""
    seconds = f", {stage['seconds']:.1f} s" if stage["recomputed"] or stage["seconds"] >= 0.05 else ""
    return f"{word}{shards}{seconds}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--workdir", default=None, help="keep the run directories here (default: a temporary folder)")
    parser.add_argument("--from-raw", default=None, help="only the tables and figure, from a run's raw.json")
    args = parser.parse_args(argv)
    setup(1)
    if args.from_raw:
        return summarize(json.loads(Path(args.from_raw).read_text()), args, argv)
    from bench_index import scale_world

    rows = SMOKE_ROWS if args.smoke else ROWS
    new_queries = SMOKE_NEW_QUERIES if args.smoke else NEW_QUERIES
    world, corpus, duplicates, queries_a, queries_b = scale_world(args)
    queries = queries_a + queries_b
    first = min(FIRST_QUERIES, len(queries) - new_queries)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        shutil.rmtree(root / "bench-nightly", ignore_errors=True)
        root = root / "bench-nightly"
        logs = root / "logs"
        logs.mkdir(parents=True)
        initial, held = write_corpus(corpus, root / "corpus", rows)
        queries_path = root / "queries.jsonl"
        queries_path.write_text("".join(json.dumps(q) + "\n" for q in queries[:first]))
        values = {
            "run_dir": str(root / "run"),
            "models": {"pretrained": str(world.pretrained_dir), "finetuned": str(world.finetuned_dir)},
            "data": {"max_length": 64, "rows_per_shard": rows, "corpus": {"paths": [str(p) for p in initial]},
                     "finetune": {"paths": [str(world.finetune_path)]}, "queries": {"paths": [str(queries_path)]}},
            "method": "multi_stage",
            "factors": {"max_examples": SMOKE_MAX_EXAMPLES if args.smoke else MAX_EXAMPLES},
            "scoring": {"mode": "index", "top_k": TOP},
            "ray": {"num_workers": 1, "batch_size": 16, "num_cpus_per_worker": 1},
        }
        config = root / "nightly.yaml"
        n_initial = corpus.num_rows - held_rows(held)
        facts = {"documents, night 1": n_initial, "documents appended (night 4)": held_rows(held),
                 "appended fraction": held_rows(held) / n_initial, "corpus files, night 1": len(initial),
                 "rows per file = rows_per_shard": rows, "duplicate texts dropped": duplicates,
                 "queries, night 1": first, "queries appended (night 3)": new_queries}
        walls, records = {}, {}
        for date, name in NIGHTS:
            if name.startswith("3"):
                with queries_path.open("a") as f:
                    f.write("".join(json.dumps(q) + "\n" for q in queries[first:first + new_queries]))
            if name.startswith("4"):
                values["data"]["corpus"]["paths"].append(str(held))
            if name.startswith("5"):
                values["models"]["finetuned"] = str(perturbed_checkpoint(world.finetuned_dir, root / "finetuned-2"))
            config.write_text(yaml.safe_dump(values))
            log(f"[bench] night {name} ({date})")
            walls[name] = night(config, date, logs)
            records[name] = read_night(values["run_dir"], date, logs / f"{config.stem}-{date}.log")
            log(f"[bench] night {name}: {walls[name]:.1f} s wall")
        # the denominator in exact mode: night 1's inputs, a new run directory
        exact = json.loads(json.dumps(values))
        exact["run_dir"] = str(root / "run-exact")
        exact["data"]["corpus"]["paths"] = [str(p) for p in initial]
        exact["models"]["finetuned"] = str(world.finetuned_dir)
        exact["scoring"]["mode"] = "exact"
        exact_config = root / "exact.yaml"
        exact_config.write_text(yaml.safe_dump(exact))
        queries_path.write_text("".join(json.dumps(q) + "\n" for q in queries[:first]))
        log(f"[bench] {EXACT[1]}")
        walls[EXACT[1]] = night(exact_config, EXACT[0], logs)
        records[EXACT[1]] = read_night(exact["run_dir"], EXACT[0], logs / f"{exact_config.stem}-{EXACT[0]}.log")
        raw = {"walls": walls, "records": records, "facts": facts}
        (root / "raw.json").write_text(json.dumps(raw, indent=1))
    return summarize(raw, args, argv)


def summarize(raw: dict, args, argv) -> dict:
    walls, records, facts = raw["walls"], raw["records"], raw["facts"]
    base = walls[NIGHTS[0][1]]
    nights = {}
    for name, wall in walls.items():
        stages = describe(records[name])
        recomputed = sum(s["seconds"] for s in stages.values())  # 0 for a reused stage
        run, report = records[name]["pipeline_seconds"], records[name]["report_seconds"]
        nights[name] = {"wall_seconds": wall, "fraction_of_night_1": wall / base, "stages": stages,
                        "stage_seconds": recomputed, "pipeline_seconds": run, "report_seconds": report,
                        "outside_stages_seconds": wall - recomputed,
                        "fixed_seconds": wall - run - report,  # process, imports, validation + digests, Ray, publish
                        "record_seconds": records[name]["seconds"]}
    stage_names = ["factors/finetune", "factors/pretrain", "queries", "index", "scores"]
    log(f"\nnights: {facts['documents, night 1']} documents in {facts['corpus files, night 1']} files, "
        f"{facts['queries, night 1']} queries; {TIMING}")
    tables = {
        "nights": print_table(
            ["night", "wall s", "x night 1", "in stages s", "Pipeline.run s", "report s",
             "process + validation + Ray + publish s"],
            [[name, f"{n['wall_seconds']:.1f}", f"{n['fraction_of_night_1']:.3f}", f"{n['stage_seconds']:.1f}",
              f"{n['pipeline_seconds']:.1f}", f"{n['report_seconds']:.1f}", f"{n['fixed_seconds']:.1f}"]
             for name, n in nights.items()]),
        "stages": print_table(
            ["night"] + stage_names,
            [[name] + [cell(n["stages"][s]) if s in n["stages"] else "—" for s in stage_names]
             for name, n in nights.items()]),
        "facts": print_table(["", ""], [[k, f"{v:.3f}" if isinstance(v, float) else str(v)] for k, v in facts.items()]),
    }
    json_path, png_path = result_paths("nightly", args.smoke, args.out_dir)
    payload = {"command": "python benchmarks/bench_nightly.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "timing": TIMING, "facts": facts, "nights": nights, "tables": tables}
    write_json(json_path, payload)
    figure(nights, png_path)
    return payload


def held_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def figure(nights: dict, png_path: Path) -> None:
    fig, axes = new_figure(1, 1, size=(8.0, 3.6))
    ax = axes[0][0]
    names = list(nights)
    for row, name in enumerate(names):
        n = nights[name]
        ax.barh(row, n["stage_seconds"], color="tab:blue")
        ax.barh(row, n["outside_stages_seconds"], left=n["stage_seconds"], color="tab:gray")
        ax.text(n["wall_seconds"], row, f" {n['wall_seconds']:.0f} s ({n['fraction_of_night_1']:.2f}x)",
                va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("wall seconds per night (blue: in stages, grey: process, Ray, loads, report)")
    ax.set_xlim(0, max(n["wall_seconds"] for n in nights.values()) * 1.3)
    save_figure(fig, png_path)


if __name__ == "__main__":
    main()
