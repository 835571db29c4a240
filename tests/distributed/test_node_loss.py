"""Losing a node in every pass, and S3 for 30 s, on a real multi-node Ray cluster (``benchmarks/fault_matrix.py``).

The matrix runs in its own process: it starts its own cluster (``ray.cluster_utils.Cluster``, a head
and 2 worker nodes) and S3 server, which cannot share a process with this session's Ray. Per
scenario it runs the pipeline uninterrupted and then again losing the node of one job of each
named pass, or S3 for 30 s; this test checks its JSON: every fault happened as asked, the top k equals the
uninterrupted run's (same documents and ranks; scores within rtol 1e-4, as in test_pipeline.py:
which worker sums which shard changes float32 summation order), and every pass counted each
document, token and shard exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import fault_matrix  # noqa: E402


@pytest.mark.slow
def test_every_pass_survives_losing_its_node_or_s3(tmp_path):
    out = tmp_path / "faults.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fault_matrix.py"), "--out", str(out)],
                   check=True, timeout=1500, env=env, cwd=ROOT)
    results = json.loads(out.read_text())["results"]
    assert set(results) == set(fault_matrix.SCENARIOS)
    for name, scenario in fault_matrix.SCENARIOS.items():
        r = results[name]
        lost = [e["pass"] for e in r["events"] if e["fault"] == "node lost"]
        assert lost == list(scenario.lose_node_in), f"{name}: a node was not lost where asked"
        if scenario.s3_outage:
            assert r["s3_requests_dropped"] > 0, f"{name}: the outage met no request"
        topk, reference = r["topk"], r["reference_topk"]
        assert topk["doc_id"] and (topk["query_id"], topk["rank"], topk["doc_id"]) == (
            reference["query_id"], reference["rank"], reference["doc_id"])
        assert topk["score"] == pytest.approx(reference["score"], rel=1e-4, abs=1e-6)
        assert r["report"]["documents_shown"] > 0 and fault_matrix.identical_report(r["report"]), name
        for pass_name, counts in r["passes"].items():
            assert counts["documents"][0] == counts["documents"][1], f"{name} {pass_name}: documents"
            assert counts["tokens"][0] == counts["tokens"][1], f"{name} {pass_name}: tokens"
            assert counts["shards"][0], f"{name} {pass_name}: not the same shards"
        for pass_name in scenario.lose_node_in:
            record = fault_matrix.pass_record(r["passes"], pass_name)
            assert (record is None and pass_name in ("reduce", "report")) or record["handed_out_again"] >= 1, pass_name
