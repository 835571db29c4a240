"""The config of DESIGN.md section 2: defaults, paths, round trips, and every validation error."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from msif_ray.config import Config, ConfigError, config_from_dict, load_config

DESIGN_EXAMPLE = """\
run_dir: runs/example             # local path or s3://bucket/prefix
models:
  pretrained: path/to/pt          # Hugging Face causal-LM dir, local or s3://
  finetuned: path/to/ft
  tokenizer: null                 # defaults to models.finetuned
data:
  max_length: 256
  corpus:   {paths: [corpus/*.parquet], id_column: id, text_column: text}
  finetune: {paths: [ft.parquet], prompt_column: prompt, completion_column: completion}
  queries:  {paths: [queries.jsonl], id_column: id, prompt_column: prompt, completion_column: completion}
method: multi_stage               # multi_stage | single_stage | grad_dot
factors:
  fisher: sampled                 # sampled | empirical
  damping_pretrain: auto          # float | auto
  damping_finetune: auto          # float | auto   (this is α)
  max_examples: null              # corpus subsample used to fit pre-training factors
modules: {include: null, exclude: null}   # regexes on module names; default: every nn.Linear in the transformer blocks
scoring: {top_k: 100, mode: exact}        # exact | index
ray: {address: null, num_workers: 1, num_gpus_per_worker: 0, batch_size: 8}
seed: 0
"""

MINIMAL = {
    "run_dir": "run",
    "models": {"pretrained": "pt", "finetuned": "ft"},
    "data": {"corpus": {"paths": ["corpus.parquet"]}, "finetune": {"paths": ["ft.parquet"]},
             "queries": {"paths": ["queries.jsonl"]}},
}


DELETE = object()  # with_setting's value that removes the key


def with_setting(dotted: str, value: object, base: dict = MINIMAL) -> dict:
    """A copy of ``base`` with ``dotted`` set to ``value`` (``DELETE`` removes the key)."""
    values = copy.deepcopy(base)
    *parents, leaf = dotted.split(".")
    node = values
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return values


def test_design_example_loads_with_paths_resolved_against_the_file(tmp_path: Path) -> None:
    path = tmp_path / "configs" / "example.yaml"
    path.parent.mkdir()
    path.write_text(DESIGN_EXAMPLE)
    config = load_config(path)
    base = tmp_path / "configs"
    assert config.run_dir == str(base / "runs/example")
    assert config.models.pretrained == str(base / "path/to/pt")
    assert config.models.tokenizer is None and config.models.trust_remote_code is False
    assert config.data.corpus.paths == (str(base / "corpus/*.parquet"),)
    assert config.data.queries.id_column == "id"
    assert config.method == "multi_stage"
    assert config.factors.damping_pretrain == "auto" and config.factors.max_examples is None
    assert config.scoring.top_k == 100 and config.ray.num_gpus_per_worker == 0.0
    assert config.tokenizer == str(base / "path/to/ft")


def test_defaults_of_every_optional_key() -> None:
    config = config_from_dict(MINIMAL, "/base")
    assert config.data.max_length == 256 and config.data.rows_per_shard == 1000
    assert (config.data.corpus.id_column, config.data.corpus.text_column) == ("id", "text")
    assert (config.data.finetune.prompt_column, config.data.finetune.completion_column) == ("prompt", "completion")
    assert config.factors.fisher == "sampled" and config.factors.damping_finetune == "auto"
    assert config.modules.include is None and config.modules.exclude is None
    assert config.scoring.mode == "exact"
    assert (config.ray.address, config.ray.num_workers, config.ray.batch_size, config.ray.num_cpus_per_worker) == (None, 1, 8, 1)
    assert config.seed == 0


def test_urls_are_kept_and_absolute_paths_unchanged() -> None:
    values = with_setting("run_dir", "s3://bucket/runs/x")
    values = with_setting("models.pretrained", "/models/pt", values)
    values = with_setting("data.corpus.paths", ["s3://bucket/corpus/*.parquet", "local/*.jsonl"], values)
    config = config_from_dict(values, "/base")
    assert config.run_dir == "s3://bucket/runs/x"
    assert config.models.pretrained == "/models/pt"
    assert config.data.corpus.paths == ("s3://bucket/corpus/*.parquet", "/base/local/*.jsonl")


def test_a_single_path_string_is_a_list_of_one() -> None:
    config = config_from_dict(with_setting("data.queries.paths", "q.jsonl"), "/base")
    assert config.data.queries.paths == ("/base/q.jsonl",)


def test_to_dict_round_trips_through_yaml(tmp_path: Path) -> None:
    values = with_setting("factors.damping_pretrain", 1e-4)
    values = with_setting("modules.include", r"mlp\.", values)
    config = config_from_dict(values, tmp_path)
    assert config_from_dict(config.to_dict(), "/elsewhere") == config
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert load_config(path) == config


def test_default_dampings_are_relative() -> None:
    """λ defaults to 0.01 x each layer's mean eigenvalue (chosen on held-out queries), α to ``auto``."""
    factors = config_from_dict(MINIMAL, "/base").factors
    assert (factors.damping_pretrain, factors.damping_finetune) == ("auto:0.01", "auto")


@pytest.mark.parametrize("value, expected", [(1e-4, 1e-4), (2, 2.0), ("1e-4", 1e-4), ("auto", "auto"), (None, "auto"),
                                             ("auto:0.01", "auto:0.01"), ("auto:1e-3", "auto:1e-3")])
def test_damping_accepts_auto_or_a_positive_number(value: object, expected: object) -> None:
    config = config_from_dict(with_setting("factors.damping_finetune", value), "/base")
    assert config.factors.damping_finetune == expected


@pytest.mark.parametrize("method", ["single_stage", "grad_dot"])
def test_one_model_methods_need_no_finetuned_model_nor_finetune_data(method: str) -> None:
    values = with_setting("models.finetuned", DELETE, with_setting("data.finetune", DELETE))
    config = config_from_dict(with_setting("method", method, values), "/base")
    assert config.query_model == config.corpus_model == config.tokenizer == "/base/pt"
    assert config.data.finetune.paths == ()


def test_model_roles() -> None:
    multi = config_from_dict(MINIMAL, "/base")
    assert (multi.query_model, multi.corpus_model) == ("/base/ft", "/base/pt")
    single = config_from_dict(with_setting("method", "single_stage"), "/base")
    assert (single.query_model, single.corpus_model) == ("/base/ft", "/base/ft")
    tokenizer = config_from_dict(with_setting("models.tokenizer", "tok"), "/base")
    assert tokenizer.tokenizer == "/base/tok"


@pytest.mark.parametrize("dotted, value, names", [
    ("metod", "grad_dot", ["metod", "did you mean method"]),
    ("data.corpus.idcolumn", "doc", ["data.corpus.idcolumn", "id_column"]),
    ("ray.gpus", 1, ["ray.gpus", "unknown key"]),
    ("data.corpus.id_column", 3, ["data.corpus.id_column", "string"]),
    ("data.queries.prompt_column", "", ["data.queries.prompt_column", "string"]),
    ("method", "two_stage", ["method", "multi_stage", "single_stage", "grad_dot", "two_stage"]),
    ("factors.fisher", "true", ["factors.fisher", "sampled", "empirical"]),
    ("scoring.mode", "approx", ["scoring.mode", "exact", "index"]),
    ("scoring.normalize", "sqrt_self", ["scoring.normalize", "none", "self", "unit"]),
    ("data.max_length", 0, ["data.max_length", "positive"]),
    ("data.rows_per_shard", -5, ["data.rows_per_shard", "positive"]),
    ("ray.batch_size", 0, ["ray.batch_size", "positive"]),
    ("ray.num_workers", 1.5, ["ray.num_workers", "integer"]),
    ("scoring.top_k", True, ["scoring.top_k", "integer"]),
    ("factors.max_examples", 0, ["factors.max_examples", "positive"]),
    ("ray.num_gpus_per_worker", -1, ["ray.num_gpus_per_worker", ">= 0"]),
    ("seed", "zero", ["seed", "integer"]),
    ("factors.damping_pretrain", "big", ["factors.damping_pretrain", "auto", "positive"]),
    ("factors.damping_finetune", 0, ["factors.damping_finetune", "positive"]),
    ("factors.damping_pretrain", "auto:0", ["factors.damping_pretrain", "auto:<m>", "m > 0"]),
    ("factors.damping_pretrain", "auto:x", ["factors.damping_pretrain", "auto:0.01"]),
    ("factors.damping_finetune", -1e-3, ["factors.damping_finetune", "positive"]),
    ("factors.damping_finetune", True, ["factors.damping_finetune", "positive"]),
    ("models.trust_remote_code", "yes", ["models.trust_remote_code", "true or false"]),
    ("modules.include", "mlp(", ["modules.include", "regular expression"]),
    ("modules.exclude", ["a"], ["modules.exclude", "string"]),
    ("data", ["corpus"], ["data", "mapping"]),
    ("data.corpus.paths", [1, 2], ["data.corpus.paths", "list of paths"]),
    ("run_dir", DELETE, ["run_dir", "required"]),
    ("models.pretrained", DELETE, ["models.pretrained", "required"]),
    ("data.corpus.paths", DELETE, ["data.corpus.paths", "required"]),
    ("data.corpus.paths", [], ["data.corpus.paths", "required"]),
    ("data.queries.paths", DELETE, ["data.queries.paths", "required"]),
    ("models.finetuned", DELETE, ["models.finetuned", "multi_stage", "single_stage"]),
    ("data.finetune.paths", DELETE, ["data.finetune.paths", "multi_stage"]),
])
def test_each_invalid_setting_names_its_key(dotted: str, value: object, names: list[str]) -> None:
    with pytest.raises(ConfigError) as error:
        config_from_dict(with_setting(dotted, value), "/base")
    for name in names:
        assert name in str(error.value)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_malformed_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("run_dir: runs/x\nmodels:\n  pretrained: [pt\nmethod: grad_dot\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message and "line 4" in message


def test_a_yaml_file_that_is_not_a_mapping_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- run_dir\n- models\n")
    with pytest.raises(ConfigError, match="list.yaml"):
        load_config(path)


def test_a_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_config_is_frozen() -> None:
    config = config_from_dict(MINIMAL, "/base")
    assert isinstance(config, Config)
    with pytest.raises(AttributeError):
        config.seed = 1  # type: ignore[misc]


@pytest.mark.parametrize("value, expected", [(None, None), ("auto", None), (30, 30.0), (0.5, 0.5)])
def test_task_timeout_is_auto_or_positive_seconds(value, expected) -> None:
    assert config_from_dict(with_setting("ray.task_timeout_s", value), "/base").ray.task_timeout_s == expected


@pytest.mark.parametrize("value", [0, -5, "soon", True, float("inf")])
def test_a_bad_task_timeout_is_refused_naming_the_key(value) -> None:
    with pytest.raises(ConfigError, match=r"ray\.task_timeout_s: expected auto or a positive number of seconds"):
        config_from_dict(with_setting("ray.task_timeout_s", value), "/base")
