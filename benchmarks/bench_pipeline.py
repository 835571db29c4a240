"""Pipeline benchmarks on the toy world, all measured in one run (one torch thread per worker):

1. ``msif demo`` wall time: first run (toy world and every stage built) and cached rerun, as
   subprocesses, each with its own embedded Ray. ``--fresh`` deletes the cache first.
2. Scaling of the scoring pass from 1 to 2 workers, on the toy corpus replicated 4x.
3. Peak resident memory of a worker, per pass, at two corpus sizes 4x apart (it must not grow).

    python benchmarks/bench_pipeline.py [--workdir DIR] [--fresh] [--out results.json]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from msif_ray.config import config_from_dict
from msif_ray.demo.run import demo_config
from msif_ray.store.layout import MANIFEST
from msif_ray.pipeline.run import Pipeline
from msif_ray.store.storage import RunDir
from msif_ray.demo.toy import build_toy_world


def time_demo(workdir: Path) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "msif_ray.cli", "demo", "--workdir", str(workdir)], check=True,
                   stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def replicated_corpus(source: Path, copies: int, target: Path) -> Path:
    """The toy corpus ``copies`` times over, with fresh ids: same documents, ``copies``x the work."""
    table = pq.read_table(source)
    parts = [table.set_column(table.schema.get_field_index("id"), "id",
                              pa.array([f"{i}-copy{c}" for i in table["id"].to_pylist()])) for c in range(copies)]
    pq.write_table(pa.concat_tables(parts), target, row_group_size=100)
    return target


def run_pipeline(world, corpus: Path, run_dir: Path, workers: int) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    values = demo_config(world, run_dir, workers)
    values["data"]["corpus"]["paths"] = [str(corpus)]
    Pipeline(config_from_dict(values, run_dir.parent), log=lambda line: None).run()
    return RunDir(str(run_dir)).read_json(MANIFEST)


def passes(manifest: dict) -> dict[str, dict]:
    return {f"{stage}/{name}": p for stage, record in manifest["stages"].items()
            for name, p in record.get("passes", {}).items() if "shards_total" in p}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/msif-bench")
    parser.add_argument("--fresh", action="store_true", help="time the demo's first run from an empty cache")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    demo_dir = workdir / "demo"
    if args.fresh:
        shutil.rmtree(demo_dir, ignore_errors=True)
    results: dict = {"threads_per_worker": 1}

    results["demo_first_s"] = round(time_demo(demo_dir), 1)
    results["demo_cached_s"] = round(time_demo(demo_dir), 1)
    print(f"msif demo: first {results['demo_first_s']}s, cached {results['demo_cached_s']}s")

    world = build_toy_world(demo_dir / "world", log=lambda line: None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    small = replicated_corpus(world.corpus_path, 1, workdir / "corpus-x1.parquet")
    large = replicated_corpus(world.corpus_path, 4, workdir / "corpus-x4.parquet")

    scoring, manifests = {}, {}
    for workers in (1, 2):
        manifests[workers] = run_pipeline(world, large, workdir / f"run-x4-w{workers}", workers)
        p = scoring[workers] = passes(manifests[workers])["scores/scores"]
        print(f"scoring pass, {workers} worker(s): {p['seconds']:.1f}s for {p['tokens']} tokens "
              f"({p['tokens'] / p['seconds']:,.0f} tok/s)")
    results["scoring_speedup_2_workers"] = round(scoring[1]["seconds"] / scoring[2]["seconds"], 2)
    results["scoring_seconds"] = {w: p["seconds"] for w, p in scoring.items()}
    print(f"speed-up 1 -> 2 workers: {results['scoring_speedup_2_workers']}x")

    sizes = {"x1": run_pipeline(world, small, workdir / "run-x1-w1", 1), "x4": manifests[1]}
    memory = {name: {k: p["worker_peak_rss_mb"] for k, p in passes(m).items()} for name, m in sizes.items()}
    results["worker_peak_rss_mb"] = memory
    print(f"{'pass':<32}{'peak RSS x1 (MB)':>18}{'peak RSS x4 (MB)':>18}")
    for key in memory["x1"]:
        print(f"{key:<32}{memory['x1'][key]:>18.0f}{memory['x4'][key]:>18.0f}")
    if args.out:
        from common import write_json

        write_json(Path(args.out), {"command": "python benchmarks/bench_pipeline.py " + " ".join(sys.argv[1:])} | results)


if __name__ == "__main__":
    main()
