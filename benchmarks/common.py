"""What the quality benchmarks share: generated worlds, loaded models, metrics, result files.

Every benchmark builds its world with ``msif_ray.demo.toy`` (a ``ToySpec`` and a seed), loads the
pre-trained and fine-tuned models from it, scores with the engine's Python API in-process, and
writes ``benchmarks/results/<name>.json`` and ``<name>.png`` (``--smoke`` runs write
``<name>.smoke.json`` / ``.png`` so that they never overwrite the committed full-size results).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from msif_ray.demo import toy
from msif_ray.demo.toy import ToySpec, ToyWorld

RESULTS = Path(__file__).resolve().parent / "results"


def cache_dir() -> Path:
    """Where built worlds are kept between runs: $MSIF_BENCH_CACHE, else ~/.cache/msif-bench."""
    return Path(os.environ.get("MSIF_BENCH_CACHE", Path.home() / ".cache" / "msif-bench"))


def setup(threads: int = 1) -> None:
    """One torch thread (the machine is shared; every timing says so), quiet library warnings and bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0]}


# --------------------------------------------------------------------------- worlds


@dataclass
class Document:
    id: str
    text: str
    entity: str | None      # the entity a fact document, an alias link or an entity distractor is about
    value: str | None       # the value a fact document or a value distractor names
    relation: str | None    # a fact document's relation
    held_out: bool          # a fact document about a query entity
    link: bool = False      # an alias link (alias worlds: says that the entity's alias and name are one person)


@dataclass
class LoadedWorld:
    """A built toy world in memory: documents with their provenance, fine-tuning pairs, queries, models."""

    world: ToyWorld
    spec: ToySpec
    seed: int
    documents: list[Document]
    finetune: list[tuple[str, str]]
    queries: list[dict]
    tokenizer: object
    pretrained: torch.nn.Module
    finetuned: torch.nn.Module

    @property
    def texts(self) -> list[str]:
        return [d.text for d in self.documents]

    @property
    def doc_ids(self) -> list[str]:
        return [d.id for d in self.documents]

    def gold_indices(self) -> list[list[int]]:
        index = {d.id: i for i, d in enumerate(self.documents)}
        return [[index[g] for g in q["gold_doc_ids"]] for q in self.queries]


def load_world(spec: ToySpec, seed: int, dtype: torch.dtype = torch.float32, log=print) -> LoadedWorld:
    """Build (or reuse from the cache) the world of ``spec`` and ``seed``; reconstruct each document's provenance.

    The provenance (which fact or distractor a document is) is not written by the build; it is
    regenerated here from the same seed (toy's build draws facts and corpus first) and checked
    against the corpus file.
    """
    key = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:10]
    world = toy.build_toy_world(cache_dir() / f"world-{key}-seed{seed}", spec, seed, log=log)
    rng = random.Random(seed)
    facts = toy.make_facts(spec, rng)
    corpus = toy.make_corpus(facts, spec, rng)
    on_disk = pq.read_table(world.corpus_path).to_pylist()
    if [(d["id"], d["text"]) for d in corpus] != [(r["id"], r["text"]) for r in on_disk]:
        raise RuntimeError(f"{world.corpus_path}: corpus does not match its regenerated provenance; delete {world.root}")
    documents = []
    for d in corpus:
        fact, distractor, link = d["fact"], d.get("distractor"), d.get("link")
        entity = fact.entity if fact else link or (distractor[1] if distractor and distractor[0] == "entity" else None)
        value = fact.value if fact else (distractor[1] if distractor and distractor[0] == "value" else None)
        documents.append(Document(d["id"], d["text"], entity, value, fact.relation if fact else None,
                                  bool(fact and fact.held_out), link is not None))
    finetune = [(r["prompt"], r["completion"]) for r in pq.read_table(world.finetune_path).to_pylist()]
    queries = [json.loads(line) for line in world.queries_path.read_text().splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(world.finetuned_dir)
    pt = AutoModelForCausalLM.from_pretrained(world.pretrained_dir, dtype=dtype).eval()
    ft = AutoModelForCausalLM.from_pretrained(world.finetuned_dir, dtype=dtype).eval()
    return LoadedWorld(world, spec, seed, documents, finetune, queries, tokenizer, pt, ft)


def query_entity(query: dict) -> str:
    """"Q: Where was Zorbel Quint born? A:" -> "Zorbel Quint" (the toy's two question templates)."""
    prompt = query["prompt"]
    for relation, (_, question, _) in toy.RELATIONS.items():
        head, tail = question.split("{name}")
        body = prompt[len("Q: "):-len(" A:")]
        if body.startswith(head) and body.endswith(tail):
            return body[len(head):len(body) - len(tail)]
    raise ValueError(f"not a toy question: {prompt!r}")


# --------------------------------------------------------------------------- metrics


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks of each column of x [N, Q] (0-based, float64); tied values share their mean rank."""
    x = x.double()
    out = torch.empty_like(x)
    for j in range(x.shape[1]):
        values, inverse = torch.unique(x[:, j], return_inverse=True)
        counts = torch.bincount(inverse, minlength=len(values)).double()
        first = torch.cumsum(counts, 0) - counts  # rank of the first element of each distinct value
        out[:, j] = (first + (counts - 1) / 2)[inverse]
    return out


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the columns of a and b, both [N, Q] (or [N]): [Q]."""
    a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(1e-300)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
    return pearson(ranks(a), ranks(b))


def gold_ranks(scores: torch.Tensor, gold: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Per query, the 1-based ranks of its gold documents: scores [N docs, Q], higher = more relevant.

    Ties are broken against the gold documents (a gold document ranks after every non-gold
    document with the same score), and gold documents tied with each other take consecutive
    ranks, so that no two documents share a rank (Recall@1 is at most 1 / |gold|). Only the gold
    documents' ranks are computed, O(N·G).
    """
    out = []
    for q, gold_ids in enumerate(gold):
        s = scores[:, q].double()
        is_gold = torch.zeros(len(s), dtype=torch.bool)
        is_gold[list(gold_ids)] = True
        g = s[is_gold]  # [G]
        # rank of a gold doc: 1 + docs strictly better + non-gold docs tied with it + gold docs tied before it
        better = (s[None, :] > g[:, None]).sum(1) + ((s[None, :] == g[:, None]) & ~is_gold[None, :]).sum(1)
        tied_before = torch.tril(g[None, :] == g[:, None], diagonal=-1).sum(1)
        out.append((better + tied_before + 1).double())
    return out


def retrieval(scores: torch.Tensor, gold: Sequence[Sequence[int]], cutoffs: Sequence[int] = (1, 10),
              per_query: bool = False) -> dict[str, float] | dict[str, list[float]]:
    """MRR of the first gold document and Recall@k of the gold set, averaged over queries (or, with
    ``per_query``, each query's reciprocal rank and recalls). Ranks as in ``gold_ranks``."""
    ranks_of = gold_ranks(scores, gold)
    out = {"mrr": [float(1.0 / r.min()) for r in ranks_of]}
    out |= {f"recall@{k}": [float((r <= k).double().mean()) for r in ranks_of] for k in cutoffs}
    return out if per_query else {k: sum(v) / len(gold) for k, v in out.items()}


def bootstrap_interval(values: Sequence[float], samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``values`` (resampling them with replacement)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    means = t[torch.randint(len(t), (samples, len(t)), generator=g)].mean(1).sort().values
    return float(means[int(0.025 * samples)]), float(means[int(0.975 * samples) - 1])


def mean_spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max of per-seed figures."""
    t = torch.tensor(list(values), dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(t) > 1 else 0.0,
            "min": float(t.min()), "max": float(t.max()), "n": len(t)}


def fmt(stats: dict[str, float], digits: int = 3) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


# --------------------------------------------------------------------------- output


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (printed, and returned for the README)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def result_paths(name: str, smoke: bool, out_dir: Path | None = None) -> tuple[Path, Path]:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name}.smoke" if smoke else name
    return out_dir / f"{stem}.json", out_dir / f"{stem}.png"


def provenance(where: Path = Path(__file__).resolve().parent) -> dict:
    """The commit a benchmark ran at (``git describe --dirty`` of the checkout holding ``where``) and
    the machine's load average (1, 5, 15 min) when it wrote its result."""
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=where)
    return {"commit": commit.stdout.strip(), "load_average": os.getloadavg()}


def write_json(path: Path, payload: dict) -> None:
    payload = {"written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": machine(),
               **provenance()} | payload
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    print(f"wrote {path}", flush=True)


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (5.5, 4.0)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", flush=True)


# --------------------------------------------------------------------------- engine helpers


def layer_damping(factors, name: str, damping: "float | str") -> float:
    """A layer's damping: a float, ``auto`` (the engine's), or ``"<m>x"`` = m x mean(Λ) of the layer."""
    layer = factors.layers[name]
    if isinstance(damping, str) and damping.endswith("x"):
        return float(damping[:-1]) * float(layer.lambdas.double().mean())
    return layer.damping(damping)


def inverse(factors, grads: dict[str, torch.Tensor], damping: "float | str") -> dict[str, torch.Tensor]:
    """(H + λI)⁻¹ per layer, λ as in ``layer_damping``."""
    return {n: factors.layers[n].inverse_apply(v, layer_damping(factors, n, damping)) for n, v in grads.items()}


def multi_stage_chain(grads, pretrain, finetune, damping_pretrain="auto", damping_finetune="auto"):
    """α · (H_pt + λI)⁻¹ (H_ft + αI)⁻¹ G_q per layer (the engine's chain, dampings as in ``layer_damping``)."""
    after = inverse(pretrain, inverse(finetune, grads, damping_finetune), damping_pretrain)
    return {n: layer_damping(finetune, n, damping_finetune) * v for n, v in after.items()}


def flat(grads: dict[str, torch.Tensor], layers: Sequence[str]) -> torch.Tensor:
    """Per-layer [Q, out, in] -> one [Q, P] matrix (layers in ``layers`` order)."""
    return torch.cat([grads[n].flatten(1) for n in layers], dim=1)


def self_influence(factors, grads: dict[str, torch.Tensor], damping) -> torch.Tensor:
    """G_mᵀ (H + λI)⁻¹ G_m for each example: Σ_layers Σ (Q_Sᵀ G Q_A)² ⊘ (Λ + λ); grads [N, out, in] -> [N]."""
    total = 0.0
    for name, g in grads.items():
        f = factors.layers[name]
        q_a, q_s, lam = (t.double() for t in (f.a_vectors, f.s_vectors, f.lambdas))
        rotated = q_s.t() @ g.double() @ q_a
        total = total + (rotated.square() / (lam + layer_damping(factors, name, damping))).sum((1, 2))
    return total


def corpus_pass(lm, texts: Sequence[str], queries: dict[str, torch.Tensor],
                self_influences: dict[str, tuple[object, object]] | None = None) -> dict[str, torch.Tensor]:
    """One forward+backward pass over the corpus at ``lm``'s model: everything per document at once.

    ``queries``: name -> [Q, P] flat preconditioned queries (``flat``), each scored against every
    document: out[name] [N, Q]. Also out["__norm__"] [N] (‖G_m‖) and, for each name -> (factors,
    damping) of ``self_influences``, out[name] [N] = G_mᵀ(H + λI)⁻¹G_m. Every document must fit
    in one window (then its gradient is the window's).
    """
    from msif_ray.engine.gradients import window_gradients
    from msif_ray.engine.api import Examples

    batches = lm.batches(Examples.documents(texts))
    if sum(len(b.examples) for b in batches) != len(texts):
        raise ValueError("a document was split into windows; raise max_length")
    n = len(texts)
    out = {k: torch.zeros(n, v.shape[0], dtype=torch.float64) for k, v in queries.items()}
    out["__norm__"] = torch.zeros(n, dtype=torch.float64)
    for k in self_influences or {}:
        out[k] = torch.zeros(n, dtype=torch.float64)
    for batch in batches:
        grads = window_gradients(lm.model, lm.taps, batch)
        g = flat(grads, lm.layers)
        for k, v in queries.items():
            out[k][batch.examples] = (g @ v.to(g.dtype).t()).double()
        out["__norm__"][batch.examples] = g.double().norm(dim=1)
        for k, (factors, damping) in (self_influences or {}).items():
            out[k][batch.examples] = self_influence(factors, grads, damping)
    return out
