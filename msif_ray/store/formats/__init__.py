"""One small reader per on-disk form of a data set; ``format_of`` picks one by the file's name.

Every reader answers three questions about one file, streaming, through fsspec (local or ``s3://``):
its columns, its row count (with the byte offsets where shards begin, where it can seek), and the
records of rows ``[start, stop)``. A *row* is one record, numbered from 0 within its file. Given an
``unreadable`` callback (``common.Unreadable``), a reader reports the rows of a part it cannot read
(a corrupt Parquet page, a line that is not JSON, an Arrow batch that fails validation) and reads
on; without one, it raises.

    .parquet                        Parquet (``parquet.py``)
    .jsonl .json (.gz, .zst)        JSON Lines, plain or compressed (``jsonl.py``)
    .arrow, a save_to_disk folder   Arrow IPC streams of ``datasets`` (``arrow.py``)
    .bin + .idx                     a Megatron indexed dataset of token ids (``megatron.py``)
    .npy (or a raw .bin)            fixed-length training sequences of token ids (``memmap.py``)

The token formats have the columns ``id`` (``<file name>:<row>``) and ``input_ids``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from msif_ray.store.formats.arrow import ArrowStream, save_to_disk_files
from msif_ray.store.formats.common import BadRow, DataError, Unreadable, open_binary, require_columns
from msif_ray.store.formats.jsonl import JsonLines
from msif_ray.store.formats.megatron import Megatron, is_megatron
from msif_ray.store.formats.memmap import TokenMemmap
from msif_ray.store.formats.parquet import Parquet

__all__ = ["TOKENS", "BadRow", "DataError", "Format", "Unreadable", "format_of", "is_token_format", "open_binary", "require_columns",
           "save_to_disk_files"]
COMPRESSION = {".gz": "gzip", ".zst": "zstd"}
TOKENS = "input_ids"  # the token column of the token formats
TOKEN_FORMATS = (Megatron, TokenMemmap)


class Format(Protocol):
    """A reader of one form of data file."""

    whole_file: bool  # True: a shard is the whole file (the format cannot start reading mid-file)

    def columns(self, path: str) -> list[str]: ...

    def count(self, path: str, rows_per_shard: int) -> tuple[int, dict[int, int]]:
        """The file's row count, and the byte offsets of the rows where shards begin (where it can seek)."""

    def records(self, path: str, columns: Sequence[str], start: int, stop: int | None, byte_offset: int,
                unreadable: Unreadable | None = None) -> Iterator[tuple[int, dict]]:
        """``(row, record)`` for rows ``[start, stop)``; records hold at least ``columns``. Rows of a part
        that cannot be read are told to ``unreadable`` and left out (without it: raised)."""


def format_of(path: str, layout: str | None = None) -> Format:
    """The reader of ``path``, from its name (``layout``: a raw token array's ``"<dtype>x<length>"``)."""
    lowered = path.lower()
    compression = next((c for suffix, c in COMPRESSION.items() if lowered.endswith(suffix)), None)
    stem = lowered.removesuffix(".gz").removesuffix(".zst")
    if stem.endswith((".jsonl", ".json")):
        return JsonLines(compression)
    if compression is None:
        if stem.endswith(".parquet"):
            return Parquet()
        if stem.endswith(".arrow"):
            return ArrowStream()
        if stem.endswith((".idx", ".bin")) and is_megatron(path):
            return Megatron()
        if stem.endswith((".npy", ".bin")):
            return TokenMemmap(layout)
    raise DataError(f"{path}: unknown file format; use Parquet (.parquet), JSON Lines (.jsonl, .json, optionally "
                    ".gz or .zst), a datasets.save_to_disk folder (.arrow files), a Megatron .bin/.idx pair or "
                    "a .npy array of token ids")


def is_token_format(fmt: Format) -> bool:
    return isinstance(fmt, TOKEN_FORMATS)
