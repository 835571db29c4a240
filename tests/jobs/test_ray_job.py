"""jobs/submit.py and the run entrypoint, against a local Ray head started by the test."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from msif_ray.store.layout import TOPK

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A separate local Ray head (with the job server), in its own temp dir.

    ``ray stop`` would stop every Ray on the machine, the test session's too, so the head's
    processes are found by their temp dir and killed.
    """
    ray = str(Path(sys.executable).with_name("ray"))
    temp_dir = tempfile.mkdtemp(prefix="msif-job-", dir="/tmp")  # short: Ray's socket paths are length-limited
    gcs_port, dashboard_port, agent_port = free_port(), free_port(), free_port()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "token"  # the head and the job client share the local token (~/.ray/auth_token)
    subprocess.run([ray, "start", "--head", "--num-cpus=2", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard_port}", "--include-dashboard=true", "--disable-usage-stats",
                    # the agent's default port (52365) is taken by the test session's own Ray
                    f"--dashboard-agent-listen-port={agent_port}",
                    f"--temp-dir={temp_dir}"], env=env, check=True, capture_output=True, timeout=180)
    try:
        yield ray, f"http://127.0.0.1:{dashboard_port}", env
    finally:
        for process in psutil.process_iter(["cmdline"]):
            if temp_dir in " ".join(process.info["cmdline"] or []):
                process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_submit_script_runs_the_pipeline_once_per_config_and_date(world, ray_head, tmp_path):
    """jobs/submit.py (ray job submit, no wait) → SUCCEEDED → results; the same id again runs nothing."""
    ray, address, env = ray_head
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(world.config(tmp_path / "run", method="single_stage", **{"ray.num_workers": 2})))
    command = [sys.executable, str(REPO / "jobs" / "submit.py"), str(config), "--address", address,
               "--date", "2026-11-30", "--python", sys.executable]
    deadline = time.monotonic() + 120
    while True:  # the head's job agent takes a few seconds to come up after `ray start`
        job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if "No available agent" not in job.stderr or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    [job_id] = re.findall(r"submitted (msif-run-job-[0-9a-f]{8}-2026-11-30)", job.stdout)
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"{job_id}: already submitted" in again.stdout, again.stdout + again.stderr

    def ray_job(*args: str) -> str:  # the documented commands: ray job status | logs | list
        return subprocess.run([ray, "job", *args, "--address", address], env=env, capture_output=True, text=True,
                              timeout=120).stdout

    deadline = time.monotonic() + 300
    while not re.search(r"\b(succeeded|failed|stopped)\b", status := ray_job("status", job_id), re.IGNORECASE):
        assert time.monotonic() < deadline, f"{job_id} still running: {status}"
        time.sleep(2)
    logs = ray_job("logs", job_id)
    assert f"Job '{job_id}' succeeded" in status, logs[-3000:]
    assert "[scores] shards 4/4" in logs  # the driver's progress lines reach the job log
    assert ray_job("list").count(f"submission_id='{job_id}'") == 1
    topk = pq.read_table(tmp_path / "run" / TOPK)
    assert set(topk["query_id"].to_pylist()) == {"q0", "q1"}
    assert not (tmp_path / "run" / "lock.json").exists()  # the run's lock was released
