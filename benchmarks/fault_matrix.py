"""The fault matrix: `msif run` on a real multi-node Ray cluster, losing a node in every pass.

    python benchmarks/fault_matrix.py [--out benchmarks/results/faults.json] [--doc docs/reliability.md]

Setting: ``ray.cluster_utils.Cluster`` with a head (no CPU for work) and 2 worker nodes of 1 CPU
each, every node its own raylet and object store; the run directory on S3 (a moto server on
127.0.0.1 behind the tests' fault proxy), so that workers on every node share it, as on a real
cluster. World: the pipeline tests' tiny world (``tests/support/world.py``), 2 workers of 1 torch
thread.

Per scenario (``SCENARIOS``: a method and scoring mode, and faults), an uninterrupted run (one per
settings), then a faulted run on a fresh run directory:

- a node lost in each pass named: one job of each hangs (``MSIF_FAULT_INJECT=<pass>:hang,...``),
  its worker recording its node in ``_faults/<pass>``; this script then removes that node
  (``Cluster.remove_node``: its raylet, object store and workers die) and adds a fresh one. Ray
  restarts the lost actor on the new node and the pool hands the job out again;
- S3 unreachable (every connection closed unanswered by the proxy) for some seconds from the start
  of a stage: storage operations are retried until it is back.

Every run also builds its report, as ``msif run`` does (the report pass, ``report``, on actors of
its own). Per fault it records what it cost (the pass's seconds against the uninterrupted run's, the jobs
handed out again); per run whether the top k equals the uninterrupted run's (same documents and
ranks, scores within rtol 1e-4: which worker sums which shard changes float32 summation order), whether
the report shows the same documents with the same per-layer and per-token scores (rtol 1e-4), and
whether every pass counted every document and token exactly once (the manifest's counts against
the uninterrupted run's). ``tests/benchmarks/test_fault_matrix.py`` runs it and asserts all of
that; ``--doc`` rewrites the matrix in docs/reliability.md from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]

from common import print_table, result_paths, write_json  # noqa: E402

EXACT = {"method": "multi_stage"}
INDEX = {"method": "grad_dot", "scoring.mode": "index", "index.terms": 16, "scoring.rerank": 3}


@dataclass(frozen=True)
class Scenario:
    """Settings, the passes in which a node is lost, and a stage during which S3 is unreachable (seconds)."""

    settings: dict
    lose_node_in: tuple[str, ...] = ()
    s3_outage: tuple[str, float] | None = None


SCENARIOS = {
    "multi_stage exact": Scenario(EXACT, ("factors/finetune/covariance", "reduce", "factors/pretrain/lambdas",
                                          "precondition", "scores", "report")),
    "grad_dot index": Scenario(INDEX, ("index", "scan", "rerank")),
    "multi_stage exact + S3 down": Scenario(EXACT, s3_outage=("scores", 30.0)),
}
SAFETY_DEADLINE = 180  # seconds; a job of the tiny world takes a few
TIMING = "2 worker nodes of 1 CPU (ray.cluster_utils.Cluster on one 2-core VM), 2 workers of 1 torch thread"


def log(line: str) -> None:
    print(line, flush=True)


def start_s3():
    """A moto server behind the tests' fault proxy, and this process's (and Ray's) S3 clients on it."""
    import logging

    from moto.server import ThreadedMotoServer
    from s3_fixture import FaultProxy, _free_port

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = FaultProxy(("127.0.0.1", port))
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
                      AWS_ENDPOINT_URL=proxy.endpoint, AWS_MAX_ATTEMPTS="2")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        os.environ.pop(name, None)
    import s3fs

    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem().mkdir(bucket)
    return server, proxy, f"s3://{bucket}"


def run_pipeline(world, run_dir: str, settings: dict) -> tuple[dict, dict, float, dict]:
    """One ``Pipeline.run`` and its report, as ``msif run`` does: (topk as columns, manifest, seconds, the
    report's breakdowns as columns). Its jobs' deadline (``SAFETY_DEADLINE``) ends a hang that no node
    loss ended (the node watcher failed), so that the script cannot hang."""
    from msif_ray.config import config_from_dict
    from msif_ray.pipeline.run import Pipeline
    from msif_ray.report.build import build_report
    from msif_ray.store.layout import BREAKDOWNS, MANIFEST, TOPK
    from msif_ray.store.storage import RunDir

    config = config_from_dict(world.config(run_dir, **settings, **{"ray.num_workers": 2,
                                                                   "ray.task_timeout_s": SAFETY_DEADLINE}),
                              base_dir=world.root)
    start = time.monotonic()
    Pipeline(config, log=lambda line: None).run()
    build_report(run_dir, log=lambda line: None)
    seconds = time.monotonic() - start
    store = RunDir(run_dir)
    return store.read_parquet(TOPK).to_pydict(), store.read_json(MANIFEST), seconds, store.read_parquet(BREAKDOWNS).to_pydict()


def pass_records(manifest: dict) -> dict[str, dict]:
    """``<stage>/<pass>`` -> the pass's manifest record, for every pass of every stage."""
    return {f"{stage}/{name}": record for stage, s in manifest["stages"].items() for name, record in s.get("passes", {}).items()
            if isinstance(record, dict) and "documents" in record}


def watch(cluster, proxy, store, scenario: Scenario, finished: threading.Event) -> list[dict]:
    """Until ``finished``: for each new ``_faults/<pass>`` marker, remove the node it names and add a
    fresh one; once the manifest shows the outage's stage, make S3 unreachable for its seconds."""
    from msif_ray.store.layout import MANIFEST

    events, seen = [], set()
    by_marker = {f"_faults/{p.replace('/', '_')}": p for p in scenario.lose_node_in}
    outage = scenario.s3_outage
    while not finished.is_set():
        if outage and store.exists(MANIFEST) and outage[0] in store.read_json(MANIFEST)["stages"]:
            proxy.outage(outage[1])
            events.append({"pass": outage[0], "fault": f"S3 unreachable {outage[1]:.0f} s"})
            log(f"  S3 unreachable for {outage[1]:.0f} s, from the start of {outage[0]}")
            outage = None
        for name in (n for n in store.list("_faults") if n not in seen):
            seen.add(name)
            where = store.read_json(name)
            node = next(n for n in cluster.list_all_nodes() if n.node_id == where["node_id"])
            start = time.monotonic()
            cluster.remove_node(node)
            cluster.add_node(num_cpus=1)
            events.append({"pass": by_marker[name], "fault": "node lost", "node": where["node_id"][:12],
                           "replaced_in_s": round(time.monotonic() - start, 2)})
            log(f"  lost the node of {events[-1]['pass']}; a fresh one joined in {events[-1]['replaced_in_s']} s")
        time.sleep(0.5)
    return events


def faulted_run(cluster, proxy, world, run_dir: str, scenario: Scenario) -> tuple[dict, dict, float, dict, list[dict]]:
    """A run with the faults of ``scenario``: one job of each of its passes hangs until its node is lost."""
    from msif_ray.distributed.faults import FAULT_ENV
    from msif_ray.store.storage import RunDir

    os.environ[FAULT_ENV] = ",".join(f"{p}:hang" for p in scenario.lose_node_in)
    finished, result = threading.Event(), {}

    def target() -> None:
        try:
            result["run"] = run_pipeline(world, run_dir, scenario.settings)
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            result["error"] = err
        finally:
            finished.set()

    thread = threading.Thread(target=target)
    thread.start()
    try:
        events = watch(cluster, proxy, RunDir(run_dir), scenario, finished)
    finally:
        thread.join()
        del os.environ[FAULT_ENV]
    if "error" in result:
        raise result["error"]
    return (*result["run"], events)


def close(xs: list[float], ys: list[float], rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    return len(xs) == len(ys) and all(abs(x - y) <= rtol * abs(y) + atol for x, y in zip(xs, ys))


def same_topk(a: dict, b: dict) -> bool:
    return (a["query_id"], a["rank"], a["doc_id"]) == (b["query_id"], b["rank"], b["doc_id"]) and close(a["score"], b["score"])


def report_difference(a: dict, b: dict) -> dict:
    """How the report's breakdowns ``a`` differ from ``b``'s: whether the same documents are shown, and
    the largest difference of a per-layer or per-token score relative to the largest of its document
    (the parts of one score: their float32 noise follows the score's size, not each part's)."""
    deviation = max((max(abs(p - q) for p, q in zip(x, y)) / max(max(map(abs, y)), 1e-12)
                     for key in ("layer_scores", "token_scores") for x, y in zip(a[key], b[key]) if y), default=0.0)
    return {"documents_shown": len(a["doc_id"]),
            "same_documents": (a["query_id"], a["side"], a["doc_id"]) == (b["query_id"], b["side"], b["doc_id"]),
            "largest_relative_difference": deviation}


def run_scenario(cluster, proxy, world, bucket: str, name: str, scenario: Scenario, references: dict) -> dict:
    """The faulted run of ``scenario`` against the uninterrupted run of its settings (one per settings)."""
    key = json.dumps(scenario.settings, sort_keys=True)
    if key not in references:
        log(f"[{name}] uninterrupted run")
        references[key] = run_pipeline(world, f"{bucket}/{uuid.uuid4().hex[:8]}", scenario.settings)
    reference, reference_manifest, reference_seconds, reference_report = references[key]
    log(f"[{name}] uninterrupted: {reference_seconds:.1f} s; now with faults")
    dropped = proxy.failed
    topk, manifest, seconds, report, events = faulted_run(cluster, proxy, world, f"{bucket}/{uuid.uuid4().hex[:8]}", scenario)
    dropped = proxy.failed - dropped
    log(f"[{name}] {seconds:.1f} s" + (f"; {dropped} S3 requests dropped" if dropped else ""))
    expected, got = pass_records(reference_manifest), pass_records(manifest)
    counts = {p: {"documents": [got[p]["documents"], r["documents"]], "tokens": [got[p]["tokens"], r["tokens"]],
                  "shards": [sorted(got[p]["per_shard"]) == sorted(r["per_shard"]), r["shards_total"]],
                  "handed_out_again": len(got[p]["retried_after_crash"]),
                  "seconds": [got[p]["seconds"], r["seconds"]]}
              for p, r in expected.items()}
    return {"settings": scenario.settings, "lose_node_in": list(scenario.lose_node_in), "s3_outage": scenario.s3_outage,
            "events": events, "s3_requests_dropped": dropped, "seconds": [round(seconds, 2), round(reference_seconds, 2)],
            "identical_topk": same_topk(topk, reference), "topk": topk, "reference_topk": reference, "passes": counts,
            "report": report_difference(report, reference_report),
            "exactly_once": all(c["documents"][0] == c["documents"][1] and c["tokens"][0] == c["tokens"][1] and c["shards"][0]
                                for c in counts.values())}


def identical_report(difference: dict) -> bool:
    return difference["same_documents"] and difference["largest_relative_difference"] <= 1e-4


def pass_record(counts: dict[str, dict], pass_name: str) -> dict | None:
    """The manifest counts of the pass a fault was injected in (None for reduce jobs, which have none)."""
    return next((c for key, c in counts.items() if key == pass_name or key.endswith("/" + pass_name)), None)


def matrix_rows(results: dict) -> list[list[object]]:
    """Per lost node: scenario, pass, the pass's jobs handed out again, its seconds against the
    uninterrupted run's, how long the fresh node took to join; per run: the outcome."""
    rows = []
    for name, r in results.items():
        for event in r["events"]:
            record = pass_record(r["passes"], event["pass"])
            again, seconds = ((record["handed_out_again"], "{:.1f} vs {:.1f}".format(*record["seconds"])) if record
                              else ("-", "-"))
            rows.append([name, event["pass"], event["fault"], again, seconds,
                         f"{event['replaced_in_s']:.1f}" if "replaced_in_s" in event else ""])
        same = r["identical_topk"] and identical_report(r["report"]) and r["exactly_once"]
        outcome = "identical top-k and report, every document once" if same else "DIFFERENT"
        rows.append([name, f"whole run: {outcome}", f"{len(r['events'])} fault(s)", "",
                     "{:.0f} vs {:.0f}".format(*r["seconds"]), ""])
    return rows


HEADERS = ["scenario", "pass", "fault", "jobs handed out again", "seconds (vs uninterrupted)", "new node up (s)"]
BEGIN, END = "<!-- fault matrix: generated by benchmarks/fault_matrix.py --doc; do not edit -->", "<!-- end of fault matrix -->"


def write_doc(doc: Path, table: str, json_path: Path) -> None:
    """Replace the generated block of ``doc`` with ``table``, the matrix."""
    text = doc.read_text()
    block = f"{BEGIN}\nFrom `{json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path}` ({TIMING}):\n\n{table}\n{END}"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    doc.write_text(head + block + tail)
    log(f"wrote {doc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="the JSON (default benchmarks/results/faults.json)")
    parser.add_argument("--doc", type=Path, default=None, help="rewrite the matrix in this Markdown file")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="names of SCENARIOS, comma-separated")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = args.out or result_paths("faults", smoke=False)[0]
    server, proxy, bucket = start_s3()
    import ray
    from ray.cluster_utils import Cluster
    from world import build_world

    world = build_world(Path(tempfile.mkdtemp(prefix="msif-faults-")) / "world")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        references: dict = {}
        results = {name: run_scenario(cluster, proxy, world, bucket, name, SCENARIOS[name], references)
                   for name in args.scenarios.split(",")}
    finally:
        ray.shutdown()
        cluster.shutdown()
        proxy.stop()
        server.stop()
    table = print_table(HEADERS, matrix_rows(results))
    write_json(out, {"command": " ".join(["python", *sys.argv]), "timing": TIMING, "results": results})
    if args.doc:
        write_doc(args.doc, table, out)


if __name__ == "__main__":
    main()
