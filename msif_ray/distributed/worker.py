"""The Ray worker actor: holds a model on its device and runs one map step per shard.

Every method takes a self-contained job (model path, shard, output name), so a restarted actor
needs no state from before its crash: the model is (re)loaded lazily and cached by path.
Results go to the run directory, atomically, under a name keyed by the shard id; the return
value is a small dict of counts for progress and the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import ray
import torch

from msif_ray.curvature import Damping, Eigenbasis, Factors, accumulate_covariances, accumulate_lambdas
from msif_ray.data import Shard, read_documents, read_pair_shard, read_pairs, sample_documents
from msif_ray.distributed.reduce import load_bases
from msif_ray.gradients import Fisher
from msif_ray.influence import Examples, Method, TrackedLM, precondition, score_windows
from msif_ray.models import load_model, load_tokenizer, pick_device
from msif_ray.storage import RunDir


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker needs, whatever the stage."""

    run_dir: str
    tokenizer: str
    include: str | None
    exclude: str | None
    max_length: int
    batch_size: int
    num_threads: int
    num_gpus: float
    trust_remote_code: bool = False
    fault: str | None = None  # test hook: "<pass>" kills this worker once in that pass


@dataclass(frozen=True)
class ShardJob:
    """One shard of one pass: read ``shard`` as ``kind``, run ``model``, write ``output``."""

    pass_name: str
    shard: Shard
    output: str
    model: str
    kind: Literal["documents", "pairs"]
    columns: tuple[str, ...]  # (id, text) for documents; (prompt, completion) for pairs
    seed: int = 0
    sample: int | None = None  # this shard's quota of a seeded corpus sample (None: every document)


@dataclass(frozen=True)
class QueryJob:
    """Precondition the query gradients: G_q at ``model``, then the chain of ``method``."""

    model: str
    paths: tuple[str, ...]
    columns: tuple[str, str, str]  # (id, prompt, completion)
    method: Method
    pretrain_factors: str | None
    finetune_factors: str | None
    damping_pretrain: Damping
    damping_finetune: Damping
    output: str


@ray.remote
class ShardWorker:
    def __init__(self, settings: WorkerSettings):
        torch.set_num_threads(settings.num_threads)
        self.settings = settings
        self.run_dir = RunDir(settings.run_dir)
        self.device = pick_device(settings.num_gpus)
        self.tokenizer = load_tokenizer(settings.tokenizer, trust_remote_code=settings.trust_remote_code)
        self._model_path: str | None = None
        self._lm: TrackedLM | None = None
        self._cached: dict[str, object] = {}

    def ready(self) -> bool:
        """Answers once the actor is up (the pool waits on it after a crash)."""
        return True

    # ----------------------------------------------------------------------- helpers

    def _load(self, model_path: str) -> TrackedLM:
        if model_path != self._model_path:
            self._lm = None  # free the previous model before loading the next
            s = self.settings
            model = load_model(model_path, self.device, s.trust_remote_code)
            self._lm = TrackedLM(model, self.tokenizer, s.include, s.exclude, s.max_length, s.batch_size)
            self._model_path = model_path
        return self._lm

    def _examples(self, job: ShardJob) -> tuple[list[str], Examples, int]:
        """The shard's example ids and examples, and how many empty documents were skipped."""
        if job.kind == "pairs":
            pairs = read_pair_shard(job.shard, *job.columns)
            return [p.id for p in pairs], Examples.pairs([p.prompt for p in pairs], [p.completion for p in pairs]), 0
        docs, skipped = read_documents(job.shard, *job.columns)
        docs = sample_documents(docs, job.sample, job.seed, job.shard)
        return [d.doc_id for d in docs], Examples.documents([d.text for d in docs]), skipped

    def _maybe_crash(self, pass_name: str) -> None:
        """Fault injection for tests: die (a real process exit) once, on a shard of ``pass_name``."""
        if self.settings.fault == pass_name:
            marker = f"_faults/{pass_name.replace('/', '_')}"
            if not self.run_dir.exists(marker):
                self.run_dir.write_bytes(marker, b"killed\n")
                os._exit(1)

    def _finish(self, job: ShardJob, start: float, ids: list[str], skipped: int, tokens: int) -> dict:
        """Write the shard's stats next to its output: the marker that the shard is done."""
        stats = {"shard": job.shard.shard_id, "documents": len(ids), "skipped": skipped, "tokens": tokens,
                 "seconds": round(time.monotonic() - start, 3), "worker_peak_rss_mb": peak_rss_mb()}
        self.run_dir.write_json(done_marker(job.output), stats)
        return stats

    # ----------------------------------------------------------------------- the map steps

    def covariance(self, job: ShardJob, fisher: Fisher) -> dict:
        """Pass 1: Σ a aᵀ and Σ s sᵀ over the shard."""
        start = time.monotonic()
        lm = self._load(job.model)
        ids, examples, skipped = self._examples(job)
        self._maybe_crash(job.pass_name)
        seed = hash_seed(job.seed, job.shard.shard_id)
        sums = accumulate_covariances(lm.model, lm.taps, lm.batches(examples), fisher, seed)
        self.run_dir.save_tensors(job.output, sums.to_tensors(), {"shard": job.shard.shard_id})
        return self._finish(job, start, ids, skipped, sums.num_tokens)

    def lambdas(self, job: ShardJob, fisher: Fisher, bases: tuple[str, ...]) -> dict:
        """Pass 2: Σ (Q_Sᵀ G Q_A)² over the shard, in the eigenbases stored in the files ``bases``."""
        start = time.monotonic()
        lm = self._load(job.model)
        bases = self._bases(bases)
        ids, examples, skipped = self._examples(job)
        self._maybe_crash(job.pass_name)
        seed = hash_seed(job.seed, job.shard.shard_id)
        batches = lm.batches(examples)
        sums = accumulate_lambdas(lm.model, lm.taps, batches, bases, fisher, seed)
        self.run_dir.save_tensors(job.output, sums.to_tensors(), {"shard": job.shard.shard_id})
        return self._finish(job, start, ids, skipped, sum(b.num_tokens for b in batches))

    def scores(self, job: ShardJob, preconditioned_name: str, top_k: int) -> dict:
        """Scoring: every document of the shard against every query; keep the top and bottom k."""
        start = time.monotonic()
        lm = self._load(job.model)
        query_ids, preconditioned = self._preconditioned(preconditioned_name)
        doc_ids, examples, skipped = self._examples(job)
        self._maybe_crash(job.pass_name)
        totals = torch.zeros(len(doc_ids), len(query_ids), dtype=torch.float64)
        tokens = 0
        for batch in lm.batches(examples):
            totals.index_add_(0, batch.examples, score_windows(lm.model, lm.taps, batch, preconditioned).sum(0).cpu())
            tokens += batch.num_tokens
        self.run_dir.write_parquet(job.output, extremes_table(query_ids, doc_ids, totals, top_k))
        return self._finish(job, start, doc_ids, skipped, tokens)

    def precondition(self, job: QueryJob) -> dict:
        """Ṽ_q for every query, saved as one safetensors file with the query ids in its metadata."""
        start = time.monotonic()
        lm = self._load(job.model)
        id_column, prompt_column, completion_column = job.columns
        queries = read_pairs(list(job.paths), prompt_column, completion_column, id_column)
        ids = [q.id for q in queries]
        grads = lm.gradients(Examples.pairs([q.prompt for q in queries], [q.completion for q in queries], ids))
        factors = [Factors.from_tensors(*self.run_dir.load_tensors(name)) if name else None
                   for name in (job.pretrain_factors, job.finetune_factors)]
        preconditioned = precondition(grads, job.method, *factors, job.damping_pretrain, job.damping_finetune)
        tensors = {name: v.float().contiguous().cpu() for name, v in preconditioned.items()}
        self.run_dir.save_tensors(job.output, tensors, {"query_ids": json.dumps(ids), "method": job.method})
        return {"queries": len(ids), "seconds": round(time.monotonic() - start, 3)}

    def _bases(self, names: tuple[str, ...]) -> dict[str, Eigenbasis]:
        if names not in self._cached:
            self._cached[names] = load_bases(self.run_dir, names)
        return self._cached[names]

    def _preconditioned(self, name: str) -> tuple[list[str], dict[str, torch.Tensor]]:
        if name not in self._cached:
            tensors, metadata = self.run_dir.load_tensors(name)
            self._cached[name] = (json.loads(metadata["query_ids"]), {k: v.to(self.device) for k, v in tensors.items()})
        return self._cached[name]


def peak_rss_mb() -> float:
    """This worker process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def done_marker(output: str) -> str:
    """A shard's output is complete once this small JSON exists (it is written after the output)."""
    return output + ".done.json"


def hash_seed(seed: int, key: str) -> int:
    """A stable 63-bit seed for (seed, shard id): the same on every worker and every run."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1


def extremes_table(query_ids: list[str], doc_ids: list[str], totals: torch.Tensor, k: int) -> pa.Table:
    """The k highest (proponents) and k lowest (opponents) documents of each query, as rows."""
    rows: dict[str, list] = {"query_id": [], "doc_id": [], "score": [], "side": []}
    k = min(k, len(doc_ids))
    for q, query_id in enumerate(query_ids):
        for side, largest in (("top", True), ("bottom", False)):
            values, index = torch.topk(totals[:, q], k, largest=largest) if k else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
            rows["query_id"] += [query_id] * k
            rows["doc_id"] += [doc_ids[i] for i in index.tolist()]
            rows["score"] += values.tolist()
            rows["side"] += [side] * k
    return pa.table({"query_id": pa.array(rows["query_id"], pa.string()), "doc_id": pa.array(rows["doc_id"], pa.string()),
                     "score": pa.array(rows["score"], pa.float64()), "side": pa.array(rows["side"], pa.string())})
