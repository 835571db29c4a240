"""Submit an msif-ray run (or night) to a Ray cluster with ``ray job submit``, at most once per config and day.

    python jobs/submit.py jobs/configs/example.yaml                 # one run, today
    python jobs/submit.py jobs/configs/nightly.yaml --nightly       # tonight's night (`msif nightly`)
    python jobs/submit.py CONFIG --address http://head:8265 --date 2026-11-30 --dry-run

What it does:

- Working dir: this repository (``--working-dir``), without ``.git``, virtualenvs, run directories
  and caches (``excludes`` of the runtime env); the job runs the uploaded code, not an installed one.
- Entrypoint: ``python jobs/run_attribution.py CONFIG`` (``--nightly``: ``jobs/nightly_attribution.py
  CONFIG --date DATE``: the night is the submission's date, even when it starts after midnight).
  CONFIG is the path *as the cluster sees it*: a file inside this repository travels with the
  working dir (its path is made relative to it); any other path must exist on the head node
  (e.g. a ConfigMap mounted at /config on KubeRay, see infra/).
- Submission id: ``msif-<run|nightly>-<config name>-<8 hex of the config's bytes>-<date>``. Ray
  refuses a second job with an id it has seen, so the same config is run at most once per date:
  a second submission (a retried cron, a double click) prints the existing job's status and exits 0.
  ``--date`` (default: today, UTC) names another day; a changed config is a new id.
- No waiting: it returns once the job is accepted (``--wait`` follows the logs instead). Then::

      ray job status  <id>     # PENDING / RUNNING / SUCCEEDED / FAILED / STOPPED
      ray job logs -f <id>     # the driver's output: stages, progress with ETA
      ray job stop    <id>     # stop it (the run resumes where it stopped when submitted again)
      ray job list

The cluster address comes from ``--address`` or ``RAY_ADDRESS`` (the dashboard's http://host:8265),
as for every ``ray job`` command. Exit code: 0 submitted or already submitted; otherwise ``ray``'s.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINTS = {"run": "jobs/run_attribution.py", "nightly": "jobs/nightly_attribution.py"}
EXCLUDES = [".git", ".venv", "venv", "**/__pycache__", "*.egg-info", ".pytest_cache", "runs", "benchmarks/results"]


def submission_id(kind: str, config: Path, date: str) -> str:
    """``msif-<kind>-<config stem>-<8 hex of the config's content>-<date>``: one job per config and date."""
    stem = re.sub(r"[^a-z0-9]+", "-", config.stem.lower()).strip("-")[:40] or "config"
    digest = hashlib.sha256(config.read_bytes()).hexdigest()[:8]
    return f"msif-{kind}-{stem}-{digest}-{date}"


def cluster_path(config: Path) -> str:
    """The config's path in the job: relative inside the uploaded working dir, else as given."""
    resolved = config.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(resolved)


def ray_command() -> list[str]:
    """The ``ray`` CLI of this Python environment (beside the interpreter), else the one on PATH."""
    beside = Path(sys.executable).with_name("ray")
    return [str(beside)] if beside.exists() else ["ray"]


def submit_command(kind: str, config: Path, job_id: str, address: str | None, wait: bool,
                   python: str = "python", date: str | None = None) -> list[str]:
    runtime_env = {"excludes": EXCLUDES}
    command = ray_command() + ["job", "submit", "--submission-id", job_id, "--working-dir", str(REPO),
                               "--runtime-env-json", json.dumps(runtime_env)]
    if address:
        command += ["--address", address]
    if not wait:
        command.append("--no-wait")
    night = ["--date", date] if kind == "nightly" and date else []
    return command + ["--", python, ENTRYPOINTS[kind], cluster_path(config)] + night


def existing_status(job_id: str, address: str | None) -> str | None:
    """How ``ray job status`` describes the job with this id ("succeeded", ...); None when there is none."""
    command = ray_command() + ["job", "status", job_id] + (["--address", address] if address else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return None
    found = re.findall(rf"Job '{re.escape(job_id)}' ([^\n\x1b]+)", done.stdout)  # e.g. "succeeded", "is running"
    return found[-1].strip() if found else "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("config", type=Path, help="the run's YAML config")
    parser.add_argument("--nightly", action="store_true", help="submit `msif nightly` instead of `msif run`")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="the cluster's dashboard URL")
    parser.add_argument("--date", default=datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
                        help="the day this submission is for (default: today, UTC); part of the submission id")
    parser.add_argument("--python", default="python", help="the interpreter of the job's entrypoint on the cluster")
    parser.add_argument("--wait", action="store_true", help="follow the job's logs until it ends")
    parser.add_argument("--dry-run", action="store_true", help="print the ray command, submit nothing")
    args = parser.parse_args(argv)
    if not args.config.is_file():
        parser.error(f"{args.config}: no such config file")
    kind = "nightly" if args.nightly else "run"
    job_id = submission_id(kind, args.config, args.date)
    command = submit_command(kind, args.config, job_id, args.address, args.wait, args.python, args.date)
    if args.dry_run:
        print(" ".join(command))
        return 0
    status = existing_status(job_id, args.address)
    if status is not None:
        print(f"{job_id}: already submitted ({status}); not submitting it again")
        return 0
    done = subprocess.run(command, capture_output=not args.wait, text=True)
    if done.returncode != 0 and not args.wait and "already exists" in (done.stderr + done.stdout):
        print(f"{job_id}: already submitted (by a concurrent submission); not submitting it again")
        return 0
    if not args.wait:
        sys.stdout.write(done.stdout)
        sys.stderr.write(done.stderr)
    if done.returncode == 0:
        print(f"submitted {job_id}\n  ray job status {job_id}\n  ray job logs -f {job_id}\n  ray job stop {job_id}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
