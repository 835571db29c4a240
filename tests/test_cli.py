"""``msif run`` on bad input: a clear error naming the culprit, exit code 2, raised before any heavy
pass (so before Ray is even started), and nothing written to the run directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from msif_ray.cli import main
from msif_ray.store.layout import MANIFEST, TOPK
from msif_ray.store.storage import RunDir
from tiny import make_model, make_tokenizer


def write_config(tmp_path: Path, world, **overrides) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(world.config(tmp_path / "run", **overrides)))
    return path


def fails_early(config: Path, capsys, *expected: str) -> None:
    """Exit code 2, every expected fragment in the one-line message, no artifact left behind."""
    capsys.readouterr()  # drop what building the fixtures printed
    assert main(["run", str(config)]) == 2
    message = capsys.readouterr().err
    assert message.startswith("msif: error: ")
    for fragment in expected:
        assert fragment in message, message
    run_dir = config.parent / "run"
    assert not run_dir.exists() or not any(run_dir.iterdir())


def corpus_file(tmp_path: Path, rows: list[dict], name: str = "corpus.parquet") -> str:
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("text", pa.string())])), path)
    return str(path)


def test_missing_file(tmp_path, world, capsys):
    missing = str(tmp_path / "nowhere" / "corpus-*.parquet")
    fails_early(write_config(tmp_path, world, **{"data.corpus.paths": [missing]}), capsys, missing)


def test_credentials_in_a_url_are_masked_in_the_error(tmp_path, world, capsys):
    """An error naming a URL with a password and a signed query prints neither (fsspec's in-memory
    file system: a real URL that no network is needed to resolve)."""
    url = "memory://reader:s3cr3t@bucket/corpus-*.parquet?X-Amz-Signature=abc123"
    config = write_config(tmp_path, world, **{"data.corpus.paths": [url]})
    capsys.readouterr()
    assert main(["run", str(config)]) == 2
    message = capsys.readouterr().err
    assert "memory://reader:REDACTED@bucket/corpus-*.parquet?X-Amz-Signature=REDACTED: no file matches" in message
    assert "s3cr3t" not in message and "abc123" not in message


def test_missing_column(tmp_path, world, capsys):
    config = write_config(tmp_path, world, **{"data.corpus.text_column": "body"})
    fails_early(config, capsys, "'body'", str(world.corpus), "text")


def test_empty_corpus(tmp_path, world, capsys):
    fails_early(write_config(tmp_path, world, **{"data.corpus.paths": [corpus_file(tmp_path, [])]}), capsys, "corpus.parquet")


def test_non_utf8_text(tmp_path, world, capsys):
    """Refused before any pass under ``data.on_bad_document: fail`` (``skip``, the default, leaves it out:
    tests/store/test_bad_rows.py)."""
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "caf\xe9 au lait"}\n')
    config = write_config(tmp_path, world, **{"data.corpus.paths": [str(path)], "data.on_bad_document": "fail"})
    fails_early(config, capsys, str(path), "row 1", "not valid UTF-8")


def test_tokenizer_larger_than_the_embedding(tmp_path, world, capsys):
    tokenizer = make_tokenizer()
    small = tmp_path / "small"
    make_model("gpt_neox", small, vocab_size=100)
    tokenizer.save_pretrained(small)
    config = write_config(tmp_path, world, **{"models.pretrained": str(small), "models.finetuned": str(small)})
    fails_early(config, capsys, "models.pretrained", "300 tokens", "100")


def test_models_of_different_shapes(tmp_path, world, capsys):
    wide = tmp_path / "wide"
    make_model("gpt_neox", wide, vocab_size=300, hidden=32)
    make_tokenizer(wide)
    fails_early(write_config(tmp_path, world, **{"models.finetuned": str(wide)}), capsys, "hidden_size: 16 vs 32")


def test_models_of_different_architectures(tmp_path, world, capsys):
    llama = tmp_path / "llama"
    make_model("llama", llama, vocab_size=300)
    make_tokenizer(llama)
    fails_early(write_config(tmp_path, world, **{"models.finetuned": str(llama)}), capsys, "model_type: 'gpt_neox' vs 'llama'")


def test_query_with_empty_completion(tmp_path, world, capsys):
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"id": "q-empty", "prompt": "Where?", "completion": ""}) + "\n")
    fails_early(write_config(tmp_path, world, **{"data.queries.paths": [str(queries)]}), capsys, "q-empty", "empty completion")


def test_malformed_yaml(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("run_dir: runs/x\nmodels: {pretrained: [unclosed\n")
    fails_early(config, capsys, str(config), "line")


def test_unknown_key_and_wrong_type(tmp_path, world, capsys):
    fails_early(write_config(tmp_path, world, **{"scoring.topk": 3}), capsys, "scoring.topk", "top_k")
    fails_early(write_config(tmp_path, world, **{"ray.num_workers": "two"}), capsys, "ray.num_workers")


def test_empty_documents_are_skipped_and_counted(tmp_path, world, ray_session, capsys):
    rows = pq.read_table(world.corpus).to_pylist() + [{"id": "blank", "text": "   \n"}, {"id": "empty", "text": ""}]
    config = write_config(tmp_path, world, method="grad_dot", **{"data.corpus.paths": [corpus_file(tmp_path, rows)]})
    assert main(["run", str(config)]) == 0
    summary = capsys.readouterr().out.split("── msif run: finished in", 1)[1]  # the run ends with its summary
    assert "scores: shards 4 computed / 0 reused" in summary and "report/index.html" in summary
    store = RunDir(str(tmp_path / "run"))
    assert store.exists("report/index.html")
    assert store.read_json(MANIFEST)["stages"]["scores"]["passes"]["scores"]["skipped_empty"] == 2
    assert not {"blank", "empty"} & set(store.read_parquet(TOPK)["doc_id"].to_pylist())
    assert main(["status", str(tmp_path / "run")]) == 0
    assert "scores" in capsys.readouterr().out


def test_status_of_an_empty_directory(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 0
    assert "no run here yet" in capsys.readouterr().out


@pytest.fixture(autouse=True)
def _no_run_dirs_left(tmp_path):
    yield
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


def test_module_regex_that_matches_nothing(tmp_path, world, capsys):
    config = write_config(tmp_path, world, **{"modules.include": "no_such_layer"})
    fails_early(config, capsys, "modules.include", "'no_such_layer'", "gpt_neox.layers.0.mlp.dense_h_to_4h")


def test_budget_too_small_fails_in_plan_and_run(tmp_path, world, capsys):
    """A budget too small for the model is refused by ``msif plan`` and by ``msif run`` before any heavy
    pass (before Ray starts), naming the knob; a sufficient budget plans fine and names its choices."""
    config = write_config(tmp_path, world, **{"budget.worker_memory_gb": 0.05})
    capsys.readouterr()
    assert main(["plan", str(config)]) == 2
    message = capsys.readouterr().err
    assert "exceed the budget" in message and "budget.worker_memory_gb" in message and "ray.batch_size" in message
    fails_early(config, capsys, "budget.worker_memory_gb", "ray.batch_size")

    ok = write_config(tmp_path, world, **{"budget.worker_memory_gb": 4, "budget.layer_groups": 2})
    assert main(["plan", str(ok)]) == 0
    printed = capsys.readouterr().out
    assert "layer groups 2" in printed and "factors/pretrain" in printed and "scores" in printed
    assert "self_influence" not in printed
    normalized = write_config(tmp_path, world, **{"budget.worker_memory_gb": 4, "budget.layer_groups": 2,
                                                  "scoring.normalize": "self"})
    assert main(["plan", str(normalized)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "self_influence" in x)
    assert "2 layer groups: 2 passes over each shard" in line
    indexed = write_config(tmp_path, world, **{"budget.worker_memory_gb": 4, "scoring.normalize": "self",
                                               "scoring.mode": "index"})
    assert main(["plan", str(indexed)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "self_influence" in x)
    assert "computed by the index pass" in line
    assert main(["plan", "--device", "h200", str(ok)]) == 0
    assert "NVIDIA H200" in capsys.readouterr().out


# --------------------------------------------------------------------------- secrets


@pytest.mark.slow
def test_a_credentialed_endpoint_and_ray_address_are_never_printed(tmp_path, world):
    """``msif run`` with a password in the S3 endpoint URL (s3fs refuses such URLs: exit 1, an
    outage's traceback), then with one in ``ray.address`` of a cluster that is not there (exit 2,
    naming the key and the address): no line of stdout or stderr of either holds the password."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def msif_run(run_dir: str, env: dict, **overrides) -> subprocess.CompletedProcess:
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(world.config(run_dir, **overrides)))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env
        return subprocess.run([sys.executable, "-m", "msif_ray.cli", "run", str(config)], env=env,
                              capture_output=True, text=True, timeout=300)

    endpoint = msif_run("s3://bucket/run", {"AWS_ENDPOINT_URL": f"http://minio:hunter2-secret@127.0.0.1:{port}",
                                            "AWS_MAX_ATTEMPTS": "1", "MSIF_STORAGE_RETRIES": "2"})
    output = endpoint.stdout + endpoint.stderr
    assert endpoint.returncode == 1 and "Traceback" in output, output
    assert "hunter2-secret" not in output
    address = msif_run(str(tmp_path / "run"), {}, **{"ray.address": f"ray://admin:hunter2-secret@127.0.0.1:{port}"})
    output = address.stdout + address.stderr
    assert address.returncode == 2, output
    assert f"msif: error: ray.address: cannot reach the Ray cluster at ray://admin:REDACTED@127.0.0.1:{port}" in output
    assert "hunter2-secret" not in output


def test_every_print_and_log_line_is_redacted(capsys):
    """After ``redact_output``: prints, log records and their tracebacks have URL credentials masked."""
    import logging
    import sys

    from msif_ray.config import redact_output

    streams = sys.stdout, sys.stderr
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    try:
        redact_output()
        print("reading s3://bucket/key?X-Amz-Signature=abc123secret")
        try:
            raise ConnectionError('Could not connect to "http://user:pw-secret@minio:9000/bucket"')
        except ConnectionError:
            logging.getLogger("msif_ray.test").warning("ray at %s failed", "ray://admin:pw-secret@head:10001",
                                                       exc_info=True)
        out, err = capsys.readouterr()
    finally:
        logging.getLogger().removeHandler(handler)
        sys.stdout, sys.stderr = streams
    assert "s3://bucket/key?X-Amz-Signature=REDACTED" in out and "abc123secret" not in out
    assert "ray://admin:REDACTED@head:10001" in err and "http://user:REDACTED@minio:9000/bucket" in err
    assert "pw-secret" not in err and "Traceback" in err
