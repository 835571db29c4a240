"""Megatron's indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``), read-only: token ids as they were trained on.

The ``.bin`` file is the token ids of every sequence, concatenated, in one dtype. The ``.idx``
file, little-endian throughout:

    magic           9 bytes   b"MMIDIDX\\x00\\x00"
    version         uint64    1
    dtype code      uint8     1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    sequences       uint64    S
    documents       uint64    D (+ 1: a 0 first, then the end of each document)
    sizes           int32[S]  tokens per sequence
    pointers        int64[S]  byte offset of each sequence in the .bin file
    document index  int64[D]  sequence boundaries of documents (Megatron's own bookkeeping; unused here)

Each sequence is one row: the id ``<prefix name>:<row>`` and the column ``input_ids``. A
``paths`` entry may name either file of the pair. Both files enter the content key.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

import numpy as np

from msif_ray.store.formats.common import DataError, Unreadable, open_binary, require_columns

MAGIC = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
COLUMNS = ("id", "input_ids")
HEADER = len(MAGIC) + 8 + 1 + 8 + 8


def prefix(path: str) -> str:
    return path[: -len(".idx")] if path.endswith((".idx", ".bin")) else path


def is_megatron(path: str) -> bool:
    """Whether ``path`` is one file of a Megatron pair (the .idx exists and starts with the magic)."""
    try:
        with open_binary(prefix(path) + ".idx") as f:
            return f.read(len(MAGIC)) == MAGIC
    except FileNotFoundError:
        return False


class Index:
    """The parsed ``.idx`` file: dtype, sizes [S] and pointers [S]."""

    def __init__(self, path: str):
        idx = prefix(path) + ".idx"
        with open_binary(idx) as f:
            data = f.read()
        if len(data) < HEADER or data[: len(MAGIC)] != MAGIC:
            raise DataError(f"{idx}: not a Megatron index (magic {MAGIC!r} expected)")
        version, code, sequences, documents = struct.unpack_from("<QBQQ", data, len(MAGIC))
        if version != 1 or code not in DTYPES:
            raise DataError(f"{idx}: unsupported Megatron index (version {version}, dtype code {code})")
        need = HEADER + 12 * sequences + 8 * documents
        if len(data) < need:
            raise DataError(f"{idx}: truncated Megatron index ({len(data)} bytes, {need} expected for "
                            f"{sequences} sequences); write it again")
        self.dtype = np.dtype(DTYPES[code])
        self.sizes = np.frombuffer(data, np.int32, sequences, HEADER)
        self.pointers = np.frombuffer(data, np.int64, sequences, HEADER + 4 * sequences)
        self.bin = prefix(path) + ".bin"


class Megatron:
    whole_file = False

    def columns(self, path: str) -> list[str]:
        return list(COLUMNS)

    def count(self, path: str, rows_per_shard: int) -> tuple[int, dict[int, int]]:
        index = Index(path)
        end = int(index.pointers[-1] + index.sizes[-1] * index.dtype.itemsize) if len(index.sizes) else 0
        with open_binary(index.bin) as f:
            size = f.seek(0, 2)
        if size < end:
            raise DataError(f"{index.bin}: {size} bytes, but its index points to {end}; the .bin file is truncated")
        return len(index.sizes), {}

    def tokens(self, path: str) -> int:
        """Tokens in the file, from its index alone."""
        return int(Index(path).sizes.sum())

    def records(self, path: str, columns: Sequence[str], start: int, stop: int | None,
                byte_offset: int, unreadable: Unreadable | None = None) -> Iterator[tuple[int, dict]]:
        """Token ids have no pages to fail: ``unreadable`` is never told anything."""
        require_columns(path, COLUMNS, columns)
        index = Index(path)
        stop = len(index.sizes) if stop is None else stop
        name = prefix(path).rsplit("/", 1)[-1]
        if start >= stop:
            return
        lo = int(index.pointers[start])
        hi = int(index.pointers[stop - 1] + index.sizes[stop - 1] * index.dtype.itemsize)
        with open_binary(index.bin) as f:
            f.seek(lo)
            chunk = np.frombuffer(f.read(hi - lo), index.dtype)
        for row in range(start, stop):
            first = (int(index.pointers[row]) - lo) // index.dtype.itemsize
            yield row, {"id": f"{name}:{row}", "input_ids": chunk[first : first + int(index.sizes[row])].tolist()}
