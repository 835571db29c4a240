"""``msif tune CONFIG --queries dev.jsonl --gold gold.jsonl``: choose the method's settings on a
small labelled set of queries whose source documents are known.

Each trial is the config with one combination of the swept settings (``method``,
``factors.damping_pretrain``, ``factors.damping_finetune``, ``scoring.normalize``) and the
development queries, run by the ordinary pipeline in the config's own run directory, so every
stage that does not depend on the swept setting is reused by its content key: the factors are
fitted once (or not at all, when the run directory has them), a damping sweep re-preconditions the
queries and re-scores, a normalisation sweep only re-scores. A trial is scored by the rank of its
queries' gold documents in its top k:

    MRR         mean over queries of 1 / rank of the first gold document (0 when none is in the top k)
    Recall@10   mean over queries of the share of its gold documents in the top 10

with a 95% bootstrap interval of the MRR over queries. The best trial (MRR, then Recall@10) is
written as a full config (the user's queries kept). The run directory's own result is put back at
the end: the config is run again with every stage reused, which republishes it. The trials are
kept in the run directory (``layout.TUNE_TRIALS``).
"""

from __future__ import annotations

import itertools
import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import yaml

from msif_ray.config import Config, ConfigError, config_from_dict
from msif_ray.errors import UserError
from msif_ray.store import layout
from msif_ray.store.data import read_pairs
from msif_ray.store.storage import RunDir

DEFAULT_DAMPINGS = ("auto:0.001", "auto:0.01", "auto:0.1", "auto:1")
DEFAULT_NORMALIZE = ("none", "self")  # unit ranks each query's documents as self does
BOOTSTRAP_SAMPLES = 1000


class TuneError(UserError, ValueError):
    """Unusable development queries or gold labels; the message names the file and the fix."""


@dataclass(frozen=True)
class Trial:
    """One combination of swept settings (dotted config keys) and how its top k found the gold documents."""

    settings: dict[str, object]
    mrr: float
    mrr_interval: tuple[float, float]
    recall_at_10: float
    seconds: float
    scores_key: str  # scores/<key>/topk.parquet holds this trial's result


def read_gold(path: str, query_ids: Sequence[str]) -> dict[str, set[str]]:
    """``{query id: gold doc ids}`` from JSON Lines of ``{"query_id": ..., "doc_ids": [...]}``, one line
    per development query."""
    gold: dict[str, set[str]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TuneError(f"--gold {path}: no such file") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TuneError(f"--gold {path}, line {number}: invalid JSON ({err.msg})") from None
        query, docs = (row.get("query_id"), row.get("doc_ids")) if isinstance(row, dict) else (None, None)
        if not isinstance(query, str) or not isinstance(docs, list) or not docs or not all(isinstance(d, str) for d in docs):
            raise TuneError(f'--gold {path}, line {number}: expected {{"query_id": "...", "doc_ids": ["...", ...]}} '
                            "with at least one doc id")
        gold.setdefault(query, set()).update(docs)
    missing, unknown = sorted(set(query_ids) - gold.keys()), sorted(gold.keys() - set(query_ids))
    if missing or unknown:
        raise TuneError(f"--gold {path}: " + "; ".join(
            part for part in (f"no gold documents for queries {missing[:5]}" if missing else "",
                              f"queries {unknown[:5]} are not in --queries" if unknown else "") if part))
    return gold


def retrieval_metrics(ranked: dict[str, list[str]], gold: dict[str, set[str]], seed: int = 0
                      ) -> tuple[float, tuple[float, float], float]:
    """MRR, its 95% bootstrap interval over queries, and Recall@10 of ranked doc ids (best first) per query."""
    reciprocal, recall = [], []
    for query, sources in gold.items():
        docs = ranked.get(query, [])
        first = next((rank for rank, doc in enumerate(docs, 1) if doc in sources), None)
        reciprocal.append(0.0 if first is None else 1.0 / first)
        recall.append(len(sources & set(docs[:10])) / len(sources))
    n = len(reciprocal)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(reciprocal, k=n)) / n for _ in range(BOOTSTRAP_SAMPLES))
    interval = (means[int(0.025 * BOOTSTRAP_SAMPLES)], means[int(0.975 * BOOTSTRAP_SAMPLES) - 1])
    return sum(reciprocal) / n, interval, sum(recall) / n


def trial_settings(methods: Sequence[str], damping_pretrain: Sequence[str], damping_finetune: Sequence[str],
                   normalize: Sequence[str]) -> list[dict[str, object]]:
    """Every combination of the swept values that changes something: grad_dot has no dampings,
    single_stage no fine-tuning damping."""
    seen, out = set(), []
    for method, lam, alpha, norm in itertools.product(methods, damping_pretrain, damping_finetune, normalize):
        settings = {"method": method, "scoring.normalize": norm}
        if method != "grad_dot":
            settings["factors.damping_pretrain"] = lam
        if method == "multi_stage":
            settings["factors.damping_finetune"] = alpha
        key = json.dumps(settings, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(settings)
    return out


def trial_config(config: Config, settings: dict[str, object], queries: str | None) -> Config:
    """The config with ``settings`` (and ``queries`` as its only query file, when given), validated again."""
    values = config.to_dict()
    for dotted, value in settings.items():
        node = values
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    if queries is not None:
        values["data"]["queries"]["paths"] = [queries]
    values["scoring"]["top_k"] = max(values["scoring"]["top_k"], 10)  # Recall@10 needs the top 10
    return config_from_dict(values, ".")


def read_labels(config: Config, queries: str, gold_path: str) -> dict[str, set[str]]:
    """The gold documents of each development query (read with the config's query columns)."""
    q = config.data.queries
    return read_gold(gold_path, [p.id for p in read_pairs([queries], q.prompt_column, q.completion_column, q.id_column)])


def tune(config: Config, queries: str, gold: dict[str, set[str]], run: Callable[[Config], None],
         settings: list[dict[str, object]], log: Callable[[str], None] = print) -> list[Trial]:
    """Run every trial (``run(config)``: the pipeline, in the config's run directory) and score it."""
    store = RunDir(config.run_dir)
    trials = []
    for number, trial in enumerate(settings, 1):
        started = time.monotonic()
        run(trial_config(config, trial, queries))
        key = layout.read_manifest(store)["stages"]["scores"]["fingerprint"]
        ranked: dict[str, list[str]] = {}
        for row in store.read_parquet(layout.scores_result(key, "topk")).to_pylist():
            ranked.setdefault(row["query_id"], []).append(row["doc_id"])
        mrr, interval, recall = retrieval_metrics(ranked, gold)
        trials.append(Trial(trial, mrr, interval, recall, time.monotonic() - started, key))
        log(f"[tune] trial {number}/{len(settings)} {_describe(trial)}: MRR {mrr:.3f}, Recall@10 {recall:.3f}")
        store.write_json(layout.TUNE_TRIALS, {"queries": queries, "trials": [asdict(t) for t in trials]})
    return trials


def ranked_trials(trials: list[Trial]) -> list[Trial]:
    """Best first: by MRR, then Recall@10."""
    return sorted(trials, key=lambda t: (-t.mrr, -t.recall_at_10))


def write_best(config: Config, best: Trial, path: str) -> None:
    """The config with the best trial's settings (the user's own queries kept) as YAML."""
    tuned = trial_config(config, best.settings, None)
    values = replace(tuned, scoring=replace(tuned.scoring, top_k=config.scoring.top_k)).to_dict()
    header = (f"# written by msif tune: MRR {best.mrr:.3f} (95% interval {best.mrr_interval[0]:.3f}-"
              f"{best.mrr_interval[1]:.3f}), Recall@10 {best.recall_at_10:.3f} on the development queries\n")
    Path(path).write_text(header + yaml.safe_dump(values, sort_keys=False), encoding="utf-8")


def format_trials(trials: list[Trial]) -> str:
    """The trials as a table, best first."""
    rows = [["method", "damping_pretrain", "damping_finetune", "normalize", "MRR", "95% interval", "Recall@10", "seconds"]]
    for t in ranked_trials(trials):
        s = t.settings
        rows.append([str(s.get("method")), str(s.get("factors.damping_pretrain", "-")),
                     str(s.get("factors.damping_finetune", "-")), str(s.get("scoring.normalize")), f"{t.mrr:.3f}",
                     f"{t.mrr_interval[0]:.3f}-{t.mrr_interval[1]:.3f}", f"{t.recall_at_10:.3f}", f"{t.seconds:.1f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _describe(settings: dict[str, object]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in settings.items())


def parse_values(text: str | None, default: Sequence[str], name: str) -> list[str]:
    """A comma-separated CLI list, or ``default``."""
    if text is None:
        return list(default)
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise ConfigError(f"{name}: expected a comma-separated list of values")
    return values
