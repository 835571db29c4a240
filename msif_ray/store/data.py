"""Corpora, fine-tuning data and queries: Parquet or JSON Lines files, local or remote (``s3://``).

Every file is opened through fsspec, so a local path and a URL take the same code path.

Formats, chosen by extension: ``.parquet``; ``.jsonl`` and ``.json`` (JSON Lines: one JSON object
per line; blank lines are ignored). A *row* is one record, numbered from 0 within its file.

A corpus is read shard by shard: ``plan_shards`` cuts every file into contiguous row ranges from
metadata alone (Parquet footers; one streaming pass over a JSON Lines file to count its lines),
and ``read_documents`` reads one shard, so memory holds one shard at a time. Fine-tuning data
and queries are small and read whole with ``read_pairs`` (or per shard with ``read_pair_shard``).

Errors in the input raise ``DataError`` naming the file, the row and the column. Transient
object-store errors are retried (``store.storage.with_retries``) around whole operations: a
listing, a footer, a whole shard or file of pairs, which are re-read from their start.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
import numpy as np
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from msif_ray.store.digests import file_digests
from msif_ray.store.storage import with_retries
from msif_ray.errors import UserError

PARQUET_SUFFIXES = (".parquet",)
JSONL_SUFFIXES = (".jsonl", ".json")
BATCH_ROWS = 1024  # Parquet rows decoded at a time
READ_BUFFER = 1 << 20  # bytes; Parquet column chunks are streamed through a buffer this large


class DataError(UserError, ValueError):
    """Input data that cannot be used; the message names the file, the row and the column."""


@dataclass(frozen=True)
class Shard:
    """Rows ``[row_start, row_stop)`` of one file: the unit of work and of resumption.

    ``shard_id`` follows the file's content and the rows, never its path (``shard_id``): the same
    file anywhere (another folder, another machine) has the same shard ids, a file rewritten in
    place new ones. ``path`` is where the rows are read from, and what messages name.
    ``byte_offset`` is where row ``row_start`` begins in a JSON Lines file (0 for Parquet),
    so that reading a shard does not re-read the lines before it.
    """

    path: str
    row_start: int
    row_stop: int
    shard_id: str
    byte_offset: int = 0

    @property
    def num_rows(self) -> int:
        return self.row_stop - self.row_start


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


@dataclass(frozen=True)
class PromptCompletion:
    id: str
    prompt: str
    completion: str


# --------------------------------------------------------------------------- files


def expand_paths(patterns: Sequence[str]) -> list[str]:
    """The files matching each path or glob pattern, sorted within a pattern, without duplicates.

    Local results are absolute paths; remote ones URLs (``s3://bucket/key``). A pattern that
    matches no file raises ``DataError`` naming it.
    """
    files: list[str] = []
    for pattern in patterns:
        fs, path = fsspec.core.url_to_fs(pattern)
        try:
            matches = with_retries(lambda: fs.glob(path, detail=True), f"list {pattern}")
        except PermissionError as err:
            raise DataError(f"{pattern}: access denied ({err}); check the credentials and the bucket policy") from None
        found = sorted(_url(fs, p) for p, info in matches.items() if info["type"] == "file")
        if not found:
            raise DataError(f"{pattern}: no file matches this path or pattern; check data paths in the config")
        files += [f for f in found if f not in files]
    return files


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _format(path: str) -> str:
    """``"parquet"`` or ``"jsonl"``, from the file's extension."""
    lowered = path.lower()
    if lowered.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lowered.endswith(JSONL_SUFFIXES):
        return "jsonl"
    raise DataError(f"{path}: unknown file format; use Parquet (.parquet) or JSON Lines (.jsonl, .json)")


def _open(path: str) -> BinaryIO:
    """A binary file object for a local path or a URL."""
    fs, local = fsspec.core.url_to_fs(path)
    return fs.open(local, "rb")


def check_columns(paths: Sequence[str], columns: Sequence[str]) -> None:
    """Raise ``DataError`` early when a file lacks one of ``columns``.

    Parquet: from the schema in the footer. JSON Lines: from the keys of the file's first record
    (a later record without the column is caught when it is read).
    """
    for path in paths:
        _require_columns(path, with_retries(lambda: _columns_of(path), f"read {path}"), columns)


def _columns_of(path: str) -> list[str]:
    if _format(path) == "parquet":
        with _open(path) as f:
            return pq.ParquetFile(f).schema_arrow.names
    first = next(_jsonl_records(path, 0, 1, 0), None)
    return list(first[1]) if first else []


def _require_columns(path: str, available: Sequence[str], columns: Sequence[str], row: int | None = None) -> None:
    where = path if row is None else f"{path}, row {row}"
    for column in columns:
        if column not in available:
            raise DataError(f"{where}: no column {column!r}; available columns: {', '.join(map(str, available)) or 'none'}."
                            " Set the matching *_column in the config")


# --------------------------------------------------------------------------- shards


def plan_shards(paths: Sequence[str], rows_per_shard: int) -> list[Shard]:
    """Cut the files into shards of ``rows_per_shard`` rows (the last of each file may be shorter).

    Deterministic: the same file contents and size give the same shards and ids, wherever the
    files are. Raises ``DataError`` when the files hold no row at all, or when two of them have the
    same content (their rows would be counted twice, and their shards would share ids).
    """
    if rows_per_shard <= 0:
        raise ValueError(f"rows_per_shard must be positive, got {rows_per_shard}")
    shards = []
    first: dict[str, str] = {}  # file digest -> the first path with that content
    for path, content in zip(paths, file_digests(paths)):
        if content in first:
            raise DataError(f"{path}: the same content as {first[content]} (a copy of one file); its rows would be "
                            "counted twice: list only one of them")
        first[content] = path
        num_rows, byte_offsets = with_retries(lambda: _count_rows(path, rows_per_shard), f"read {path}")
        for start in range(0, num_rows, rows_per_shard):
            stop = min(start + rows_per_shard, num_rows)
            shards.append(Shard(path, start, stop, shard_id(content, start, stop), byte_offsets.get(start, 0)))
    if not shards:
        listed = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        raise DataError(f"{listed}: no rows at all; an empty corpus or data set cannot be used")
    return shards


def shard_id(content: str, row_start: int, row_stop: int) -> str:
    """``<first 12 hex digits of the file's digest>-<row_start>-<row_stop>``: safe as a file name.

    ``content`` is the file's ``digests.file_digest``; no path or file name enters the id, so the
    id (and the seed of the shard's sampled labels) follows the content.
    """
    return f"{content[:12]}-{row_start}-{row_stop}"


def _count_rows(path: str, rows_per_shard: int) -> tuple[int, dict[int, int]]:
    """A file's row count, and the byte offsets of the rows where its shards begin (JSON Lines only)."""
    return _parquet_offsets(path) if _format(path) == "parquet" else _jsonl_offsets(path, rows_per_shard)


def _parquet_offsets(path: str) -> tuple[int, dict[int, int]]:
    """The row count from the Parquet footer; Parquet shards need no byte offsets."""
    with _open(path) as f:
        return pq.ParquetFile(f).metadata.num_rows, {}


def _jsonl_offsets(path: str, rows_per_shard: int) -> tuple[int, dict[int, int]]:
    """The record count of a JSON Lines file, and the byte offset of every ``rows_per_shard``-th record."""
    num_rows, position, offsets = 0, 0, {}
    with _open(path) as f:
        for line in f:
            if line.strip():
                if num_rows % rows_per_shard == 0:
                    offsets[num_rows] = position
                num_rows += 1
            position += len(line)
    return num_rows, offsets


# --------------------------------------------------------------------------- rows


def _rows(path: str, columns: Sequence[str], start: int = 0, stop: int | None = None,
          byte_offset: int = 0) -> Iterator[tuple[int, dict]]:
    """``(row, record)`` for rows ``[start, stop)`` of a file, streamed; records hold ``columns``."""
    if _format(path) == "parquet":
        yield from _parquet_records(path, columns, start, stop)
        return
    for row, record in _jsonl_records(path, start, stop, byte_offset):
        _require_columns(path, list(record), columns, row)
        yield row, record


def _parquet_records(path: str, columns: Sequence[str], start: int, stop: int | None) -> Iterator[tuple[int, dict]]:
    """Rows of a Parquet file, decoding only the row groups that overlap ``[start, stop)``."""
    with _open(path) as f:
        parquet = pq.ParquetFile(f, buffer_size=READ_BUFFER)
        _require_columns(path, parquet.schema_arrow.names, columns)
        stop = parquet.metadata.num_rows if stop is None else stop
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        firsts = list(itertools.accumulate(sizes, initial=0))  # the first row of each group
        groups = [g for g, size in enumerate(sizes) if firsts[g] < stop and firsts[g] + size > start]
        if not groups:
            return
        row = firsts[groups[0]]
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=groups, columns=list(columns)):
            lo, hi = max(start - row, 0), min(stop - row, batch.num_rows)
            for offset, record in enumerate(batch.slice(lo, max(hi - lo, 0)).to_pylist()):
                yield row + lo + offset, record
            row += batch.num_rows
            if row >= stop:
                return


def _jsonl_records(path: str, start: int, stop: int | None, byte_offset: int) -> Iterator[tuple[int, dict]]:
    """Records ``[start, stop)`` of a JSON Lines file whose row ``start`` begins at ``byte_offset``."""
    with _open(path) as f:
        f.seek(byte_offset)
        row = start
        for line in f:
            if stop is not None and row >= stop:
                return
            if not line.strip():
                continue
            yield row, _parse_line(path, row, line)
            row += 1


def _parse_line(path: str, row: int, line: bytes) -> dict:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}, row {row}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, row {row}: not valid JSON ({err.msg}); JSON Lines needs one object per line") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}, row {row}: expected a JSON object, got {type(record).__name__}")
    return record


def _text(path: str, row: int, column: str, value: object) -> str:
    """``value`` if it is a string that encodes as UTF-8, else a ``DataError``."""
    if not isinstance(value, str):
        raise DataError(f"{path}, row {row}: column {column!r} holds {type(value).__name__}, not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"{path}, row {row}: column {column!r} is not valid UTF-8 ({err.reason})") from None
    return value


def _identifier(path: str, row: int, column: str, value: object) -> str:
    if value is None:
        raise DataError(f"{path}, row {row}: column {column!r} is empty; every row needs an id")
    return str(value)


# --------------------------------------------------------------------------- documents


def read_documents(shard: Shard, id_column: str, text_column: str) -> tuple[list[Document], int]:
    """The documents of one shard, and how many rows were skipped for an empty text.

    A text that is null, empty or only whitespace is skipped (and counted); one that is not a
    string or not valid UTF-8 raises ``DataError``. Ids are returned as strings and must be unique
    within the shard after that conversion (``1`` and ``"1"`` collide); ``check_unique_ids``
    compares them across shards.
    """
    return with_retries(lambda: _read_documents(shard, id_column, text_column), f"read {shard.path}")


def _read_documents(shard: Shard, id_column: str, text_column: str) -> tuple[list[Document], int]:
    documents, skipped = [], 0
    seen: dict[str, tuple[int, object]] = {}
    for row, record in _rows(shard.path, [id_column, text_column], shard.row_start, shard.row_stop, shard.byte_offset):
        doc_id = _identifier(shard.path, row, id_column, record[id_column])
        if doc_id in seen:
            raise _duplicate(doc_id, id_column, (shard.path, *seen[doc_id]), (shard.path, row, record[id_column]))
        seen[doc_id] = (row, record[id_column])
        text = record[text_column]
        if text is None or (isinstance(text, str) and not text.strip()):
            skipped += 1
            continue
        documents.append(Document(doc_id, _text(shard.path, row, text_column, text)))
    return documents, skipped


def check_unique_ids(shards: Sequence[Shard], id_column: str, ids_in_memory: int = 4_000_000) -> None:
    """Raise ``DataError`` naming both rows when two rows of the shards share an id (after ``str()``).

    Memory stays bounded whatever the corpus size: each id is hashed to 64 bits, and the hashes are
    spilled to ``P`` temporary files by ``hash mod P`` (P chosen so that one file holds at most
    ``ids_in_memory`` hashes, 8 bytes each: 32 MB by default); each file is then sorted on its own
    to find repeated hashes. Equal hashes are only suspects (two of 10^8 distinct ids share a 64-bit
    hash with probability ~3e-4), so a second pass reads the rows again, keeping only the ids whose
    hash is suspect, and raises for a true duplicate. Reads only the id column (Parquet: that
    column alone; JSON Lines: every line is parsed). Disk: 8 bytes per row, in the temp folder.
    """
    total = sum(s.num_rows for s in shards)
    partitions = max(1, -(-total // ids_in_memory))
    suspects: set[int] = set()
    with tempfile.TemporaryDirectory(prefix="msif-ids-") as spill:
        names = [os.path.join(spill, f"{p}.u64") for p in range(partitions)]
        files = [open(name, "wb") for name in names]
        try:
            for shard in shards:
                hashes = np.fromiter((_id_hash(doc_id) for doc_id, _ in _shard_ids(shard, id_column)), dtype=np.uint64)
                which = hashes % np.uint64(partitions)
                for p in range(partitions):
                    files[p].write(hashes[which == p].tobytes())
        finally:
            for f in files:
                f.close()
        for name in names:
            hashes = np.sort(np.fromfile(name, dtype=np.uint64))
            suspects.update(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    if not suspects:
        return
    first: dict[str, tuple[str, int, object]] = {}
    for shard in shards:
        for doc_id, (row, value) in _shard_ids(shard, id_column):
            if _id_hash(doc_id) in suspects:
                if doc_id in first:
                    raise _duplicate(doc_id, id_column, first[doc_id], (shard.path, row, value))
                first[doc_id] = (shard.path, row, value)


def _shard_ids(shard: Shard, id_column: str) -> Iterator[tuple[str, tuple[int, object]]]:
    """``(id as a string, (row, id as stored))`` for every row of a shard."""
    for row, record in _rows(shard.path, [id_column], shard.row_start, shard.row_stop, shard.byte_offset):
        yield _identifier(shard.path, row, id_column, record[id_column]), (row, record[id_column])


def _id_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")


def _duplicate(doc_id: str, id_column: str, first: tuple[str, int, object], second: tuple[str, int, object]) -> DataError:
    (path_a, row_a, value_a), (path_b, row_b, value_b) = first, second
    kinds = "" if type(value_a) is type(value_b) else (
        f" ({value_a!r}, {type(value_a).__name__}, and {value_b!r}, {type(value_b).__name__}, are the same id as text)")
    return DataError(f"{path_b}, row {row_b}: duplicate id {doc_id!r} in column {id_column!r}, first at {path_a}, "
                     f"row {row_a}{kinds}; every document needs a unique id (a document listed twice would be "
                     "scored twice)")


def sample_quotas(shards: Sequence[Shard], max_examples: int | None) -> dict[str, int | None]:
    """How many documents each shard contributes to a sample of ``max_examples`` rows in total.

    Proportional to the shards' rows, rounded by largest remainder so that the quotas add up to
    ``max_examples`` exactly. None for every shard when there is no limit or it covers the corpus.
    """
    total = sum(s.num_rows for s in shards)
    if max_examples is None or max_examples >= total:
        return {s.shard_id: None for s in shards}
    exact = [max_examples * s.num_rows / total for s in shards]
    quotas = [int(q) for q in exact]
    by_remainder = sorted(range(len(shards)), key=lambda i: (quotas[i] - exact[i], i))
    for i in by_remainder[: max_examples - sum(quotas)]:
        quotas[i] += 1
    return {s.shard_id: q for s, q in zip(shards, quotas)}


def sample_documents(documents: list[Document], quota: int | None, seed: int, shard: Shard) -> list[Document]:
    """A seeded subset of ``quota`` documents of one shard, in their original order.

    The same seed and shard always give the same subset, on any machine. None keeps every document.
    """
    if quota is None or quota >= len(documents):
        return documents
    keep = sorted(random.Random(f"{seed}:{shard.shard_id}").sample(range(len(documents)), quota))
    return [documents[i] for i in keep]


# --------------------------------------------------------------------------- prompt + completion pairs


def read_pairs(paths: Sequence[str], prompt_column: str, completion_column: str,
               id_column: str | None = None) -> list[PromptCompletion]:
    """Every (prompt, completion) pair of the files, for fine-tuning data and queries.

    Without ``id_column`` an id is the row number within its file, as a string. With one, ids
    must be unique across the files. An empty completion raises ``DataError``.
    """
    return with_retries(lambda: _read_pairs(paths, prompt_column, completion_column, id_column), f"read {paths[0]}")


def _read_pairs(paths: Sequence[str], prompt_column: str, completion_column: str,
                id_column: str | None) -> list[PromptCompletion]:
    pairs: list[PromptCompletion] = []
    seen: dict[str, str] = {}
    for path in paths:
        for pair, where in _pairs(path, prompt_column, completion_column, id_column):
            if id_column is not None and pair.id in seen:
                raise DataError(f"{where}: duplicate id {pair.id!r} (first at {seen[pair.id]}); ids must be unique")
            seen[pair.id] = where
            pairs.append(pair)
    return pairs


def read_pair_shard(shard: Shard, prompt_column: str, completion_column: str,
                    id_column: str | None = None) -> list[PromptCompletion]:
    """The pairs of one shard, checked as in ``read_pairs`` (ids are not compared across shards)."""
    def read() -> list[PromptCompletion]:
        rows = _pairs(shard.path, prompt_column, completion_column, id_column, shard.row_start, shard.row_stop,
                      shard.byte_offset)
        return [pair for pair, _ in rows]
    return with_retries(read, f"read {shard.path}")


def _pairs(path: str, prompt_column: str, completion_column: str, id_column: str | None, start: int = 0,
           stop: int | None = None, byte_offset: int = 0) -> Iterator[tuple[PromptCompletion, str]]:
    """Checked pairs of a file (or of rows of it), each with where it was read (``file, row n``)."""
    columns = [prompt_column, completion_column] + ([id_column] if id_column else [])
    for row, record in _rows(path, columns, start, stop, byte_offset):
        where = f"{path}, row {row}"
        pair_id = _identifier(path, row, id_column, record[id_column]) if id_column else str(row)
        prompt = _text(path, row, prompt_column, record[prompt_column])
        completion = _text(path, row, completion_column, record[completion_column])
        if not completion.strip():
            raise DataError(f"{where} (id {pair_id!r}): empty completion in column {completion_column!r}; "
                            "there is nothing to explain or fit")
        yield PromptCompletion(pair_id, prompt, completion), where
