"""The Ray worker actor: holds a model on its device and runs one map step per shard.

Every method takes a self-contained job (model path, shard, output names), so a restarted actor
needs no state from before its crash: the model is (re)loaded lazily and cached by path. The
math is the engine's (curvature, influence, scoring); this module is glue: read the shard, call
the per-pass function, write the result to the run directory, return a small dict of stats.

Factor passes accumulate across shards and commit worker-level checkpoints (see
``checkpoints.py``); the query and scoring passes write one output per job, atomically, with a
``.done.json`` marker after it.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Literal, TypeVar

import pyarrow as pa
import ray
import torch

from msif_ray.config import redact_output
from msif_ray.engine.curvature import CovarianceSums, Damping, Eigenbasis, LambdaSums, LayerFactors, accumulate_covariances, accumulate_lambdas
from msif_ray.store.data import Document, Shard, read_documents, read_pair_shard, read_pairs, sample_documents
from msif_ray.distributed.checkpoints import Accumulation
from msif_ray.distributed.faults import maybe_fault
from msif_ray.distributed.memory import peak_rss_mb, reset_peak_rss
from msif_ray.engine.gradients import Fisher, InputError, NonFiniteWindows, poisoned_examples
from msif_ray.engine.influence import Chain, Method, cross_rotations, precondition_queries
from msif_ray.engine.api import Examples, TrackedLM
from msif_ray.engine.vectors import LayerVectors, QueryVectors
from msif_ray.store.layout import done_marker, eigen_file, factor_layer, index_basis_layer, self_influence_shard
from msif_ray.store.models import load_model, load_tokenizer, pick_device, weight_dtype
from msif_ray.engine.index import IndexRows, TermBasis, document_self_influence, document_terms, scan
from msif_ray.engine.topk import extremes_schema, extremes_table
from msif_ray.engine.scoring import QueryGroup, normalize_scores, score_windows
from msif_ray.store.quarantine import BadDocument, BadDocumentsError, add_to_quarantine, read_quarantine
from msif_ray.store.storage import RunDir, StorageError


T = TypeVar("T")
ROTATED_BATCHES_KEPT = 64  # query batches, rotated into the index basis, a worker keeps between index shards


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
    precision: str = "auto"
    checkpoint_seconds: float = 600.0
    factor_cache_bytes: int = 1 << 30  # per-layer factors kept in memory by the query pass
    trust_remote_code: bool = False
    probe: str = ""  # a file of the run directory (and index store) this worker must see when it starts (layout.worker_probe)
    index_path: str = ""  # index mode: the index store's URL (the probe is there too)
    fault: str | None = None  # test hook: "<pass>[:hang|:oom],...": a worker dies, hangs or runs out of memory once
    on_bad_document: str = "skip"  # data.on_bad_document: a poisoned document is quarantined (skip) or stops the run


@dataclass(frozen=True)
class ShardJob:
    """One shard of one pass: read ``shard`` as ``kind``, run ``model``, write ``output``."""

    pass_name: str
    shard: Shard
    output: str  # the shard's own output (query and scoring passes) or its checkpoint folder (factor passes)
    model: str
    kind: Literal["documents", "pairs"]
    columns: tuple[str | None, ...]  # (id, text, token) for documents; (prompt, completion) for pairs
    seed: int = 0
    sample: int | None = None  # this shard's quota of a seeded corpus sample (None: every document)
    doc_ids: frozenset[str] | None = None  # only these documents of the shard (None: every one)

    @property
    def job_id(self) -> str:
        return self.shard.shard_id


@dataclass(frozen=True)
class RotateJob:
    """Rotate query batches into the index's basis for one layer group: each layer's basis is read
    once for all of the job's batches, and each batch's rotated vectors go to its own output."""

    layers: tuple[str, ...]
    batches: tuple[str, ...]  # query batch files
    outputs: tuple[str, ...]  # one rotated file per batch (``layout.rotated_batch``)
    pass_name: str = "rotate"

    @property
    def output(self) -> str:
        return self.outputs[-1]  # written last: its marker means the job is done

    @property
    def job_id(self) -> str:
        return self.outputs[0]


@dataclass(frozen=True)
class ScanJob:
    """Scan one index shard against query batches: each batch's best candidates go to its own output."""

    shard_id: str
    rows: str  # the index shard (in the index store)
    batches: tuple[str, ...]  # query batch files
    rotated: tuple[tuple[str, ...], ...]  # per batch, its rotated files (one per layer group, ``RotateJob``)
    outputs: tuple[str, ...]  # one candidates file per batch (in the run directory)
    pass_name: str = "scan"

    @property
    def output(self) -> str:
        return self.outputs[-1]  # written last: its marker means the job is done

    @property
    def job_id(self) -> str:
        return f"{self.shard_id}:{self.outputs[0]}"


@dataclass(frozen=True)
class RerankJob:
    """Exact scores of candidate pairs in one shard, for several query batches (one output each)."""

    read: ShardJob  # the shard, restricted to the candidate documents
    batches: tuple[str, ...]
    pairs: tuple[tuple[tuple[str, str, str], ...], ...]  # per batch: (query_id, doc_id, side)
    outputs: tuple[str, ...]

    @property
    def output(self) -> str:
        return self.outputs[-1]

    @property
    def job_id(self) -> str:
        return f"{self.read.shard.shard_id}:{self.outputs[0]}"


@dataclass(frozen=True)
class QueryJob:
    """Precondition queries ``[start, stop)`` of the query files: G_q at ``model``, then ``chain``."""

    batch: int
    model: str
    paths: tuple[str, ...]
    columns: tuple[str, str, str]  # (id, prompt, completion)
    start: int
    stop: int
    output: str

    @property
    def job_id(self) -> str:
        return f"batch-{self.batch:05d}"


@dataclass(frozen=True)
class ChainSpec:
    """A preconditioning chain by reference: the factor folders in the run directory, not the tensors."""

    method: Method
    pretrain: str | None
    finetune: str | None
    damping_pretrain: Damping
    damping_finetune: Damping
    rank: int | None


@dataclass(frozen=True)
class Normalization:
    """``scoring.normalize`` for a scoring pass: ``how`` (self | unit) and the key of the documents'
    self-influence (``layout.self_influence_shard``)."""

    how: str
    key: str


@ray.remote
class ShardWorker:
    def __init__(self, settings: WorkerSettings):
        redact_output()  # what the worker prints or logs reaches the driver's output
        torch.set_num_threads(settings.num_threads)
        self.settings = settings
        self.run_dir = RunDir(settings.run_dir)
        self._check_shared(settings)
        self.device = pick_device(settings.num_gpus)
        self.dtype = weight_dtype(settings.precision, self.device)
        self.tokenizer = load_tokenizer(settings.tokenizer, trust_remote_code=settings.trust_remote_code)
        self._model_path: str | None = None
        self._lm: TrackedLM | None = None
        self._accumulation: Accumulation | None = None
        self._cached: dict[object, object] = {}
        self._rotated: OrderedDict[tuple[str, ...], QueryVectors] = OrderedDict()
        self._factors = StoredFactors(self.run_dir, settings.factor_cache_bytes)

    def ready(self) -> bool:
        """Answers once the actor is up (the pool waits on it after a crash)."""
        return True

    @staticmethod
    def _check_shared(settings: WorkerSettings) -> None:
        """Raise ``StorageError`` unless this node sees the driver's ``settings.probe`` in the run
        directory and the index store: else it has a local path of its own (an autoscaler's node)."""
        stores = [("run_dir", settings.run_dir)] + ([("index.path", settings.index_path)] if settings.index_path else [])
        for key, url in stores:
            if settings.probe and not RunDir(url).exists(settings.probe):
                raise StorageError(f"{key}: {url} on this worker's node ({socket.gethostname()}) is not the driver's: a "
                                   "local path on a multi-node cluster. Use shared storage (s3://bucket/prefix) or a "
                                   "filesystem mounted at the same path on every node")

    def reduce(self, job) -> dict:
        """A reduce job between passes (``reduce.py``, ``merge.py``): ``job.run`` on the run directory."""
        self.commit()
        self._accumulation = None  # the pass before is complete and committed: its sums are freed for the reduce
        start = _start()
        self._maybe_crash("reduce")
        result = job.run(self.run_dir, self.device)
        return result | {"seconds": round(time.monotonic() - start, 3), "peak_rss_mb": peak_rss_mb()}

    # ----------------------------------------------------------------------- helpers

    def _load(self, model_path: str) -> TrackedLM:
        if model_path != self._model_path:
            self._lm = None  # free the previous model before loading the next
            s = self.settings
            model = load_model(model_path, self.device, s.trust_remote_code, self.dtype)
            self._lm = TrackedLM(model, self.tokenizer, s.include, s.exclude, s.max_length, s.batch_size)
            self._model_path = model_path
        return self._lm

    def _examples(self, job: ShardJob) -> tuple[list[str], Examples, int]:
        """The shard's example ids and examples, and how many empty documents were skipped."""
        if job.kind == "pairs":
            pairs = read_pair_shard(job.shard, *job.columns)
            return [p.id for p in pairs], Examples.pairs([p.prompt for p in pairs], [p.completion for p in pairs]), 0
        docs, skipped = self._documents(job)
        return [d.doc_id for d in docs], document_examples(docs), skipped

    def _documents(self, job: ShardJob) -> tuple[list[Document], int]:
        """The documents of the job (its sample, its ``doc_ids``) less those quarantined, and how many
        empty rows were skipped. The sample is drawn before: it does not change when one is left out.
        A row that cannot be read or decoded is left out too (validation's scan found it already,
        unless the file changed since)."""
        unreadable: list[BadDocument] = []
        docs, skipped = read_documents(job.shard, *job.columns, bad=unreadable)
        if unreadable:
            self._leave_out(job, unreadable)
        docs = sample_documents(docs, job.sample, job.seed, job.shard)
        if job.doc_ids is not None:
            docs = [d for d in docs if d.doc_id in job.doc_ids]
        left_out = {b.row for b in read_quarantine(self.run_dir, job.shard.shard_id)}
        return [d for d in docs if d.row not in left_out], skipped

    def _leaving_out_poisoned(self, job: ShardJob, compute: Callable[[], T]) -> T:
        """``compute()`` the job; when a document's loss turns out non-finite (``NonFiniteWindows``),
        every such document of the shard is found and quarantined (``_quarantine_poisoned``) and the
        job computed again without them. Each round leaves out at least one more document."""
        while True:
            try:
                return compute()
            except NonFiniteWindows as err:
                self._quarantine_poisoned(job, err)

    def _quarantine_poisoned(self, job: ShardJob, err: NonFiniteWindows) -> None:
        """Find the job's documents whose loss is non-finite (one forward pass) and add them to the
        shard's quarantine record; with ``data.on_bad_document: fail``, raise ``BadDocumentsError``
        listing them. A fine-tuning example or a query cannot be left out: ``InputError`` names it."""
        if job.kind == "pairs":
            ids, _, _ = self._examples(job)
            raise InputError(f"{job.shard.path}: fine-tuning example(s) {[ids[i] for i in err.examples]}: {err}; "
                             "fix or remove them") from None
        lm = self._load(job.model)
        docs, _ = self._documents(job)
        found = poisoned_examples(lm.model, lm.batches(document_examples(docs)))
        if not found:
            raise err  # not reproduced by a forward pass alone: not a poisoned input
        self._leave_out(job, [BadDocument(docs[i].doc_id, job.shard.path, docs[i].row,
                                          f"non-finite loss in the {job.pass_name} pass, on finite weights")
                              for i in found])

    def _leave_out(self, job: ShardJob, bad: list[BadDocument]) -> None:
        """Quarantine ``bad`` (documents of the job's shard), or raise ``BadDocumentsError`` under
        ``data.on_bad_document: fail``."""
        if self.settings.on_bad_document == "fail":
            raise BadDocumentsError(bad, f"{job.pass_name} of shard {job.shard.shard_id}: ")
        new = add_to_quarantine(self.run_dir, job.shard.shard_id, bad)
        if new:
            print(f"warning: [{job.pass_name}] left out {len(new)} document(s) of {job.shard.path} "
                  "(data.on_bad_document: skip): " + "; ".join(b.describe() for b in new[:5]))

    def _maybe_crash(self, pass_name: str) -> None:
        """The test hook of ``faults.py``: a fault in ``pass_name`` when ``settings.fault`` names it."""
        maybe_fault(self.run_dir, self.settings.fault, pass_name)

    def _stats(self, job, start: float, ids: list[str], skipped: int, tokens: int) -> dict:
        return {"shard": job.job_id, "documents": len(ids), "skipped": skipped, "tokens": tokens,
                "seconds": round(time.monotonic() - start, 3), "worker_peak_rss_mb": peak_rss_mb()}

    def _finish(self, job, output: str, size: int, start: float, ids: list[str], skipped: int, tokens: int,
                store: RunDir | None = None) -> dict:
        """Write the job's stats and the output's ``size`` in bytes next to it: the marker that the job
        is done (``store/markers.py`` checks the size on reuse)."""
        stats = self._stats(job, start, ids, skipped, tokens) | {"bytes": size}
        (store or self.run_dir).write_json(done_marker(output), stats)
        return stats

    def _accumulate_into(self, folder: str, new_sums: Callable[[], object]) -> Accumulation:
        """The running sum for ``folder``; a sum for another folder is committed first."""
        if self._accumulation is None or self._accumulation.folder != folder:
            self.commit()
            self._accumulation = Accumulation(self.run_dir, folder, self.settings.checkpoint_seconds, new_sums())
        self._accumulation.commit_if_due()  # before this shard is added: see checkpoints.py
        return self._accumulation

    def _accumulate(self, job: ShardJob, new_sums: Callable[[], object], add: Callable[[TrackedLM, list, object], None]
                    ) -> dict:
        """Add one shard into the running sum of its pass; on an error the uncommitted part is dropped
        (the driver sums its shards again). A poisoned document drops it too: part of the shard is in."""
        return self._leaving_out_poisoned(job, lambda: self._accumulate_shard(job, new_sums, add))

    def _accumulate_shard(self, job: ShardJob, new_sums: Callable[[], object],
                          add: Callable[[TrackedLM, list, object], None]) -> dict:
        start = _start()
        accumulation = self._accumulate_into(job.output, new_sums)
        lm = self._load(job.model)
        ids, examples, skipped = self._examples(job)
        self._maybe_crash(job.pass_name)
        batches = lm.batches(examples)
        try:
            add(lm, batches, accumulation.sums)
        except BaseException:
            self._accumulation = None  # polluted by part of a shard; the committed checkpoint stays valid
            raise
        stats = self._stats(job, start, ids, skipped, sum(b.num_tokens for b in batches))
        accumulation.added(job.job_id, stats)
        return stats

    # ----------------------------------------------------------------------- the map steps

    def covariance(self, job: ShardJob, layers: tuple[str, ...], fisher: Fisher) -> dict:
        """Pass 1: Σ a aᵀ and Σ s sᵀ of the layer group ``layers`` over the shard, into the running sum."""
        seed = hash_seed(job.seed, job.shard.shard_id)
        return self._accumulate(job, CovarianceSums, lambda lm, batches, sums: accumulate_covariances(
            lm.model, lm.taps, batches, fisher, seed, layers, sums))

    def lambdas(self, job: ShardJob, layers: tuple[str, ...], fisher: Fisher, factors: str) -> dict:
        """Pass 2: Σ (Q_Sᵀ G Q_A)² of the layer group over the shard, in the eigenbases under ``factors``."""
        seed = hash_seed(job.seed, job.shard.shard_id)
        return self._accumulate(job, LambdaSums, lambda lm, batches, sums: accumulate_lambdas(
            lm.model, lm.taps, batches, self._bases(factors, layers), fisher, seed, sums))

    def commit(self) -> str | None:
        """Commit the running sum (the driver calls this at the end of a pass); returns its checkpoint."""
        return self._accumulation.commit() if self._accumulation is not None else None

    def precondition(self, job: QueryJob, spec: ChainSpec) -> dict:
        """Ṽ_q of one batch of queries, saved with the query ids in the metadata."""
        start = _start()
        lm = self._load(job.model)
        id_column, prompt_column, completion_column = job.columns
        queries = read_pairs(list(job.paths), prompt_column, completion_column, id_column)[job.start : job.stop]
        ids = [q.id for q in queries]
        self._maybe_crash("precondition")
        batches = lm.batches(Examples.pairs([q.prompt for q in queries], [q.completion for q in queries], ids))
        try:
            vectors = precondition_queries(lm.model, lm.taps, batches, len(ids), self._factors.chain(spec), spec.rank, ids)
        except NonFiniteWindows as err:
            raise InputError(f"query(ies) {[ids[i] for i in err.examples]}: {err}; fix or remove them") from None
        size = self.run_dir.save_tensors(job.output, vectors.to_tensors(), {"query_ids": json.dumps(ids),
                                                                            "method": spec.method})
        return self._finish(job, job.output, size, start, ids, 0, sum(b.num_tokens for b in batches))

    def self_influence(self, job: ShardJob, pretrain: str | None, damping: Damping,
                       groups: tuple[tuple[str, ...], ...]) -> dict:
        """Each document's self-influence G_mᵀ(H + λI)⁻¹G_m in the pre-training factors under
        ``pretrain`` (‖G_m‖² with None), summed over the layer groups (one forward and backward
        each, its bases in memory together, as for the Λ pass); saved with the doc ids."""
        start = _start()
        lm = self._load(job.model)
        self._maybe_crash(job.pass_name)

        def compute() -> tuple[list[str], torch.Tensor, int, int]:
            doc_ids, examples, skipped = self._examples(job)
            batches = lm.batches(examples, by_document=True)
            total = torch.zeros(len(doc_ids), dtype=torch.float64)
            for group in groups:
                bases = {layer: TermBasis.of(None if pretrain is None else self._factors.layer(pretrain, layer),
                                             damping).to(self.device) for layer in group}
                total += document_self_influence(lm.model, lm.taps, batches, len(doc_ids), bases, group)
            return doc_ids, total, skipped, sum(b.num_tokens for b in batches)

        doc_ids, total, skipped, tokens = self._leaving_out_poisoned(job, compute)
        size = self.run_dir.save_tensors(job.output, {"self_influence": total}, {"doc_ids": json.dumps(doc_ids)})
        return self._finish(job, job.output, size, start, doc_ids, skipped, tokens)

    def scores(self, job: ShardJob, query_files: tuple[str, ...], top_k: int, norm: Normalization | None) -> dict:
        """Scoring: every document of the shard against one group of queries; keep the top and bottom k
        (by the normalised score, with the raw one beside it, under ``norm``)."""
        start = _start()
        group = self._query_group(query_files)
        doc_ids, totals, skipped, tokens = self._leaving_out_poisoned(job, lambda: self._exact_scores(job, group))
        normalized = normalized_scores(totals, norm, self.run_dir, job.shard.shard_id, doc_ids, group.norms)
        size = self.run_dir.write_parquet(job.output, extremes_table(group.ids, doc_ids, normalized, top_k,
                                                                     raw=None if norm is None else totals))
        return self._finish(job, job.output, size, start, doc_ids, skipped, tokens)

    def rescore(self, job: RerankJob, norm: Normalization | None) -> dict:
        """Exact scores of each batch's candidate (query, document) pairs in one shard."""
        start = _start()
        group = self._query_group(job.batches)
        doc_ids, totals, skipped, tokens = self._leaving_out_poisoned(job.read, lambda: self._exact_scores(job.read, group))
        normalized = normalized_scores(totals, norm, self.run_dir, job.read.shard.shard_id, doc_ids, group.norms)
        row, column = {d: i for i, d in enumerate(doc_ids)}, {q: i for i, q in enumerate(group.ids)}
        for pairs, output in zip(job.pairs, job.outputs):
            pairs = [p for p in pairs if p[1] in row]  # a document left out as empty has no score
            cells = [(row[d], column[q]) for q, d, _ in pairs]
            columns = {"query_id": [q for q, _, _ in pairs], "doc_id": [d for _, d, _ in pairs],
                       "score": [float(normalized[c]) for c in cells], "side": [side for _, _, side in pairs]}
            if norm is not None:
                columns["raw_score"] = [float(totals[c]) for c in cells]
            size = self.run_dir.write_parquet(output, pa.table(columns, schema=extremes_schema(norm is not None)))
            stats = self._finish(job, output, size, start, doc_ids, skipped, tokens)
        return stats

    def index(self, job: ShardJob, index_url: str, folder: str, terms: int, groups: tuple[tuple[str, ...], ...],
              self_influence_key: str | None = None) -> dict:
        """The index pass: every document's largest ``terms`` gradient terms per layer in the index's
        basis (under ``folder``), into the index store; one forward and backward per layer group,
        whose bases are in memory together (the plan's groups, as for the Λ pass). With
        ``self_influence_key``, the documents' self-influence too, from the same pass, into the run
        directory as the ``self_influence`` pass would write it (the driver asks only when the
        index's weights are the self-influence's: ``index.fused_self_influence``)."""
        start = _start()
        lm = self._load(job.model)
        self._maybe_crash(job.pass_name)
        store = RunDir(index_url)
        self._cached.clear()

        def compute() -> tuple[list[str], IndexRows, torch.Tensor | None, int, int]:
            doc_ids, examples, skipped = self._examples(job)
            batches = lm.batches(examples, by_document=True)
            total = torch.zeros(len(doc_ids), dtype=torch.float64) if self_influence_key else None
            parts = [document_terms(lm.model, lm.taps, batches, len(doc_ids), read_index_basis(store, folder, group, self.device),
                                    terms, group, total) for group in groups]
            return doc_ids, IndexRows.concat(parts), total, skipped, sum(b.num_tokens for b in batches)

        doc_ids, rows, total, skipped, tokens = self._leaving_out_poisoned(job, compute)
        if total is not None:  # before the index shard, whose marker says the job is done
            output = self_influence_shard(self_influence_key, job.shard.shard_id)
            size = self.run_dir.save_tensors(output, {"self_influence": total}, {"doc_ids": json.dumps(doc_ids)})
            self._finish(job, output, size, start, doc_ids, skipped, tokens)
        size = store.save_tensors(job.output, rows.tensors(), {"doc_ids": json.dumps(doc_ids)})
        return self._finish(job, job.output, size, start, doc_ids, skipped, tokens, store)

    def rotate(self, job: RotateJob, index_url: str, folder: str) -> dict:
        """Each of the job's query batches rotated into the basis of the index (under ``folder``),
        U_q = Q_Sᵀ Ṽ_q Q_A for each layer of the job's group, reading one layer's basis at a time."""
        start = _start()
        self._maybe_crash(job.pass_name)
        store = RunDir(index_url)
        batches = [load_query_vectors(self.run_dir, [batch]) for batch in job.batches]  # a query group: the plan's fit
        rotated: list[dict[str, LayerVectors]] = [{} for _ in batches]
        for layer in job.layers:
            basis = read_index_basis(store, folder, [layer], self.device)[layer]
            for vectors, out in zip(batches, rotated):
                out[layer] = basis.rotate_query(vectors.layers[layer].map(lambda t: t.to(self.device))).map(torch.Tensor.cpu)
        for vectors, layers, output in zip(batches, rotated, job.outputs):
            size = self.run_dir.save_tensors(output, QueryVectors(vectors.ids, layers).to_tensors(),
                                             {"query_ids": json.dumps(vectors.ids)})
            stats = self._finish(job, output, size, start, vectors.ids, 0, 0)
        return stats

    def scan(self, job: ScanJob, index_url: str, candidates: int, layers: tuple[str, ...],
             norm: Normalization | None) -> dict:
        """Estimated scores of one index shard against each query batch (normalised under ``norm``);
        the best ``candidates`` per query and side, with the shard id (for the exact re-scoring)."""
        start = _start()
        self._maybe_crash(job.pass_name)
        tensors, metadata = RunDir(index_url).load_tensors(job.rows)
        doc_ids = json.loads(metadata["doc_ids"])
        rows = IndexRows.from_tensors(tensors).to(self.device)
        self_influence = None if norm is None else read_self_influence(self.run_dir, norm.key, job.shard_id, doc_ids)
        for rotated_files, output in zip(job.rotated, job.outputs):
            rotated = self._rotated_queries(rotated_files)
            estimates = scan(rows, rotated.layers, list(layers))
            if norm is not None:  # the shard's self-influence is read once for all its batches
                estimates = normalize_scores(estimates, norm.how, self_influence, rotated.whitened_norms())
            table = extremes_table(rotated.ids, doc_ids, estimates, candidates)
            shards = pa.array([job.shard_id] * table.num_rows, pa.string())
            size = self.run_dir.write_parquet(output, table.append_column("shard", shards))
            stats = self._finish(job, output, size, start, doc_ids, 0, 0)
        return stats

    def _exact_scores(self, job: ShardJob, group: QueryGroup) -> tuple[list[str], torch.Tensor, int, int]:
        """The shard's document ids, their exact scores [N, Q] float64, empty rows skipped, tokens."""
        lm = self._load(job.model)
        doc_ids, examples, skipped = self._examples(job)
        self._maybe_crash(job.pass_name)
        totals = torch.zeros(len(doc_ids), group.num_queries, dtype=torch.float64)
        tokens = 0
        for batch in lm.batches(examples):
            totals.index_add_(0, batch.examples, score_windows(lm.model, lm.taps, batch, group).sum(0).cpu())
            tokens += batch.num_tokens
        return doc_ids, totals, skipped, tokens

    def _rotated_queries(self, files: tuple[str, ...]) -> QueryVectors:
        """A query batch rotated into the index's basis, from its files (one per layer group), on the
        device. The most recent batches are kept: a worker scans shard after shard against them."""
        if files not in self._rotated:
            parts = [load_query_vectors(self.run_dir, [name]) for name in files]
            self._rotated[files] = QueryVectors(parts[0].ids, {n: v for p in parts for n, v in p.layers.items()}
                                                ).to(self.device)
            while len(self._rotated) > ROTATED_BATCHES_KEPT:
                self._rotated.popitem(last=False)
        return self._rotated[files]

    def _bases(self, factors: str, layers: tuple[str, ...]) -> dict[str, Eigenbasis]:
        key = ("bases", factors, layers)
        if key not in self._cached:
            self._cached.clear()
            bases = {}
            for layer in layers:
                a, s = (self.run_dir.load_tensors(eigen_file(factors, layer, w))[0] for w in "AS")
                bases[layer] = Eigenbasis(a["vectors"], s["vectors"], a["values"], s["values"])
            self._cached[key] = bases
        return self._cached[key]

    def _query_group(self, files: tuple[str, ...]) -> QueryGroup:
        key = ("queries", files)
        if key not in self._cached:
            self._cached.clear()  # one group of queries on the device at a time
            num_queries = sum(len(query_ids(self.run_dir, name)) for name in files)
            parts = (load_query_vectors(self.run_dir, [name]) for name in files)  # one batch file in memory at a time
            self._cached[key] = QueryGroup.from_parts(num_queries, parts, self.device)
        return self._cached[key]


class StoredFactors:
    """Per-layer factors read from the run directory on demand, and the multi-stage chain's cross-basis
    rotations computed from them; the most recently used are kept up to a byte budget."""

    def __init__(self, store: RunDir, budget_bytes: int):
        self.store, self.budget = store, budget_bytes
        self.cache: OrderedDict[tuple[str, ...], tuple[torch.Tensor, ...]] = OrderedDict()

    def layer(self, factors: str, layer: str) -> LayerFactors:
        def load() -> tuple[torch.Tensor, ...]:
            tensors, _ = self.store.load_tensors(factor_layer(factors, layer))
            return tensors["Q_A"], tensors["Q_S"], tensors["lambda"]

        return LayerFactors(*self._cached(("layer", factors, layer), load))

    def chain(self, spec: ChainSpec) -> Chain:
        """The preconditioning chain of ``spec``, its factors read layer by layer as it needs them."""
        load = lambda folder: None if folder is None else (lambda layer: self.layer(folder, layer))  # noqa: E731
        cross = (lambda layer: self.cross(spec.pretrain, spec.finetune, layer)) if spec.finetune else None
        return Chain(spec.method, load(spec.pretrain), load(spec.finetune), spec.damping_pretrain,
                     spec.damping_finetune, cross)

    def cross(self, pretrain: str, finetune: str, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cached(("cross", pretrain, finetune, layer),
                            lambda: cross_rotations(self.layer(pretrain, layer), self.layer(finetune, layer)))

    def _cached(self, key: tuple[str, ...], make: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        if key not in self.cache:
            self.cache[key] = make()
            while len(self.cache) > 1 and sum(t.numel() * t.element_size() for v in self.cache.values()
                                              for t in v) > self.budget:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        return self.cache[key]


def document_examples(docs: list[Document]) -> Examples:
    """Corpus documents as the engine takes them: their token ids when read as tokens, else their text."""
    tokens = [d.input_ids for d in docs if d.input_ids is not None]
    return Examples.tokens(tokens) if tokens else Examples.documents([d.text for d in docs])


def query_ids(store: RunDir, name: str) -> list[str]:
    """The query ids of a batch file, from its header alone."""
    return json.loads(store.tensor_header(name)["__metadata__"]["query_ids"])


def read_index_basis(index: RunDir, folder: str, layers: tuple[str, ...] | list[str],
                     device: torch.device | str = "cpu") -> dict[str, TermBasis]:
    """The basis an index was built in (``layout.index_basis``), per layer."""
    return {layer: TermBasis.from_tensors(index.load_tensors(index_basis_layer(folder, layer))[0]).to(device)
            for layer in layers}


def read_self_influence(store: RunDir, key: str, shard_id: str, doc_ids: list[str]) -> torch.Tensor:
    """The stored self-influence (``layout.self_influence_shard``) of one shard's ``doc_ids``, in that order: [N]."""
    tensors, metadata = store.load_tensors(self_influence_shard(key, shard_id))
    row = {d: i for i, d in enumerate(json.loads(metadata["doc_ids"]))}
    return tensors["self_influence"][[row[d] for d in doc_ids]]


def normalized_scores(scores: torch.Tensor, norm: Normalization | None, store: RunDir, shard_id: str,
                      doc_ids: list[str], query_norms: torch.Tensor | None) -> torch.Tensor:
    """``scores`` [N, Q] of one shard's ``doc_ids`` as the run ranks them: divided by the documents'
    self-influence stored in ``store`` (and by the queries' whitened norms for ``unit``) under
    ``norm``, unchanged without."""
    if norm is None:
        return scores
    return normalize_scores(scores, norm.how, read_self_influence(store, norm.key, shard_id, doc_ids), query_norms)


def load_query_vectors(store: RunDir, files: tuple[str, ...] | list[str]) -> QueryVectors:
    """The query vectors of several batch files, as one group, in file order."""
    parts = []
    for name in files:
        tensors, metadata = store.load_tensors(name)
        parts.append(QueryVectors.from_tensors(json.loads(metadata["query_ids"]), tensors))
    return QueryVectors.concat(parts)


def _start() -> float:
    """A job starts: its stats report the peak memory of this job alone."""
    reset_peak_rss()
    return time.monotonic()


def hash_seed(seed: int, key: str) -> int:
    """A stable 63-bit seed for (seed, shard id): the same on every worker and every run."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") >> 1
