"""The report's small Ray pass: per-token and per-layer breakdowns of the documents a report shows.

Only the shown documents are recomputed (a few per query), never the corpus: each job is one
corpus shard that holds some of them, with, per document, the queries it is shown for. A worker
reads that shard's text, keeps the wanted documents and computes, against those queries only:

    per layer  ⟨Ṽ_q,l , G_m,l⟩                      TrackedLM.score       [L] per (document, query)
    per token  Σ_l s_tᵀ Ṽ_q,l a_t at position t     TrackedLM.token_scores [T] per (document, query)

Both sum to the document's score. Position t's term is driven by the loss of predicting token
t + 1 (directly at t; through attention, later positions too): the report credits it to that
predicted token, so token 0 (context only) gets nothing and the last position, which predicts
nothing and so has s_t = 0, is dropped. Highlights use the fast tokenizer's character offsets.

The results are small (a float per token per shown pair) and return to the driver through Ray.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Sequence

import ray
import torch

from msif_ray.distributed.faults import maybe_fault
from msif_ray.store.data import Shard, read_documents
from msif_ray.distributed.worker import document_examples
from msif_ray.distributed.worker import load_query_vectors as load_batch_files
from msif_ray.engine.api import TrackedLM
from msif_ray.engine.scoring import credit_predicted_tokens, segment_scores
from msif_ray.engine.vectors import QueryVectors
from msif_ray.store.layout import MANIFEST
from msif_ray.store.models import load_model, load_tokenizer, pick_device
from msif_ray.store.storage import RunDir
from msif_ray.errors import UserError

class ReportError(UserError, ValueError):
    """The run directory cannot be reported on as it is (no finished run, or inputs changed since)."""


def load_query_vectors(store: RunDir) -> QueryVectors:
    """The preconditioned queries Ṽ_q of a run (every batch file of its queries stage), on CPU."""
    manifest = store.read_json(MANIFEST) if store.exists(MANIFEST) else {}
    record = manifest.get("stages", {}).get("queries", {})
    files = record.get("outputs", [])
    if record.get("state") != "done" or not files:
        raise ReportError(f"{store.url('queries')}: no preconditioned queries; run `msif run` first")
    return load_batch_files(store, files)


@dataclass(frozen=True)
class ReportSettings:
    """What every report worker needs: the run, the corpus-side model and how it was run."""

    run_dir: str
    model: str  # Config.corpus_model: the model whose gradients G_m were scored
    tokenizer: str
    include: str | None
    exclude: str | None
    max_length: int
    batch_size: int
    num_threads: int
    num_gpus: float
    trust_remote_code: bool = False
    fault: str | None = None  # test hook: see faults.py ("report[:hang|:oom]")


@dataclass(frozen=True)
class ExplainJob:
    """The shown documents of one shard: ``wanted`` is ((doc_id, (query id, ...)), ...)."""

    shard: Shard
    columns: tuple[str | None, ...]  # (id, text, token), as the corpus is read
    wanted: tuple[tuple[str, tuple[int, ...]], ...]


@ray.remote
class ReportWorker:
    def __init__(self, settings: ReportSettings):
        torch.set_num_threads(settings.num_threads)
        self.settings = settings
        self.tokenizer = load_tokenizer(settings.tokenizer, trust_remote_code=settings.trust_remote_code)
        self.device = pick_device(settings.num_gpus)
        self._lm: TrackedLM | None = None
        self._vectors: QueryVectors | None = None
        self._query_index: dict[str, int] = {}

    def ready(self) -> bool:
        return True

    def _load(self) -> TrackedLM:
        if self._lm is None:
            s = self.settings
            model = load_model(s.model, self.device, s.trust_remote_code)
            self._lm = TrackedLM(model, self.tokenizer, s.include, s.exclude, s.max_length, s.batch_size)
            self._vectors = load_query_vectors(RunDir(s.run_dir))
            self._query_index = {q: i for i, q in enumerate(self._vectors.ids)}
        return self._lm

    def _select(self, query_ids: Sequence[str]) -> QueryVectors:
        """Ṽ of the given queries only, in that order."""
        unknown = [q for q in query_ids if q not in self._query_index]
        if unknown:
            raise ReportError(f"queries {unknown[:5]} are not among the run's preconditioned queries; rerun msif run")
        return self._vectors.select([self._query_index[q] for q in query_ids])

    def _display(self, doc, ids: list[int]) -> tuple[str, list[list[int]]]:
        """The text shown for a document and each token's character span in it. A token document is
        shown as its tokens decoded one by one (the tokenizer is used for display only)."""
        if doc.input_ids is not None:
            pieces = [self.tokenizer.decode([t]) for t in ids]
            ends = list(itertools.accumulate(len(p) for p in pieces))
            return "".join(pieces), [[end - len(p), end] for p, end in zip(pieces, ends)]
        encoding = self.tokenizer(doc.text, add_special_tokens=True, return_offsets_mapping=True)
        if list(encoding["input_ids"]) != list(ids):
            raise RuntimeError(f"document {doc.doc_id!r}: windows do not reproduce the tokenization")
        return doc.text, [list(o) for o in encoding["offset_mapping"]]

    def explain(self, job: ExplainJob) -> dict:
        """Breakdowns of the shard's wanted documents: {"layers", "documents", "tokens", "seconds"}.

        Each document: {"doc_id", "text", "offsets": [[start, end], ...] per token, "starts": the token
        offsets of the source documents packed in it (empty when not packed), "queries": {query id:
        {"tokens": [T] credited to predicted tokens, "layers": [L], "segments": [S] per source document}}}.
        """
        start = time.monotonic()
        lm = self._load()
        maybe_fault(RunDir(self.settings.run_dir), self.settings.fault, "report")
        wanted = dict(job.wanted)
        documents = [d for d in read_documents(job.shard, *job.columns, bad=[])[0] if d.doc_id in wanted]
        missing = sorted(set(wanted) - {d.doc_id for d in documents})
        if missing:
            raise ReportError(f"{job.shard.path} rows {job.shard.row_start}-{job.shard.row_stop}: documents "
                             f"{missing[:5]} are no longer there; the corpus changed since the run (rerun msif run)")
        union = sorted({q for d in documents for q in wanted[d.doc_id]})
        column = {q: i for i, q in enumerate(union)}
        per_layer = lm.score(document_examples(documents), self._select(union)).per_layer
        out, tokens = [], 0
        for k, doc in enumerate(documents):
            queries = wanted[doc.doc_id]
            ids, per_position = lm.token_scores(doc.input_ids if doc.input_ids is not None else doc.text,
                                                self._select(queries))
            text, offsets = self._display(doc, ids)
            credited = credit_predicted_tokens(per_position)
            segments = segment_scores(credited, doc.starts) if doc.starts is not None else None
            tokens += len(ids)
            out.append({
                "doc_id": doc.doc_id, "text": text, "offsets": offsets,
                "starts": sorted({0, *doc.starts}) if doc.starts is not None else [],
                "queries": {q: {"tokens": credited[:, i].tolist(), "layers": per_layer[:, k, column[q]].tolist(),
                                "segments": segments[:, i].tolist() if segments is not None else []}
                            for i, q in enumerate(queries)},
            })
        return {"layers": lm.layers, "documents": out, "tokens": tokens, "seconds": round(time.monotonic() - start, 3)}

