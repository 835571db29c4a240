"""``msif demo``: the toy world end to end on local Ray, scored against its known gold documents."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import yaml

from msif_ray.config import load_config
from msif_ray.pipeline.run import Pipeline
from msif_ray.demo.toy import ToySpec, build_toy_world


def demo_run_dir(workdir: Path) -> Path:
    return workdir / "run"


def demo_config(world, run_dir: Path, num_workers: int) -> dict:
    return {
        "run_dir": str(run_dir),
        "models": {"pretrained": str(world.pretrained_dir), "finetuned": str(world.finetuned_dir)},
        "data": {
            "max_length": 64,
            "rows_per_shard": 100,
            "corpus": {"paths": [str(world.corpus_path)]},
            "finetune": {"paths": [str(world.finetune_path)]},
            "queries": {"paths": [str(world.queries_path)]},
        },
        "method": "multi_stage",
        "scoring": {"top_k": 10},
        "ray": {"num_workers": num_workers, "batch_size": 16},
    }


def retrieval_metrics(topk_path: str, gold: dict[str, list[str]], cutoff: int = 10) -> tuple[float, float]:
    """MRR of the first gold document, and Recall@cutoff of the gold documents, averaged over queries."""
    table = pq.read_table(topk_path).to_pylist()
    ranked: dict[str, list[str]] = {}
    for row in table:
        ranked.setdefault(row["query_id"], []).append(row["doc_id"])
    reciprocal, recall = [], []
    for query_id, gold_ids in gold.items():
        docs = ranked.get(query_id, [])
        first = next((i for i, d in enumerate(docs) if d in gold_ids), None)
        reciprocal.append(0.0 if first is None else 1.0 / (first + 1))
        recall.append(len(set(docs[:cutoff]) & set(gold_ids)) / len(gold_ids))
    return sum(reciprocal) / len(reciprocal), sum(recall) / len(recall)


def run_demo(workdir: Path, num_workers: int = 2, show: int = 3, spec: ToySpec = ToySpec()) -> tuple[float, float]:
    """Build (or reuse) the toy world, run the pipeline and its report, print examples; returns (MRR, Recall@10)."""
    from msif_ray.report.build import build_report

    world = build_toy_world(workdir / "world", spec)
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(demo_config(world, demo_run_dir(workdir), num_workers), sort_keys=False))
    config = load_config(config_path)
    topk = Pipeline(config).run()  # starts Ray (or joins ray.address) under the lock, as msif run does

    texts = {row["id"]: row["text"] for row in pq.read_table(world.corpus_path, columns=["id", "text"]).to_pylist()}
    queries = {q["id"]: q for q in _read_jsonl(world.queries_path)}
    gold = world.gold()
    rows = pq.read_table(topk).to_pylist()
    for query_id in list(gold)[:show]:
        q = queries[query_id]
        print(f"\nquery {query_id}: {q['prompt']!r} -> {q['completion']!r}")
        for row in [r for r in rows if r["query_id"] == query_id][:3]:
            mark = "*" if row["doc_id"] in gold[query_id] else " "
            print(f"  {mark} #{row['rank']} {row['doc_id']} score {row['score']:+.3g}  {texts[row['doc_id']][:90]!r}")
    mrr, recall = retrieval_metrics(topk, gold)
    print(f"\n{len(gold)} queries: MRR {mrr:.3f}  Recall@10 {recall:.3f}  (* = a gold document)")
    build_report(config.run_dir, reuse=True)
    return mrr, recall


def _read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
