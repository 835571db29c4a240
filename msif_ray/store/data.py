"""Corpora, fine-tuning data and queries in any form ``formats/`` reads, local or remote (``s3://``).

A corpus is read shard by shard: ``plan_shards`` cuts every file into contiguous row ranges from
metadata alone where the format has it (Parquet footers, Megatron indexes, array headers; one
streaming pass over JSON Lines to count its lines; a compressed file is one shard), and
``read_documents`` reads one shard, so memory holds one shard at a time. A document is text, or
the token ids it was trained on (a token column, a Megatron dataset, an array of sequences), read
as they are. Fine-tuning data and queries are small and read whole with ``read_pairs`` (or per
shard with ``read_pair_shard``).

Errors in the input raise ``DataError`` naming the file, the row and the column; given a ``bad``
list, ``read_documents`` instead lists the rows it cannot decode or read (``quarantine.BadDocument``:
a row that is not text or token ids, a row of a corrupt data page) and reads on. Transient
object-store errors are retried (``storage.with_retries``) around whole operations: a listing, a
footer, a whole shard or file of pairs, which are re-read from their start.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from msif_ray.store.digests import digest, file_digests
from msif_ray.store.formats import (
    TOKENS, BadRow, DataError, Format, format_of, is_token_format, require_columns, save_to_disk_files,
)
from msif_ray.store.formats.megatron import Megatron
from msif_ray.store.formats.megatron import prefix as megatron_prefix
from msif_ray.store.formats.memmap import TokenMemmap
from msif_ray.store.quarantine import BadDocument
from msif_ray.store.storage import with_retries

__all__ = ["DataError", "Document", "PromptCompletion", "Shard", "check_columns", "check_unique_ids", "expand_paths",
           "plan_shards", "read_documents", "read_pairs", "read_pair_shard", "sample_documents", "sample_quotas"]


@dataclass(frozen=True)
class Shard:
    """Rows ``[row_start, row_stop)`` of one file: the unit of work and of resumption.

    ``shard_id`` follows the file's content and the rows, never its path (``shard_id``): the same
    file anywhere (another folder, another machine) has the same shard ids, a file rewritten in
    place new ones. ``path`` is where the rows are read from, and what messages name.
    ``byte_offset`` is where row ``row_start`` begins in a JSON Lines file (0 for the other
    formats), so that reading a shard does not re-read the lines before it. ``layout`` is a raw
    token array's ``"<dtype>x<length>"`` (``formats/memmap.py``), None for every other file.
    ``num_tokens`` is known from metadata for the token formats (None: count by reading).
    """

    path: str
    row_start: int
    row_stop: int
    shard_id: str
    byte_offset: int = 0
    layout: str | None = None
    num_tokens: int | None = None

    @property
    def format(self) -> Format:
        return format_of(self.path, self.layout)

    @property
    def num_rows(self) -> int:
        return self.row_stop - self.row_start


@dataclass(frozen=True)
class Document:
    """One corpus row: its text, or (token formats and token columns) the token ids it was trained on."""

    doc_id: str
    text: str | None = None
    input_ids: tuple[int, ...] | None = None
    starts: tuple[int, ...] | None = None  # a packed sequence: where each source document in it starts
    row: int = -1  # its row in its file (what quarantine records name)


@dataclass(frozen=True)
class PromptCompletion:
    id: str
    prompt: str
    completion: str


# --------------------------------------------------------------------------- files


def expand_paths(patterns: Sequence[str]) -> list[str]:
    """The files matching each path or glob pattern, sorted within a pattern, without duplicates.

    Local results are absolute paths; remote ones URLs (``s3://bucket/key``). A ``save_to_disk``
    folder stands for its Arrow files, in order; a Megatron pair for its ``.bin`` file. A pattern
    that matches no file raises ``DataError`` naming it.
    """
    files: list[str] = []
    for pattern in patterns:
        fs, path = fsspec.core.url_to_fs(pattern)
        saved = save_to_disk_files(pattern)
        if saved is not None:
            files += [f for f in saved if f not in files]
            continue
        try:
            matches = with_retries(lambda: fs.glob(path, detail=True), f"list {pattern}")
        except PermissionError as err:
            raise DataError(f"{pattern}: access denied ({err}); check the credentials and the bucket policy") from None
        found = sorted(_url(fs, p) for p, info in matches.items() if info["type"] == "file")
        if not found:
            raise DataError(f"{pattern}: no file matches this path or pattern; check data paths in the config")
        found = [megatron_prefix(f) + ".bin" if f.endswith(".idx") else f for f in found]
        files += [f for f in dict.fromkeys(found) if f not in files]
    return files


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def check_columns(paths: Sequence[str], columns: Sequence[str], layout: str | None = None) -> None:
    """Raise ``DataError`` early when a file lacks one of ``columns``.

    Parquet and Arrow: from the schema. JSON Lines: from the keys of the file's first record (a
    later record without the column is caught when it is read). Token formats: ``id``, ``input_ids``.
    """
    for path in paths:
        available = with_retries(lambda: format_of(path, layout).columns(path), f"read {path}")
        require_columns(path, available, columns)


# --------------------------------------------------------------------------- shards


def plan_shards(paths: Sequence[str], rows_per_shard: int, layout: str | None = None) -> list[Shard]:
    """Cut the files into shards of ``rows_per_shard`` rows (the last of each file may be shorter; a
    compressed file is one shard).

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
        fmt = format_of(path, layout)
        content = _content(path, fmt, content, layout)
        num_rows, byte_offsets = with_retries(lambda: fmt.count(path, rows_per_shard), f"read {path}")
        step = max(num_rows, 1) if fmt.whole_file else rows_per_shard
        tokens = getattr(fmt, "tokens", None)
        per_row = tokens(path) / max(num_rows, 1) if tokens else None
        for start in range(0, num_rows, step):
            stop = min(start + step, num_rows)
            shards.append(Shard(path, start, stop, shard_id(content, start, stop), byte_offsets.get(start, 0), layout,
                                None if per_row is None else round(per_row * (stop - start))))
    if not shards:
        listed = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        raise DataError(f"{listed}: no rows at all; an empty corpus or data set cannot be used")
    return shards


def _content(path: str, fmt: Format, content: str, layout: str | None) -> str:
    """The digest that names a file's shards: its bytes, and what else decides its rows (a Megatron
    index, a raw array's layout)."""
    if isinstance(fmt, Megatron):
        return digest(content, file_digests([megatron_prefix(path) + ".idx"])[0])
    if isinstance(fmt, TokenMemmap) and layout:
        return digest(content, layout)
    return content


def shard_id(content: str, row_start: int, row_stop: int) -> str:
    """``<first 12 hex digits of the file's digest>-<row_start>-<row_stop>``: safe as a file name.

    ``content`` is the file's ``digests.file_digest``; no path or file name enters the id, so the
    id (and the seed of the shard's sampled labels) follows the content.
    """
    return f"{content[:12]}-{row_start}-{row_stop}"


# --------------------------------------------------------------------------- rows


def _rows(shard: Shard, columns: Sequence[str], bad: list[BadDocument] | None = None) -> Iterator[tuple[int, dict]]:
    """``(row, record)`` for the rows of a shard, streamed; records hold ``columns``.

    ``bad``: the rows of a part that cannot be read are appended to it (doc id None) and left out;
    without it, such a part raises.
    """
    def unreadable(first: int, stop: int, reason: str) -> None:
        bad.extend(BadDocument(None, shard.path, row, reason) for row in range(first, stop))

    return shard.format.records(shard.path, columns, shard.row_start, shard.row_stop, shard.byte_offset,
                                None if bad is None else unreadable)


def _bad_row(err: BadRow, doc_id: str | None, bad: list[BadDocument] | None) -> None:
    """Append the row of ``err`` to ``bad``; without a list, raise it."""
    if bad is None:
        raise err
    bad.append(BadDocument(doc_id, err.path, err.row, err.reason))


def _text(path: str, row: int, column: str, value: object) -> str:
    """``value`` if it is a string that encodes as UTF-8, else ``BadRow``."""
    if not isinstance(value, str):
        raise BadRow(path, row, f"column {column!r} holds {type(value).__name__}, not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadRow(path, row, f"column {column!r} is not valid UTF-8 ({err.reason})") from None
    return value


def _identifier(path: str, row: int, column: str, value: object) -> str:
    if value is None:
        raise BadRow(path, row, f"column {column!r} is empty; every row needs an id")
    return str(value)


# --------------------------------------------------------------------------- documents


def read_documents(shard: Shard, id_column: str, text_column: str, token_column: str | None = None,
                   boundary_column: str | None = None,
                   bad: list[BadDocument] | None = None) -> tuple[list[Document], int]:
    """The documents of one shard, and how many rows were skipped as empty.

    Text: a text that is null, empty or only whitespace is skipped (and counted); one that is not a
    string or not valid UTF-8 raises ``DataError``. Tokens (``token_column`` set, or a token
    format, whose column is ``input_ids``): a list of non-negative integers, read as it is; an empty
    or null list is skipped. ``boundary_column``: a packed sequence's document starts, increasing
    token offsets inside it (``Document.starts``). Ids are returned as strings and must be unique within the shard after
    that conversion (``1`` and ``"1"`` collide); ``check_unique_ids`` compares them across shards.

    ``bad`` (a list): a row that cannot be decoded (a null id, bad text, token ids or starts), and
    each row of a part of the file that cannot be read (``formats.Unreadable``), is appended to it
    as a ``BadDocument`` and left out, instead of raising ``DataError``. Duplicate ids still raise.
    """
    def read() -> tuple[list[Document], int, list[BadDocument] | None]:
        found = None if bad is None else []  # per attempt: a retried read lists its rows once
        return *_read_documents(shard, id_column, text_column, token_column, boundary_column, found), found

    documents, skipped, found = with_retries(read, f"read {shard.path}")
    if bad is not None:
        bad.extend(found)
    return documents, skipped


def token_column_of(shard: Shard, token_column: str | None) -> str | None:
    """The column a shard's documents are token ids in (None: they are text)."""
    return _token_column(shard.format, token_column)


def _token_column(fmt: Format, token_column: str | None) -> str | None:
    return token_column or (TOKENS if is_token_format(fmt) else None)


def check_corpus_columns(paths: Sequence[str], id_column: str, text_column: str, token_column: str | None,
                         boundary_column: str | None = None, layout: str | None = None) -> None:
    """``check_columns`` for a corpus: the id column, the token column (token formats: ``input_ids``)
    or else the text column, and the boundary column when set."""
    for path in paths:
        fmt = format_of(path, layout)
        available = with_retries(lambda: fmt.columns(path), f"read {path}")
        columns = [id_column, _token_column(fmt, token_column) or text_column]
        require_columns(path, available, columns + ([boundary_column] if boundary_column else []))


def _read_documents(shard: Shard, id_column: str, text_column: str, token_column: str | None,
                    boundary_column: str | None, bad: list[BadDocument] | None) -> tuple[list[Document], int]:
    documents, skipped = [], 0
    seen: dict[str, tuple[int, object]] = {}
    tokens = token_column_of(shard, token_column)
    column = tokens or text_column
    if boundary_column and not tokens:
        raise DataError(f"{shard.path}: data.corpus.boundary_column needs token documents (a token_column or a token "
                        "format): document starts are token offsets")
    for row, record in _rows(shard, [id_column, column] + ([boundary_column] if boundary_column else []), bad):
        try:
            doc_id = _identifier(shard.path, row, id_column, record[id_column])
        except BadRow as err:
            _bad_row(err, None, bad)
            continue
        if doc_id in seen:
            raise _duplicate(doc_id, id_column, (shard.path, *seen[doc_id]), (shard.path, row, record[id_column]))
        seen[doc_id] = (row, record[id_column])
        try:
            document = _document(shard.path, row, doc_id, record, column, bool(tokens), boundary_column)
        except BadRow as err:
            _bad_row(err, doc_id, bad)
            continue
        if document is None:
            skipped += 1
        else:
            documents.append(document)
    return documents, skipped


def _document(path: str, row: int, doc_id: str, record: dict, column: str, tokens: bool,
              boundary_column: str | None) -> Document | None:
    """One row as a ``Document`` (None: empty, skipped), else ``BadRow``."""
    value = record[column]
    if tokens:
        ids = _token_ids(path, row, column, value)
        if not ids:
            return None
        starts = _starts(path, row, boundary_column, record[boundary_column], len(ids)) if boundary_column else None
        return Document(doc_id, input_ids=ids, starts=starts, row=row)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return Document(doc_id, _text(path, row, column, value), row=row)


def _token_ids(path: str, row: int, column: str, value: object) -> tuple[int, ...]:
    """``value`` as token ids: a list of non-negative integers (null: none), else ``BadRow``."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        kind = type(value).__name__ if not isinstance(value, (list, tuple)) else "a list that is not all integers"
        raise BadRow(path, row, f"column {column!r} holds {kind}; a token column needs lists of token ids (integers)")
    if value and min(value) < 0:
        raise BadRow(path, row, f"column {column!r} holds a negative token id ({min(value)})")
    return tuple(value)


def _starts(path: str, row: int, column: str, value: object, length: int) -> tuple[int, ...]:
    """Document starts of a packed sequence: increasing integer offsets in ``[0, length)``."""
    starts = _token_ids(path, row, column, value)
    if any(b <= a for a, b in zip(starts, starts[1:])) or (starts and starts[-1] >= length):
        raise BadRow(path, row, f"column {column!r} must hold increasing token offsets below the sequence's length "
                     f"{length}, got {list(starts)}")
    return starts


def check_token_ids(shards: Sequence[Shard], id_column: str, text_column: str, token_column: str | None,
                    boundary_column: str | None, vocab_size: int, left_out: Collection[BadDocument] = ()) -> None:
    """Raise ``DataError`` naming the file and row of the first token id at or above ``vocab_size``
    (a corpus tokenized for another model). Reads every token shard once; text shards are skipped,
    and so are the rows of ``left_out`` (bad documents, quarantined)."""
    skip = _places(left_out)
    for shard in shards:
        column = token_column_of(shard, token_column)
        if column is None:
            continue
        for row, record in _rows(shard, [id_column, column] + ([boundary_column] if boundary_column else []),
                                 [] if skip else None):
            if (shard.path, row) in skip:
                continue
            ids = _token_ids(shard.path, row, column, record[column])
            if boundary_column:
                _starts(shard.path, row, boundary_column, record[boundary_column], len(ids))
            if ids and max(ids) >= vocab_size:
                raise DataError(f"{shard.path}, row {row}: token id {max(ids)} in column {column!r} is not below the "
                                f"model's vocabulary size {vocab_size}; was the corpus tokenized for another model?")


def check_unique_ids(shards: Sequence[Shard], id_column: str, ids_in_memory: int = 4_000_000,
                     left_out: Collection[BadDocument] = ()) -> None:
    """Raise ``DataError`` naming both rows when two rows of the shards share an id (after ``str()``);
    the rows of ``left_out`` (bad documents, quarantined) are not compared.

    Memory stays bounded whatever the corpus size: each id is hashed to 64 bits, and the hashes are
    spilled to ``P`` temporary files by ``hash mod P`` (P chosen so that one file holds at most
    ``ids_in_memory`` hashes, 8 bytes each: 32 MB by default); each file is then sorted on its own
    to find repeated hashes. Equal hashes are only suspects (two of 10^8 distinct ids share a 64-bit
    hash with probability ~3e-4), so a second pass reads the rows again, keeping only the ids whose
    hash is suspect, and raises for a true duplicate. Reads only the id column (Parquet: that
    column alone; JSON Lines: every line is parsed). Disk: 8 bytes per row, in the temp folder.
    """
    skip = _places(left_out)
    total = sum(s.num_rows for s in shards)
    partitions = max(1, -(-total // ids_in_memory))
    suspects: set[int] = set()
    with tempfile.TemporaryDirectory(prefix="msif-ids-") as spill:
        names = [os.path.join(spill, f"{p}.u64") for p in range(partitions)]
        files = [open(name, "wb") for name in names]
        try:
            for shard in shards:
                hashes = np.fromiter((_id_hash(doc_id) for doc_id, _ in _shard_ids(shard, id_column, skip)),
                                     dtype=np.uint64)
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
        for doc_id, (row, value) in _shard_ids(shard, id_column, skip):
            if _id_hash(doc_id) in suspects:
                if doc_id in first:
                    raise _duplicate(doc_id, id_column, first[doc_id], (shard.path, row, value))
                first[doc_id] = (shard.path, row, value)


def _shard_ids(shard: Shard, id_column: str, skip: set[tuple[str, int]]) -> Iterator[tuple[str, tuple[int, object]]]:
    """``(id as a string, (row, id as stored))`` for every row of a shard but those of ``skip``."""
    for row, record in _rows(shard, [id_column], [] if skip else None):
        if (shard.path, row) not in skip:
            yield _identifier(shard.path, row, id_column, record[id_column]), (row, record[id_column])


def _places(bad: Collection[BadDocument]) -> set[tuple[str, int]]:
    """``(path, row)`` of each bad document."""
    return {(b.path, b.row) for b in bad}


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
    for row, record in format_of(path).records(path, columns, start, stop, byte_offset):
        where = f"{path}, row {row}"
        pair_id = _identifier(path, row, id_column, record[id_column]) if id_column else str(row)
        prompt = _text(path, row, prompt_column, record[prompt_column])
        completion = _text(path, row, completion_column, record[completion_column])
        if not completion.strip():
            raise DataError(f"{where} (id {pair_id!r}): empty completion in column {completion_column!r}; "
                            "there is nothing to explain or fit")
        yield PromptCompletion(pair_id, prompt, completion), where
