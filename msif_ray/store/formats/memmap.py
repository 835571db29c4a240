"""Fixed-length training sequences of token ids in one array file: each row is one sequence the
model was trained on (packed across document boundaries, as OLMo and nanoGPT-style pipelines write them).

Two layouts:

    .npy with a header   a 2-D array [sequences, length] as ``numpy.save`` writes it: dtype and shape
                         come from the header
    raw (.npy or .bin)   the token ids alone, concatenated (``numpy.memmap``); the layout comes from
                         the config: ``data.corpus.sequence_length`` and ``data.corpus.token_dtype``,
                         carried by the shard as ``"<dtype>x<length>"``; a trailing partial sequence
                         is an error

Rows have the id ``<file name>:<row>`` and the column ``input_ids``. Only the rows of a shard are
read (one seek, one read).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from numpy.lib import format as npy

from msif_ray.store.formats.common import DataError, Unreadable, open_binary, require_columns

COLUMNS = ("id", "input_ids")
NPY_MAGIC = b"\x93NUMPY"


def layout_of(path: str, layout: str | None) -> tuple[np.dtype, int, int, int]:
    """(dtype, sequence length, sequences, byte offset of the first) of an array file."""
    with open_binary(path) as f:
        size = f.seek(0, 2)
        f.seek(0)
        if f.read(len(NPY_MAGIC)) == NPY_MAGIC:
            f.seek(0)
            version = npy.read_magic(f)
            read_header = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
            if read_header is None:
                raise DataError(f"{path}: .npy format version {version} is not supported; save it with numpy.save")
            shape, fortran, dtype = read_header(f)
            if len(shape) != 2 or fortran:
                raise DataError(f"{path}: a .npy corpus must be a C-ordered 2-D array [sequences, length]; "
                                f"found shape {shape}")
            return np.dtype(dtype), shape[1], shape[0], f.tell()
    if layout is None:
        raise DataError(f"{path}: a raw array of token ids (no .npy header) needs data.corpus.sequence_length "
                        "(and data.corpus.token_dtype, default uint16) in the config")
    dtype_name, length = layout.split("x")
    dtype, length = np.dtype(dtype_name), int(length)
    per_row = dtype.itemsize * length
    if size % per_row:
        raise DataError(f"{path}: {size} bytes is not a whole number of sequences of {length} {dtype} tokens "
                        f"({per_row} bytes each); check data.corpus.sequence_length and token_dtype")
    return dtype, length, size // per_row, 0


class TokenMemmap:
    whole_file = False

    def __init__(self, layout: str | None = None):
        self.layout = layout

    def columns(self, path: str) -> list[str]:
        return list(COLUMNS)

    def count(self, path: str, rows_per_shard: int) -> tuple[int, dict[int, int]]:
        return layout_of(path, self.layout)[2], {}

    def tokens(self, path: str) -> int:
        _, length, rows, _ = layout_of(path, self.layout)
        return length * rows

    def records(self, path: str, columns: Sequence[str], start: int, stop: int | None,
                byte_offset: int, unreadable: Unreadable | None = None) -> Iterator[tuple[int, dict]]:
        """Token ids have no pages to fail: ``unreadable`` is never told anything."""
        require_columns(path, COLUMNS, columns)
        dtype, length, rows, offset = layout_of(path, self.layout)
        stop = rows if stop is None else min(stop, rows)
        if start >= stop:
            return
        with open_binary(path) as f:
            f.seek(offset + start * length * dtype.itemsize)
            data = np.frombuffer(f.read((stop - start) * length * dtype.itemsize), dtype).reshape(-1, length)
        name = path.rsplit("/", 1)[-1]
        for k, row in enumerate(range(start, stop)):
            yield row, {"id": f"{name}:{row}", "input_ids": data[k].tolist()}
