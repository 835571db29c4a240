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

import json
import time
from dataclasses import dataclass
from typing import Sequence

import ray
import torch

from msif_ray.data import Shard, read_documents
from msif_ray.influence import Examples, TrackedLM
from msif_ray.models import load_model, load_tokenizer, pick_device
from msif_ray.storage import RunDir

QUERY_VECTORS = "queries/preconditioned.safetensors"


def load_query_vectors(store: RunDir) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The preconditioned queries Ṽ_q of a run: (query ids, {layer: [Q, out, in(+1)]}) on CPU.

    The one place the report reads ``queries/preconditioned.safetensors``; query ids are a JSON
    list in its metadata, in the order of the tensors' first axis.
    """
    if not store.exists(QUERY_VECTORS):
        raise FileNotFoundError(f"{store.url(QUERY_VECTORS)}: no preconditioned queries; run `msif run` first")
    tensors, metadata = store.load_tensors(QUERY_VECTORS)
    if "query_ids" not in metadata:
        raise ValueError(f"{store.url(QUERY_VECTORS)}: no query_ids in its metadata")
    return json.loads(metadata["query_ids"]), tensors


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


@dataclass(frozen=True)
class ExplainJob:
    """The shown documents of one shard: ``wanted`` is ((doc_id, (query id, ...)), ...)."""

    shard: Shard
    id_column: str
    text_column: str
    wanted: tuple[tuple[str, tuple[int, ...]], ...]


def credit_predicted_tokens(per_position: torch.Tensor) -> torch.Tensor:
    """[T, Q] contributions by input position -> by predicted token: row t + 1 gets position t's.

    Row 0 is zero (token 0 is predicted by nothing); the last position's term, which predicts no
    token (and is exactly zero in a causal model), is dropped.
    """
    credited = torch.zeros_like(per_position)
    credited[1:] = per_position[:-1]
    return credited


@ray.remote
class ReportWorker:
    def __init__(self, settings: ReportSettings):
        torch.set_num_threads(settings.num_threads)
        self.settings = settings
        self.tokenizer = load_tokenizer(settings.tokenizer, trust_remote_code=settings.trust_remote_code)
        self.device = pick_device(settings.num_gpus)
        self._lm: TrackedLM | None = None
        self._vectors: dict[str, torch.Tensor] = {}
        self._query_index: dict[str, int] = {}

    def ready(self) -> bool:
        return True

    def _load(self) -> TrackedLM:
        if self._lm is None:
            s = self.settings
            model = load_model(s.model, self.device, s.trust_remote_code)
            self._lm = TrackedLM(model, self.tokenizer, s.include, s.exclude, s.max_length, s.batch_size)
            query_ids, self._vectors = load_query_vectors(RunDir(s.run_dir))
            self._query_index = {q: i for i, q in enumerate(query_ids)}
        return self._lm

    def _select(self, query_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """Ṽ of the given queries only, in that order: {layer: [len(query_ids), out, in(+1)]}."""
        unknown = [q for q in query_ids if q not in self._query_index]
        if unknown:
            raise ValueError(f"queries {unknown[:5]} are not in {QUERY_VECTORS}; rerun msif run")
        index = torch.tensor([self._query_index[q] for q in query_ids], dtype=torch.long)
        return {name: v.index_select(0, index) for name, v in self._vectors.items()}

    def explain(self, job: ExplainJob) -> dict:
        """Breakdowns of the shard's wanted documents: {"layers", "documents", "tokens", "seconds"}.

        Each document: {"doc_id", "text", "offsets": [[start, end], ...] per token, "queries":
        {query id: {"tokens": [T] credited to predicted tokens, "layers": [L]}}}.
        """
        start = time.monotonic()
        lm = self._load()
        wanted = dict(job.wanted)
        documents = [d for d in read_documents(job.shard, job.id_column, job.text_column)[0] if d.doc_id in wanted]
        missing = sorted(set(wanted) - {d.doc_id for d in documents})
        if missing:
            raise ValueError(f"{job.shard.path} rows {job.shard.row_start}-{job.shard.row_stop}: documents "
                             f"{missing[:5]} are no longer there; the corpus changed since the run (rerun msif run)")
        union = sorted({q for d in documents for q in wanted[d.doc_id]})
        column = {q: i for i, q in enumerate(union)}
        per_layer = lm.score(Examples.documents([d.text for d in documents]), self._select(union)).per_layer
        out, tokens = [], 0
        for k, doc in enumerate(documents):
            queries = wanted[doc.doc_id]
            ids, per_position = lm.token_scores(doc.text, self._select(queries))
            encoding = self.tokenizer(doc.text, add_special_tokens=True, return_offsets_mapping=True)
            if list(encoding["input_ids"]) != list(ids):
                raise RuntimeError(f"document {doc.doc_id!r}: windows do not reproduce the tokenization")
            credited = credit_predicted_tokens(per_position)
            tokens += len(ids)
            out.append({
                "doc_id": doc.doc_id, "text": doc.text, "offsets": [list(o) for o in encoding["offset_mapping"]],
                "queries": {q: {"tokens": credited[:, i].tolist(), "layers": per_layer[:, k, column[q]].tolist()}
                            for i, q in enumerate(queries)},
            })
        return {"layers": lm.layers, "documents": out, "tokens": tokens, "seconds": round(time.monotonic() - start, 3)}

