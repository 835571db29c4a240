"""The typed run configuration of docs/design.md (the public interface), validated when it is loaded.

A config is a YAML mapping; every key has a default except the paths. ``load_config`` reads a
file, ``config_from_dict`` a mapping already in memory. Either returns a frozen ``Config`` or
raises ``ConfigError`` naming the dotted key at fault (``data.corpus.id_column``) and what to do.

Paths: a local relative path resolves against the config file's directory (``base_dir``) and
becomes absolute; ``s3://...`` and other URLs are kept as written. Globs in ``data.*.paths`` are
kept as patterns (``store.data.expand_paths`` expands them).

Which model does what (see also ``Config.query_model`` and ``Config.corpus_model``):

- ``multi_stage`` needs both models: queries at ``models.finetuned``, corpus at ``models.pretrained``.
- ``single_stage`` and ``grad_dot`` use one model for both sides: ``models.finetuned`` when given,
  else ``models.pretrained``. ``data.finetune`` is not used.
- The tokenizer is ``models.tokenizer`` when given, else that of the query model.

Beyond the keys of the original interface the config accepts ``models.trust_remote_code`` (off unless
turned on), ``data.rows_per_shard`` (the unit of work and of resumption), the ``budget`` section
(memory per worker, layer groups, query batches and groups; see ``Budget``),
``ray.num_cpus_per_worker`` (CPU threads per worker), ``ray.precision`` (``auto``: bf16 weights on a
GPU that supports it, float32 on CPU) and ``ray.checkpoint_seconds`` (how often a worker commits
the factor sums it has accumulated).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml
from msif_ray.errors import UserError

Method = Literal["multi_stage", "single_stage", "grad_dot"]
Fisher = Literal["sampled", "empirical"]
ScoringMode = Literal["exact", "index"]
Normalize = Literal["none", "self", "unit"]
Precision = Literal["auto", "bf16", "fp32"]
Damping = float | str  # a positive float, "auto" or "auto:<m>" (engine/curvature.relative_damping)

METHODS: tuple[Method, ...] = ("multi_stage", "single_stage", "grad_dot")
FISHERS: tuple[Fisher, ...] = ("sampled", "empirical")
SCORING_MODES: tuple[ScoringMode, ...] = ("exact", "index")
NORMALIZE: tuple[Normalize, ...] = ("none", "self", "unit")
PRECISIONS: tuple[Precision, ...] = ("auto", "bf16", "fp32")

_REQUIRED: Any = object()  # the default of a key that must be set


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message names the dotted key and the fix."""


@dataclass(frozen=True)
class Models:
    """Hugging Face causal-LM directories, local or remote (``s3://``).

    ``finetuned`` is required by ``multi_stage`` only. ``tokenizer`` defaults to the query model's
    directory (``finetuned``, or ``pretrained`` when there is none).
    """

    pretrained: str
    finetuned: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class Corpus:
    """Pre-training documents: one document per row, as text or as the token ids it was trained on.

    ``token_column``: a column of token-id lists, read as they are (no tokenizer in the loop); the
    token formats (Megatron, arrays of sequences) always are. ``boundary_column``: for packed
    training sequences, a column of the token offsets where each source document inside the
    sequence starts; scores stay per sequence, the report splits them per source document. ``sequence_length`` and
    ``token_dtype``: the layout of a raw array of token ids without a header (``store/formats/memmap.py``).
    """

    paths: tuple[str, ...]
    id_column: str = "id"
    text_column: str = "text"
    token_column: str | None = None
    boundary_column: str | None = None
    sequence_length: int | None = None
    token_dtype: str = "uint16"

    @property
    def layout(self) -> str | None:
        """A raw token array's ``"<dtype>x<length>"``, or None."""
        return f"{self.token_dtype}x{self.sequence_length}" if self.sequence_length else None

    @property
    def columns(self) -> tuple[str, str, str | None, str | None]:
        """(id, text, token, boundary) columns: what a worker reads a corpus shard with."""
        return self.id_column, self.text_column, self.token_column, self.boundary_column


@dataclass(frozen=True)
class Finetune:
    """Fine-tuning examples, prompt and completion; required (non-empty ``paths``) by ``multi_stage`` only."""

    paths: tuple[str, ...] = ()
    prompt_column: str = "prompt"
    completion_column: str = "completion"


@dataclass(frozen=True)
class Queries:
    """The (prompt, completion) pairs to explain, each with a unique id."""

    paths: tuple[str, ...]
    id_column: str = "id"
    prompt_column: str = "prompt"
    completion_column: str = "completion"


@dataclass(frozen=True)
class Data:
    max_length: int
    corpus: Corpus
    finetune: Finetune
    queries: Queries
    rows_per_shard: int = 1000
    on_bad_document: str = "skip"


# λ = 0.01 x each layer's mean eigenvalue: chosen on held-out queries of two fact-tracing worlds, 3 seeds
# each (benchmarks/README.md, "Defaults chosen on held-out queries"); the engine's own ``auto`` (0.1)
# approximates influence best (bench_exact_influence), a smaller λ retrieves the sources better.
DEFAULT_DAMPING_PRETRAIN = "auto:0.01"


@dataclass(frozen=True)
class Factors:
    """EK-FAC settings. A damping is a positive float (absolute), ``"auto"`` (0.1 × the layer's mean
    eigenvalue) or ``"auto:<m>"`` (m × it: ``auto:0.01``, the pre-training default), which sweeps
    without knowing the scale of Λ.

    Pre-training factors are fitted once per base model (on ``max_examples`` documents, or all) and
    kept when corpus shards are appended; ``refit: true`` fits them again on the current corpus
    whenever its shards differ from those they were fitted on.
    """

    fisher: Fisher = "sampled"
    damping_pretrain: Damping = DEFAULT_DAMPING_PRETRAIN
    damping_finetune: Damping = "auto"
    max_examples: int | None = None
    refit: bool = False


@dataclass(frozen=True)
class Modules:
    """Regexes (``re.search``) on module names; None keeps the default (every Linear in the blocks)."""

    include: str | None = None
    exclude: str | None = None


DEFAULT_QUERY_RANK = 32  # chosen from benchmarks/bench_scale.py's rank table (benchmarks/README.md)
TOKEN_DTYPES = ("uint16", "int32", "uint32", "int64")
# data.on_bad_document: a document that cannot be decoded, sits in a corrupt data page, or whose loss
# or gradient is non-finite is left out of every sum and listed (skip), or stops the run (fail).
ON_BAD_DOCUMENT = ("skip", "fail")
DEFAULT_RERANK = 100  # chosen from benchmarks/bench_index.py's table (benchmarks/README.md)
DEFAULT_RERANK_MAX = 400  # 2% of the 20,000-document benchmark world (benchmarks/README.md)
DEFAULT_INDEX_TERMS = 512  # chosen from benchmarks/bench_index.py's designs table (benchmarks/README.md)


@dataclass(frozen=True)
class Scoring:
    """``query_rank``: rank of each layer's preconditioned query gradient (None: full rank, dense).

    ``mode: index`` scores queries against the corpus gradient index; ``rerank`` candidates per
    query (at least ``top_k``; 0 = none) are then re-scored exactly, then as many again, round by
    round, for the queries whose top k the last round changed, up to ``rerank_max`` candidates
    (``rerank`` when lower: no rounds).

    ``normalize``: ``none`` ranks by the score; ``self`` by score / √(document self-influence)
    (RelatIF); ``unit`` by the cosine of the whitened query and document (``scoring.normalize_scores``).
    """

    top_k: int = 100
    mode: ScoringMode = "exact"
    query_rank: int | None = DEFAULT_QUERY_RANK
    rerank: int = DEFAULT_RERANK
    rerank_max: int = DEFAULT_RERANK_MAX
    normalize: Normalize = "none"

    @property
    def candidates(self) -> int:
        """Candidates kept per query by the scan: all that the re-scoring may reach, at least top_k."""
        return self.top_k if self.rerank == 0 else max(self.rerank_max, self.rerank, self.top_k)


@dataclass(frozen=True)
class Index:
    """The corpus gradient index (``scoring.mode: index``): ``path`` None = ``<run_dir>/index``.

    ``terms``: each document keeps its largest ``terms`` gradient terms per layer, in the
    pre-training eigenbasis (``engine/index.py``): 6 bytes a term.
    """

    path: str | None = None
    terms: int = DEFAULT_INDEX_TERMS


@dataclass(frozen=True)
class Budget:
    """Memory every process stays within; None = chosen by ``msif plan`` from the machine.

    ``worker_memory_gb``: per worker (device memory on a GPU; the node's memory / workers on CPU).
    ``layer_groups``: the tracked layers are split into this many groups for the factor passes.
    ``query_batch_size``: queries preconditioned together; ``query_group_size``: queries scored by
    one corpus pass (more queries than that take several passes).
    """

    worker_memory_gb: float | None = None
    layer_groups: int | None = None
    query_batch_size: int | None = None
    query_group_size: int | None = None


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide to run: ``address`` None starts (or joins) a local Ray."""

    address: str | None = None
    num_workers: int = 1
    num_gpus_per_worker: float = 0.0
    num_cpus_per_worker: int = 1
    batch_size: int = 8
    precision: Precision = "auto"
    checkpoint_seconds: float = 600.0
    task_timeout_s: float | None = None  # None: auto (pool.Deadline), from the plan and the pass's own jobs


@dataclass(frozen=True)
class Config:
    run_dir: str
    models: Models
    data: Data
    method: Method = "multi_stage"
    factors: Factors = Factors()
    modules: Modules = Modules()
    scoring: Scoring = Scoring()
    index: Index = Index()
    budget: Budget = Budget()
    ray: RayConfig = RayConfig()
    seed: int = 0

    @property
    def query_model(self) -> str:
        """The model whose gradients of the queries are taken: ``finetuned`` if given, else ``pretrained``."""
        return self.models.finetuned or self.models.pretrained

    @property
    def corpus_model(self) -> str:
        """The model whose corpus gradients (and corpus factors) are taken.

        ``pretrained`` for ``multi_stage``; the query model for ``single_stage`` and ``grad_dot``.
        """
        return self.models.pretrained if self.method == "multi_stage" else self.query_model

    @property
    def tokenizer(self) -> str:
        """``models.tokenizer`` if given, else the query model's directory."""
        return self.models.tokenizer or self.query_model

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-ready values; ``config_from_dict(c.to_dict(), any_dir) == c``."""
        return _plain(dataclasses.asdict(self))


def cache_root() -> Path:
    """``$MSIF_CACHE``, else ``~/.cache/msif-ray``: the digest memo, the model cache, the demo."""
    return Path(os.environ.get("MSIF_CACHE", Path.home() / ".cache" / "msif-ray"))


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a YAML config file; relative paths in it resolve against its directory."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    try:
        values = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        line = err.problem_mark.line + 1 if err.problem_mark else "?"
        raise ConfigError(f"{path}, line {line}: invalid YAML: {err.problem}; fix the syntax there") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a YAML mapping of settings (run_dir, models, data, ...)")
    return config_from_dict(values, path.parent)


def config_from_dict(values: dict[str, Any], base_dir: str | os.PathLike) -> Config:
    """Validate a config mapping; local relative paths resolve against ``base_dir``."""
    root = _Section(values, "", Path(base_dir))
    config = Config(
        run_dir=root.path("run_dir"),
        models=_models(root.section("models")),
        data=_data(root.section("data")),
        method=root.choice("method", METHODS, "multi_stage"),
        factors=_factors(root.section("factors")),
        modules=_modules(root.section("modules")),
        scoring=_scoring(root.section("scoring")),
        index=_index(root.section("index")),
        budget=_budget(root.section("budget")),
        ray=_ray(root.section("ray")),
        seed=root.integer("seed", 0),
    )
    root.finish()
    _check_method_inputs(config)
    return config


# --------------------------------------------------------------------------- one function per section


def _models(s: _Section) -> Models:
    models = Models(
        pretrained=s.path("pretrained"),
        finetuned=s.path("finetuned", None),
        tokenizer=s.path("tokenizer", None),
        trust_remote_code=s.boolean("trust_remote_code", False),
    )
    s.finish()
    return models


def _data(s: _Section) -> Data:
    corpus, finetune, queries = s.section("corpus"), s.section("finetune"), s.section("queries")
    data = Data(
        max_length=s.positive_integer("max_length", 256),
        corpus=Corpus(corpus.paths("paths"), corpus.text("id_column", "id"), corpus.text("text_column", "text"),
                      corpus.text("token_column", None), corpus.text("boundary_column", None),
                      corpus.positive_integer("sequence_length", None),
                      corpus.choice("token_dtype", TOKEN_DTYPES, "uint16")),
        finetune=Finetune(finetune.paths("paths", ()), finetune.text("prompt_column", "prompt"),
                          finetune.text("completion_column", "completion")),
        queries=Queries(queries.paths("paths"), queries.text("id_column", "id"), queries.text("prompt_column", "prompt"),
                        queries.text("completion_column", "completion")),
        rows_per_shard=s.positive_integer("rows_per_shard", 1000),
        on_bad_document=s.choice("on_bad_document", ON_BAD_DOCUMENT, "skip"),
    )
    for section in (corpus, finetune, queries, s):
        section.finish()
    return data


def _factors(s: _Section) -> Factors:
    factors = Factors(
        fisher=s.choice("fisher", FISHERS, "sampled"),
        damping_pretrain=s.damping("damping_pretrain", DEFAULT_DAMPING_PRETRAIN),
        damping_finetune=s.damping("damping_finetune", "auto"),
        max_examples=s.positive_integer("max_examples", None),
        refit=s.boolean("refit", False),
    )
    s.finish()
    return factors


def _modules(s: _Section) -> Modules:
    modules = Modules(include=s.regex("include"), exclude=s.regex("exclude"))
    s.finish()
    return modules


def _scoring(s: _Section) -> Scoring:
    rank = s.take("query_rank") if "query_rank" in s.values else DEFAULT_QUERY_RANK
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"{s.dotted('query_rank')}: expected a positive integer or null (full rank), got {_kind(rank)}")
    scoring = Scoring(top_k=s.positive_integer("top_k", 100), mode=s.choice("mode", SCORING_MODES, "exact"),
                      query_rank=rank, rerank=s.non_negative_integer("rerank", DEFAULT_RERANK),
                      rerank_max=s.non_negative_integer("rerank_max", DEFAULT_RERANK_MAX),
                      normalize=s.choice("normalize", NORMALIZE, "none"))
    s.finish()
    return scoring


def _index(s: _Section) -> Index:
    for retired in ("dim", "seed"):
        if retired in s.values:
            raise ConfigError(f"{s.dotted(retired)}: the random k x k sketch index was replaced by each document's "
                              "largest terms in the eigenbasis; remove this key and size the index with index.terms "
                              f"(default {DEFAULT_INDEX_TERMS} per layer); an index built before must be built again")
    index = Index(path=s.path("path", None), terms=s.positive_integer("terms", DEFAULT_INDEX_TERMS))
    s.finish()
    return index


def _budget(s: _Section) -> Budget:
    memory = s.non_negative_number("worker_memory_gb", None)
    if memory is not None and memory <= 0:
        raise ConfigError(f"{s.dotted('worker_memory_gb')}: must be a positive number of GB, got {memory}")
    budget = Budget(
        worker_memory_gb=memory,
        layer_groups=s.positive_integer("layer_groups", None),
        query_batch_size=s.positive_integer("query_batch_size", None),
        query_group_size=s.positive_integer("query_group_size", None),
    )
    s.finish()
    return budget


def _ray(s: _Section) -> RayConfig:
    ray = RayConfig(
        address=s.text("address", None),
        num_workers=s.positive_integer("num_workers", 1),
        num_gpus_per_worker=s.non_negative_number("num_gpus_per_worker", 0.0),
        num_cpus_per_worker=s.positive_integer("num_cpus_per_worker", 1),
        batch_size=s.positive_integer("batch_size", 8),
        precision=s.choice("precision", PRECISIONS, "auto"),
        checkpoint_seconds=s.non_negative_number("checkpoint_seconds", 600.0),
        task_timeout_s=s.seconds_or_auto("task_timeout_s"),
    )
    s.finish()
    return ray


def _check_method_inputs(config: Config) -> None:
    """``multi_stage`` needs the fine-tuned model and its fine-tuning data; the others need neither."""
    if config.method != "multi_stage":
        return
    if config.models.finetuned is None:
        raise ConfigError("models.finetuned: required by method multi_stage; set it to the fine-tuned model's "
                          "directory, or choose method single_stage or grad_dot")
    if not config.data.finetune.paths:
        raise ConfigError("data.finetune.paths: required by method multi_stage; list the fine-tuning data files, "
                          "or choose method single_stage or grad_dot")


# --------------------------------------------------------------------------- reading one mapping


class _Section:
    """One mapping of the config, read key by key; every error names the dotted key.

    Each reader takes a key and its default (``_REQUIRED``: the key must be set), checks the value
    when one is given and returns it. A key that is absent or null takes its default. ``finish``
    then rejects the keys that no reader asked for.
    """

    def __init__(self, values: object, key: str, base_dir: Path):
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{key or 'config'}: expected a mapping of settings, got {_kind(values)}")
        self.values = values
        self.key = key
        self.base_dir = base_dir
        self.known: list[str] = []

    def dotted(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def take(self, name: str) -> object:
        """The value given for ``name``, or None when absent or null."""
        self.known.append(name)
        return self.values.get(name)

    def default(self, name: str, default: Any) -> Any:
        if default is _REQUIRED:
            raise ConfigError(f"{self.dotted(name)}: required; set it in the config")
        return default

    def section(self, name: str) -> _Section:
        return _Section(self.take(name), self.dotted(name), self.base_dir)

    def text(self, name: str, default: Any = _REQUIRED) -> Any:
        value = self.take(name)
        if value is None:
            return self.default(name, default)
        if not (isinstance(value, str) and value.strip()):
            raise ConfigError(f"{self.dotted(name)}: expected a non-empty string, got {_kind(value)}")
        return value

    def path(self, name: str, default: Any = _REQUIRED) -> Any:
        value = self.text(name, default)
        return _resolve(value, self.base_dir) if isinstance(value, str) else value

    def paths(self, name: str, default: Any = _REQUIRED) -> tuple[str, ...]:
        """A list of paths or glob patterns (a single string is a list of one); non-empty when required."""
        value = self.take(name)
        if value is None or value == []:
            return self.default(name, default)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(p, str) and p.strip() for p in items):
            raise ConfigError(f"{self.dotted(name)}: expected a list of paths or glob patterns, got {_kind(value)}")
        return tuple(_resolve(p, self.base_dir) for p in items)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.take(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self.dotted(name)}: expected true or false, got {_kind(value)}")
        return value

    def integer(self, name: str, default: Any) -> Any:
        value = self.take(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.dotted(name)}: expected an integer, got {_kind(value)}")
        return value

    def positive_integer(self, name: str, default: Any) -> Any:
        value = self.integer(name, default)
        if value is not None and value <= 0:
            raise ConfigError(f"{self.dotted(name)}: must be a positive integer, got {value}")
        return value

    def non_negative_integer(self, name: str, default: Any) -> Any:
        value = self.integer(name, default)
        if value is not None and value < 0:
            raise ConfigError(f"{self.dotted(name)}: must be an integer >= 0, got {value}")
        return value

    def non_negative_number(self, name: str, default: Any) -> Any:
        value = self.take(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{self.dotted(name)}: expected a number >= 0, got {_kind(value)}")
        return float(value)

    def seconds_or_auto(self, name: str) -> float | None:
        """A positive number of seconds; ``auto`` (or absent, or null) is None."""
        value = self.take(name)
        if value is None or value == "auto":
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{self.dotted(name)}: expected auto or a positive number of seconds, got {_kind(value)}")
        return float(value)

    def choice(self, name: str, options: tuple[str, ...], default: str) -> Any:
        value = self.take(name)
        if value is None:
            return default
        if value not in options:
            raise ConfigError(f"{self.dotted(name)}: expected one of {', '.join(options)}, got {_kind(value)}")
        return value

    def damping(self, name: str, default: Damping) -> Damping:
        """``auto``, ``auto:<m>`` (m x each layer's mean eigenvalue, m > 0) or a positive number;
        text such as ``1e-4`` (YAML reads it as a string) is accepted."""
        value = self.take(name)
        if value is None:
            return default
        if value == "auto":
            return "auto"
        if isinstance(value, str) and value.startswith("auto:"):
            m = _to_float(value[len("auto:"):])
            if math.isfinite(m) and m > 0:
                return value
        else:
            number = _to_float(value)
            if math.isfinite(number) and number > 0:
                return number
        raise ConfigError(f"{self.dotted(name)}: expected auto, auto:<m> (m x each layer's mean eigenvalue, m > 0, "
                          f"e.g. auto:0.01) or a positive number, got {_kind(value)}")

    def regex(self, name: str) -> str | None:
        value = self.text(name, None)
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ConfigError(f"{self.dotted(name)}: invalid regular expression {value!r} ({err})") from None
        return value

    def finish(self) -> None:
        """Reject the keys that no reader asked for, suggesting the closest known key."""
        for name in self.values:
            if name not in self.known:
                close = difflib.get_close_matches(str(name), self.known, n=1)
                hint = f"did you mean {self.dotted(close[0])}?" if close else f"known keys here: {', '.join(sorted(self.known))}"
                raise ConfigError(f"{self.dotted(str(name))}: unknown key; {hint}")


REDACTED = "REDACTED"


def redact_text(text: str) -> str:
    """``text`` (an error message, a log line) with every URL in it passed through ``redact_secrets``
    (punctuation that ends a sentence after a URL stays outside it)."""
    def redact(match: re.Match) -> str:
        url = match.group()
        core = url.rstrip(":,;.)'\"")
        return redact_secrets(core) + url[len(core):]

    return re.sub(r"[A-Za-z][\w+.-]*://\S+", redact, text)


class _RedactingStream:
    """A text stream that writes through ``redact_text``; everything else is the wrapped stream's."""

    def __init__(self, stream: TextIO):
        self.wrapped = stream

    def write(self, text: str) -> int:
        self.wrapped.write(redact_text(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


class _RedactingFilter(logging.Filter):
    """Masks credentials in a log record's message and its traceback (handlers keep the stream they
    were made with, so wrapping ``sys.stderr`` alone would miss them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info = record.exc_text = None
        record.msg, record.args = redact_text(message), None
        return True


def redact_output() -> None:
    """From now on, mask credentials in URLs in everything this process prints or logs: ``sys.stdout``
    and ``sys.stderr`` write through ``redact_text``, and so does every handler of the root logger.
    ``msif`` calls it first thing, each worker when it starts. Idempotent."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, _RedactingStream):
            setattr(sys, name, _RedactingStream(stream))
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _RedactingFilter) for f in handler.filters):
            handler.addFilter(_RedactingFilter())


def redact_secrets(value: object) -> object:
    """``value`` (a config's ``to_dict()``, or any nested dicts/lists) with credentials in URLs masked.

    In every string that is a URL (``scheme://``): the password of ``user:password@host`` and every
    value of the query string (presigned URLs carry signatures, tokens and key ids there) become
    ``REDACTED``; names, hosts and paths are kept, so a person still sees which file was meant. For
    anything written where others read it: the manifest, logs.
    """
    if isinstance(value, dict):
        return {k: redact_secrets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_secrets(v) for v in value]
    if not (isinstance(value, str) and "://" in value):
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{host}" if ":" in userinfo else f"{REDACTED}@{host}"
    query = urlencode([(k, REDACTED) for k, _ in parse_qsl(parts.query, keep_blank_values=True)], safe=REDACTED)
    if parts.query and not query:
        query = REDACTED  # a query that is not key=value pairs may still be a token
    return urlunsplit((parts.scheme, netloc, parts.path, query, REDACTED if parts.fragment else ""))


def _to_float(value: object) -> float:
    """``value`` as a float, or NaN when it is not a number (booleans are not numbers)."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _resolve(path: str, base_dir: Path) -> str:
    """A URL as is; a local path made absolute against ``base_dir`` (``~`` expanded)."""
    if "://" in path:
        return path
    return os.path.abspath(os.path.join(base_dir, os.path.expanduser(path)))


def _kind(value: object) -> str:
    """A short description of a value for error messages."""
    return f"{value!r} ({type(value).__name__})"


def _plain(value: object) -> object:
    """Tuples become lists, recursively, so that YAML and JSON can write the value."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
