"""Corpus readers against the covariance pass: reading must never be the bottleneck.

    python benchmarks/bench_readers.py [--smoke]

Corpus: 4000 synthetic English-like documents (sentences of Zipf-drawn words: common function
words and made-up words from a seeded RNG), about 200-400 tokens each, and a byte-level BPE (``tokenizers``,
vocab 4096) trained on them (no download). The corpus is written in every form the readers take:

  text    Parquet, JSON Lines (plain, .gz, .zst), a ``datasets`` save_to_disk folder (Arrow)
  tokens  a Parquet token column (each document's ids); the token stream (documents joined by eos)
          packed into sequences of 256: a Megatron .bin/.idx pair, a .npy array, a raw uint16 array

Reader cost: ``expand_paths`` + ``plan_shards`` (1000 rows per shard, the default) + ``read_documents``
of every shard: read tok/s. Text forms also pay ``tokenizer(texts)["input_ids"]`` per shard, as the
workers do (``engine.gradients.encode_documents``): read+tokenize tok/s. Token forms skip it (same
figure). Median of 3 repetitions (min and max in the JSON); tokens = the tokens the form holds.

Covariance pass: ``engine.curvature.accumulate_covariances`` (sampled Fisher, the default) on a
Pythia-160m-shaped GPT-NeoX with random weights (hidden 768, 12 layers, 12 heads, intermediate 3072,
vocab 50304, rotary 0.25, untied head; built from its config), float32, CPU, over the first 32
documents (max_length 256, batch 8, ``make_windows``/``make_batches``) after one warm-up batch.
Ratio = reader tok/s / covariance tok/s, on read+tokenize (>> 1: reading is never the bottleneck).

Clock: this process's CPU time (``time.process_time``), 1 torch thread, tokenizers' parallelism off
(TOKENIZERS_PARALLELISM=false): one worker on one CPU. Wall times are in the JSON too.
``--smoke``: 50 documents, a tiny model (hidden 64, 2 layers, 4 heads, vocab 50304), 8 documents
for the covariance pass (CI size). Results: ``benchmarks/results/readers.json`` and ``readers.png``
(``readers.smoke.*`` for ``--smoke``).
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers is imported: one core, like a worker

import argparse
import gzip
import json
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's msif_ray, not an installed one

from common import new_figure, print_table, result_paths, save_figure, setup, write_json

from msif_ray.demo.toy import train_tokenizer
from msif_ray.engine.curvature import accumulate_covariances
from msif_ray.engine.gradients import encode_documents, make_batches, make_windows, pad_token_id
from msif_ray.engine.modules import LayerTaps, select_modules
from msif_ray.store.data import expand_paths, plan_shards, read_documents
from msif_ray.store.formats.megatron import MAGIC

FUNCTION_WORDS = ["the", "of", "and", "to", "a", "in", "is", "was", "that", "for", "it", "as", "with", "on", "by",
                  "at", "from", "his", "her", "they", "this", "which", "or", "had", "are", "but", "not", "be", "one",
                  "have", "were", "an", "their", "all", "there", "been", "has", "when", "who", "more", "will", "would",
                  "into", "its", "no", "out", "so", "up", "if", "about", "than", "them", "some", "time", "could"]
MODELS = {"160m": (768, 12, 12, 3072), "smoke": (64, 2, 4, 256)}  # hidden, layers, heads, intermediate
SEQUENCE = 256  # tokens per packed sequence
ROWS_PER_SHARD = 1000
REPS = 3


def make_texts(count: int, seed: int = 0) -> list[str]:
    """Documents of 18-30 sentences of 8-14 words; words drawn with Zipf weights."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    made_up = list(dict.fromkeys("".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(3000)))
    words = FUNCTION_WORDS + made_up
    weights = [1 / (rank + 1) for rank in range(len(words))]
    texts = []
    for _ in range(count):
        sentences = []
        for _ in range(rng.randint(18, 30)):
            s = rng.choices(words, weights, k=rng.randint(8, 14))
            sentences.append(" ".join([s[0].capitalize(), *s[1:]]) + rng.choice(".....?!"))
        texts.append(" ".join(sentences))
    return texts


def write_megatron(prefix: Path, sequences: np.ndarray) -> None:
    """A Megatron indexed dataset of uint16 sequences (``store/formats/megatron.py``)."""
    sizes = np.full(len(sequences), sequences.shape[1], np.int32)
    pointers = (np.arange(len(sequences), dtype=np.int64) * sequences.shape[1] * 2)
    documents = np.arange(len(sequences) + 1, dtype=np.int64)
    prefix.with_suffix(".bin").write_bytes(sequences.astype(np.uint16).tobytes())
    prefix.with_suffix(".idx").write_bytes(MAGIC + struct.pack("<QBQQ", 1, 8, len(sequences), len(documents))
                                           + sizes.tobytes() + pointers.tobytes() + documents.tobytes())


def write_forms(root: Path, texts: list[str], ids: list[list[int]], eos: int) -> dict[str, dict]:
    """form -> {path, files (on disk), tokens, text, layout}."""
    doc_ids = [f"doc-{i:06d}" for i in range(len(texts))]
    lines = "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(doc_ids, texts)).encode()
    pq.write_table(pa.table({"id": doc_ids, "text": texts}), root / "c.parquet")
    (root / "c.jsonl").write_bytes(lines)
    (root / "c.jsonl.gz").write_bytes(gzip.compress(lines))
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    datasets.Dataset.from_dict({"id": doc_ids, "text": texts}).save_to_disk(str(root / "saved"))
    pq.write_table(pa.table({"id": doc_ids, "input_ids": ids}), root / "tokens.parquet")
    stream = [t for seq in ids for t in seq + [eos]]
    packed = np.array(stream[: len(stream) // SEQUENCE * SEQUENCE], np.uint16).reshape(-1, SEQUENCE)
    write_megatron(root / "packed", packed)
    np.save(root / "packed.npy", packed)
    (root / "raw.bin").write_bytes(packed.tobytes())
    forms = [("parquet", ["c.parquet"], "text"), ("jsonl", ["c.jsonl"], "text"), ("jsonl.gz", ["c.jsonl.gz"], "text"),
             ("jsonl.zst", ["c.jsonl.zst"], "text"), ("save_to_disk", ["saved"], "text"),
             ("parquet tokens", ["tokens.parquet"], "column"), ("megatron", ["packed.bin", "packed.idx"], "packed"),
             ("npy", ["packed.npy"], "packed"), (f"raw uint16x{SEQUENCE}", ["raw.bin"], "packed")]
    out = {}
    for name, names, kind in forms:
        files = [root / f for f in names]
        size = sum(f.stat().st_size for p in files for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
        out[name] = {"path": str(files[0]), "bytes": size, "text": kind == "text",
                     "tokens": packed.size if kind == "packed" else sum(map(len, ids)),
                     "token_column": "input_ids" if kind == "column" else None,
                     "layout": f"uint16x{SEQUENCE}" if name.startswith("raw") else None}
    return out


def git(*args: str) -> str:
    run = subprocess.run(["git", "--no-optional-locks", *args], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent)
    return run.stdout.strip()


def timed(fn):
    """(result, CPU seconds, wall seconds) of fn()."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.process_time() - cpu, time.perf_counter() - wall


def time_form(form: dict, tokenizer) -> dict:
    """REPS repetitions of reading the whole form (and, for text, tokenizing it shard by shard)."""
    runs = []
    for _ in range(REPS):
        def read():
            shards = plan_shards(expand_paths([form["path"]]), ROWS_PER_SHARD, form["layout"])
            return [read_documents(s, "id", "text", form["token_column"])[0] for s in shards]

        per_shard, read_cpu, read_wall = timed(read)
        tok_cpu = tok_wall = 0.0
        if form["text"]:
            encoded, tok_cpu, tok_wall = timed(lambda shards=per_shard: [tokenizer([d.text for d in docs])["input_ids"]
                                                                          for docs in shards])
            assert sum(len(i) for shard in encoded for i in shard) == form["tokens"]
        else:
            assert sum(len(d.input_ids) for docs in per_shard for d in docs) == form["tokens"]
        runs.append({"read_cpu": read_cpu, "read_wall": read_wall, "tokenize_cpu": tok_cpu, "tokenize_wall": tok_wall})
    out = {"runs": runs}
    for what, seconds in (("read", lambda r: r["read_cpu"]), ("read+tokenize", lambda r: r["read_cpu"] + r["tokenize_cpu"])):
        rates = sorted(form["tokens"] / seconds(r) for r in runs)
        out[what] = {"median": statistics.median(rates), "min": rates[0], "max": rates[-1]}
    return out


def covariance_rate(shape: str, tokenizer, texts: list[str]) -> dict:
    """tok/s of accumulate_covariances over ``texts`` (after one untimed warm-up batch)."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    hidden, layers, heads, inter = MODELS[shape]
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=inter, rotary_pct=0.25, max_position_embeddings=2048,
                           tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    taps = LayerTaps(select_modules(model))
    batches = list(make_batches(make_windows(encode_documents(tokenizer, texts), SEQUENCE), 8, pad_token_id(tokenizer)))
    accumulate_covariances(model, taps, batches[:1])  # warm-up
    sums, cpu, wall = timed(lambda: accumulate_covariances(model, taps, batches))
    return {"model": config.to_diff_dict() | {"shape": shape}, "documents": len(texts), "windows": sums.num_windows,
            "batches": len(batches), "tokens": sums.num_tokens, "cpu_s": cpu, "wall_s": wall,
            "tok_per_s": sums.num_tokens / cpu, "tok_per_s_wall": sums.num_tokens / wall}


def plot(results: dict, cov_rate: float, path: Path) -> None:
    fig, axes = new_figure(size=(8.0, 4.5))
    ax, names = axes[0][0], list(results)
    x = np.arange(len(names))
    for offset, what in ((-0.2, "read"), (0.2, "read+tokenize")):
        ax.bar(x + offset, [results[n][what]["median"] / cov_rate for n in names], 0.4, label=what)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("reader tok/s / covariance-pass tok/s")
    ax.set_title(f"Readers vs the covariance pass ({cov_rate:.0f} tok/s), 1 thread, CPU time")
    ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="50 documents and a tiny model (CI)")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    setup(threads=1)
    datasets.disable_progress_bars()
    json_path, png_path = result_paths("readers", args.smoke, args.out_dir)
    start, load_before = time.perf_counter(), os.getloadavg()

    texts = make_texts(50 if args.smoke else 4000)
    tokenizer = train_tokenizer(texts, 4096)
    ids = tokenizer(texts)["input_ids"]
    lengths = sorted(map(len, ids))
    assert max(max(i) for i in ids) < 50304
    print(f"{len(texts)} documents, {sum(lengths)} tokens ({lengths[0]}-{lengths[-1]}, median "
          f"{lengths[len(lengths) // 2]}), vocab {len(tokenizer)}; torch threads {torch.get_num_threads()}", flush=True)

    results = {}
    with tempfile.TemporaryDirectory(prefix="msif-readers-") as tmp:
        forms = write_forms(Path(tmp), texts, ids, tokenizer.eos_token_id)
        for name, form in forms.items():
            results[name] = {k: v for k, v in form.items() if k != "path"} | time_form(form, tokenizer)
            print(f"  {name}: read {results[name]['read']['median']:,.0f} tok/s, read+tokenize "
                  f"{results[name]['read+tokenize']['median']:,.0f} tok/s", flush=True)
    cov = covariance_rate("smoke" if args.smoke else "160m", tokenizer, texts[: 8 if args.smoke else 32])
    print(f"covariance pass: {cov['tokens']} tokens in {cov['cpu_s']:.1f} s CPU ({cov['wall_s']:.1f} s wall): "
          f"{cov['tok_per_s']:.1f} tok/s", flush=True)
    for r in results.values():
        r["ratio"] = {w: r[w]["median"] / cov["tok_per_s"] for w in ("read", "read+tokenize")}
    load_after = os.getloadavg()

    table = print_table(
        ["form", "bytes on disk", "read tok/s", "read+tokenize tok/s", "ratio to covariance pass"],
        [[n, f"{r['bytes']:,}", f"{r['read']['median']:,.0f}",
          f"{r['read+tokenize']['median']:,.0f}" + ("" if r["text"] else " (no tokenizer)"),
          f"{r['ratio']['read+tokenize']:,.0f}x"] for n, r in results.items()])
    print(f"covariance pass: {cov['tok_per_s']:.1f} tok/s (CPU time); torch threads {torch.get_num_threads()}; "
          f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; wall {time.perf_counter() - start:.0f} s")
    payload = {"command": " ".join(["python", *sys.argv]), "commit": git("rev-parse", "HEAD"),
               "worktree_dirty": bool(git("status", "--porcelain")), "clock": "process_time (CPU)",
               "torch_threads": torch.get_num_threads(), "tokenizers_parallelism": False,
               "load_average_before": load_before, "load_average_after": load_after,
               "wall_s": time.perf_counter() - start,
               "corpus": {"documents": len(texts), "tokens": sum(lengths), "min_tokens": lengths[0],
                          "max_tokens": lengths[-1], "vocab": len(tokenizer), "rows_per_shard": ROWS_PER_SHARD,
                          "packed_sequence": SEQUENCE},
               "covariance": cov, "forms": results, "table": table}
    write_json(json_path, payload)
    plot(results, cov["tok_per_s"], png_path)
    return payload


if __name__ == "__main__":
    main()
