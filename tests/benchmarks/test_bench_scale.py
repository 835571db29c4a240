"""benchmarks/bench_scale.py at its smoke size, every section, so that none of them can rot.

The figures of a smoke run say nothing about speed; the checks are on shape and on the invariants
the benchmark exists to show (the tree merge's driver memory does not grow with the shards, every
section reports).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_scale_smoke(tmp_path):
    out = tmp_path / "scale.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--smoke", "--workdir",
                    str(tmp_path / "work"), "--out", str(out)], check=True, cwd=ROOT, timeout=900,
                   capture_output=True)
    results = json.loads(out.read_text())
    assert {"plan", "precondition", "scoring", "rank", "merge", "factors", "memory"} <= results.keys()
    assert [row["rank"] for row in results["rank"]["table"]][-1] == "full"
    assert results["rank"]["table"][-1]["pearson_mean"] == 1.0
    merges = results["merge"]
    assert merges[-1]["driver_peak_mb"] < 1.2 * merges[0]["driver_peak_mb"]
    assert [row["shards"] for row in results["factors"]] == [1, results["factors"][1]["shards"]]
    assert results["factors"][0]["checkpoints"] <= results["factors"][1]["checkpoints"] <= 4  # per worker, not per shard
    six_b = [row for row in results["plan"]["rows"] if row["shape"] == "6.9b"]
    assert all(row["layer_groups"] > 1 for row in six_b)  # its factors do not fit one H200 beside the model
