"""``msif query`` latency on the demo world in index mode (the defaults: 512 terms, re-scoring rounds).

    python benchmarks/bench_query.py [--workdir DIR] [--smoke]

Builds the demo's toy world (``ToySpec()``, cached), runs it in ``scoring.mode: index`` with
``Pipeline.run`` (embedded Ray, 1 worker of 1 CPU), then times one query: ``msif query`` as a fresh
process, and ``ops.query.ask`` four times in this process (each call loads the models again).
Writes ``results/query.json``; ``--smoke`` runs the small toy world (CI) and writes ``query.smoke.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from common import cache_dir, result_paths, setup, write_json


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(cache_dir() / "query-latency"))
    parser.add_argument("--smoke", action="store_true", help="the small toy world (CI)")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    setup(1)
    import ray

    from msif_ray.config import config_from_dict
    from msif_ray.demo.run import demo_config
    from msif_ray.demo.toy import ToySpec, build_toy_world
    from msif_ray.ops.query import ask
    from msif_ray.pipeline.run import Pipeline
    from msif_ray.store.data import PromptCompletion

    root = Path(args.workdir)
    world = build_toy_world(root / "world", ToySpec.small() if args.smoke else ToySpec(), 0, log=lambda *a: None)
    values = demo_config(world, root / "run", 1)
    values["scoring"] |= {"mode": "index"}
    values["ray"] |= {"num_cpus_per_worker": 1}
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    Pipeline(config_from_dict(values, root), log=lambda line: None).run()
    if started_ray:
        ray.shutdown()
    q = json.loads(world.queries_path.read_text().splitlines()[0])
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "msif_ray", "query", str(root / "run"), "--prompt", q["prompt"],
                    "--completion", q["completion"]], check=True, capture_output=True)
    fresh = time.perf_counter() - started
    calls, answer = [], None
    for _ in range(4):
        started = time.perf_counter()
        (answer,) = ask(str(root / "run"), [PromptCompletion(q["id"], q["prompt"], q["completion"])], log=lambda line: None)
        calls.append(time.perf_counter() - started)
    out = {"fresh_process_s": fresh, "ask_s": calls, "last_call_steps_s": answer.seconds,
           "candidates_rescored": answer.candidates}
    print(json.dumps(out, indent=1))
    json_path, _ = result_paths("query", args.smoke, args.out_dir)
    write_json(json_path, {"command": "python benchmarks/bench_query.py " + " ".join(argv or sys.argv[1:]), **out})
    return out


if __name__ == "__main__":
    main()
