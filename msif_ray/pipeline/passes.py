"""Map passes over the worker pool: hand out the jobs not done yet, resume, count every shard once.

Two kinds of pass. A *map* pass (queries, scores, index, scan, rerank) writes one output per job
plus a ``.done.json`` once it is complete; a rerun hands out only the jobs that are not done: no
marker, or an output missing or of another size than its marker records (``store/markers.py``). An
*accumulating* pass (covariance, Λ) has workers sum shards and commit worker-level checkpoints
that list the shards they hold (``distributed/checkpoints.py``); it runs in rounds until every
shard is in a committed checkpoint, so a shard lost with a crashed worker is summed again, once.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Callable

import torch

from msif_ray.config import Config
from msif_ray.distributed.checkpoints import committed_checkpoints
from msif_ray.distributed.faults import FAULT_ENV
from msif_ray.distributed.pool import Deadline, WorkerCrashError, WorkerPool
from msif_ray.distributed.worker import ShardJob, ShardWorker, WorkerSettings
from msif_ray.pipeline.plan import ResourcePlan, WorkerMemoryError
from msif_ray.progress import Progress
from msif_ray.store.layout import worker_probe
from msif_ray.store.markers import done_outputs
from msif_ray.store.storage import RunDir

MAX_ROUNDS = 5  # rounds of an accumulating pass (a round re-runs shards lost with a crashed worker)


class Passes:
    """The run's worker pool (started on first use, one for every stage) and the passes run on it."""

    def __init__(self, config: Config, store: RunDir, plan: ResourcePlan, log: Callable[[str], None],
                 index: RunDir | None = None):
        """``index``: the index store, in index mode (workers write there too)."""
        self.config, self.store, self.plan, self.log, self.index = config, store, plan, log, index
        self.pool: WorkerPool | None = None
        self.probe = ""

    @property
    def shared_stores(self) -> list[RunDir]:
        """The stores every worker writes to: the run directory, and the index store in index mode."""
        return [self.store] + ([self.index] if self.index is not None else [])

    def workers(self) -> WorkerPool:
        """The pool, started on first use; each worker checks on start that it sees ``self.probe``, a file
        written here into the run directory and (index mode) the index store, so that a worker on a node
        with a run directory or index of its own stops the run."""
        if self.pool is None:
            cfg = self.config
            self.probe = worker_probe(uuid.uuid4().hex[:12])
            for store in self.shared_stores:
                store.write_json(self.probe, {"host": socket.gethostname(), "pid": os.getpid()})
            settings = WorkerSettings(
                run_dir=self.store.url(), tokenizer=cfg.tokenizer,
                include=cfg.modules.include, exclude=cfg.modules.exclude, max_length=cfg.data.max_length,
                batch_size=cfg.ray.batch_size, num_threads=cfg.ray.num_cpus_per_worker, num_gpus=cfg.ray.num_gpus_per_worker,
                precision=cfg.ray.precision, checkpoint_seconds=cfg.ray.checkpoint_seconds,
                factor_cache_bytes=self.plan.factor_cache_bytes,
                trust_remote_code=cfg.models.trust_remote_code, fault=os.environ.get(FAULT_ENV), probe=self.probe,
                index_path=self.index.url() if self.index is not None else "",
                on_bad_document=cfg.data.on_bad_document,
            )
            self.pool = WorkerPool(ShardWorker, cfg.ray.num_workers, cfg.ray.num_cpus_per_worker,
                                   cfg.ray.num_gpus_per_worker, settings)
        return self.pool

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None  # its actors are gone: a next run starts a new pool
            for store in self.shared_stores:
                store.remove(self.probe)

    def map(self, name: str, method: str, jobs: list, *args, store: RunDir | None = None) -> dict:
        """Run ``method`` on every job not done yet (in ``store``, by default the run directory);
        return the pass's stats."""
        finished = done_outputs(store or self.store, [j.output for j in jobs], self.log)
        done = {j.job_id: finished[j.output] for j in jobs if j.output in finished}
        pending = [j for j in jobs if j.job_id not in done]
        progress = Progress(name, len(pending), self.log)
        if done:
            self.log(f"[{name}] resuming: {len(done)}/{len(jobs)} already done")
        computed, retries = self._run_jobs(name, method, pending, progress, *args) if pending else ({}, [])
        done |= computed
        return pass_stats([done[j.job_id] for j in jobs], len(pending), retries, progress.seconds)

    def accumulate(self, stage: str, pass_name: str, jobs: list[ShardJob], group: int, *args) -> tuple[dict, list[str]]:
        """An accumulating pass: rounds until every shard is in a committed checkpoint. Returns the
        pass's stats and the checkpoint names."""
        folder = jobs[0].output  # every job of the pass names the same checkpoint folder
        groups = len(self.plan.layer_groups)
        name = f"{stage} {pass_name}" + (f" (layer group {group + 1}/{groups})" if groups > 1 else "")
        retries: list[str] = []
        first_round, computed, seconds = True, 0, 0.0
        for _ in range(MAX_ROUNDS):
            checkpoints = committed_checkpoints(self.store, folder, self.log)
            in_checkpoints = {shard for shards in checkpoints.values() for shard in shards}
            pending = [j for j in jobs if j.job_id not in in_checkpoints]
            if first_round and in_checkpoints:
                self.log(f"[{name}] resuming: {len(in_checkpoints)}/{len(jobs)} shards already in checkpoints")
            if not pending:
                per_shard = {shard: s for shards in checkpoints.values() for shard, s in shards.items()}
                stats = pass_stats([per_shard[j.job_id] for j in jobs], computed, retries, seconds)
                return stats | {"checkpoints": len(checkpoints)}, sorted(checkpoints)
            if first_round:
                computed = len(pending)
            else:
                self.log(f"[{name}] {len(pending)} shards were lost with a worker's running sum (it crashed, or left out a "
                         "poisoned document); summing them again")
            progress = Progress(name, len(pending), self.log)
            _, crashed = self._run_jobs(name, pass_name, pending, progress, *args)
            self.workers().call_all("commit")
            retries += crashed
            seconds += progress.seconds
            first_round = False
        raise RuntimeError(f"[{name}] shards still missing from the checkpoints after {MAX_ROUNDS} rounds")

    def reduce(self, jobs: list) -> list[dict]:
        """Run reduce jobs (``reduce.py``, ``merge.py``: anything with ``run(store, device)``) on the pool's
        actors, one per idle actor; their results in the order of ``jobs``."""
        results = {job.job_id: result for job, result in self.workers().map("reduce", jobs,
                                                                             deadline=self.deadline("reduce", len(jobs)))}
        return [results[job.job_id] for job in jobs]

    def deadline(self, name: str, jobs: int) -> Deadline:
        """How long one of ``jobs`` jobs of the pass ``name`` may run: ``ray.task_timeout_s``, or auto from
        the plan's estimate and the pass's finished jobs (``pool.Deadline``)."""
        return Deadline(self.config.ray.task_timeout_s, self.plan.job_seconds(name, jobs))

    def finished(self, outputs: list[str]) -> set[str]:
        """Those of ``outputs`` (in the run directory) that are done: one listing per folder, so a pass
        asks once for all of its jobs, not once per shard."""
        return set(done_outputs(self.store, outputs, self.log))

    def _run_jobs(self, name: str, method: str, jobs: list, progress: Progress, *args) -> tuple[dict, list[str]]:
        """Hand ``jobs`` to the pool; returns their stats by job id and the ids whose worker crashed."""
        done, retries = {}, []
        crashed = lambda job, attempt: retries.append(job.job_id)  # noqa: E731
        try:
            for job, stats in self.workers().map(method, jobs, *args, on_crash=crashed,
                                                 deadline=self.deadline(name, len(jobs))):
                done[job.job_id] = stats
                progress.update(stats["tokens"], stats["documents"])
        except WorkerCrashError as err:
            if err.out_of_memory:
                raise WorkerMemoryError(self.plan.out_of_memory_message(name, str(err))) from err
            raise WorkerCrashError(err.item, err.attempts, err.__cause__ or err, f"[{name}] ") from err
        except (torch.OutOfMemoryError, MemoryError) as err:  # raised in a worker: CUDA's, or the host's allocator
            if isinstance(err, WorkerMemoryError):
                raise
            detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise WorkerMemoryError(self.plan.out_of_memory_message(name, f"a worker ran out of memory ({detail})")) from err
        return done, retries


def pending_chunks(files: list[str], outputs: dict[str, str], size: int, finished: set[str]) -> list[tuple[str, ...]]:
    """The query batches whose output is not in ``finished``, in chunks of ``size`` (one job each);
    when none is pending, all of them as one chunk, so that the pass counts the job as reused."""
    pending = [f for f in files if outputs[f] not in finished]
    if not pending:
        return [tuple(files)] if files else []
    return [tuple(pending[i : i + size]) for i in range(0, len(pending), size)]


def pass_stats(per_job: list[dict], computed: int, retries: list[str], seconds: float) -> dict:
    """A pass's stats for the manifest: shards computed and reused, tokens, documents, peak memory, per shard."""
    return {
        "shards_total": len(per_job), "computed": computed, "reused": len(per_job) - computed,
        "retried_after_crash": retries, "seconds": round(seconds, 3),
        "tokens": sum(s["tokens"] for s in per_job),
        "documents": sum(s["documents"] for s in per_job),
        "skipped_empty": sum(s["skipped"] for s in per_job),
        "worker_peak_rss_mb": max((s["worker_peak_rss_mb"] for s in per_job), default=0.0),
        "per_shard": {s["shard"]: s for s in per_job},
    }


def combine_groups(stats: dict[str, dict]) -> dict[str, dict]:
    """Per-pass stats summed over layer (or query) groups: ``covariance/g0`` + ``covariance/g1`` -> ``covariance``."""
    combined: dict[str, dict] = {}
    for name, s in stats.items():
        base = name.split("/")[0]
        if base not in combined:
            combined[base] = dict(s, groups=1)
            continue
        c = combined[base]
        c["groups"] += 1
        c["seconds"] = round(c["seconds"] + s["seconds"], 3)
        c["retried_after_crash"] = c["retried_after_crash"] + s["retried_after_crash"]
        c["worker_peak_rss_mb"] = max(c["worker_peak_rss_mb"], s["worker_peak_rss_mb"])
    return combined
