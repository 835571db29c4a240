"""What every reader shares: the error types, opening a file through fsspec, column checks, and how a
reader reports rows it cannot read (``Unreadable``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import BinaryIO

import fsspec
import pyarrow as pa

from msif_ray.errors import UserError
from msif_ray.store.storage import is_transient


class DataError(UserError, ValueError):
    """Input data that cannot be used; the message names the file, the row and the column."""


class BadRow(DataError):
    """One row that cannot be decoded (not JSON, not text, not token ids...); ``reason`` says why
    without the file and row, which the message begins with."""

    def __init__(self, path: str, row: int, reason: str):
        super().__init__(f"{path}, row {row}: {reason}")
        self.path, self.row, self.reason = path, row, reason

    def __reduce__(self) -> tuple:
        return BadRow, (self.path, self.row, self.reason)


# Told ``(first row, stop row, reason)`` of rows ``[first, stop)`` that a reader could not read (a
# Parquet row group whose data page fails its checksum or decompression, a JSON Lines line that is
# not a JSON object, an Arrow batch that fails validation); the reader then goes on with the next
# part. Without one (None), a reader raises as it finds such a part (``unreadable_rows``).
Unreadable = Callable[[int, int, str], None]


def unreadable_rows(path: str, unreadable: Unreadable | None, first: int, stop: int, reason: str) -> None:
    """Tell ``unreadable`` of rows ``[first, stop)``; without it, raise ``DataError`` naming them."""
    if unreadable is None:
        raise DataError(f"{path}, rows {first} to {stop - 1}: {reason}")
    unreadable(first, stop, reason)


def is_corrupt(err: BaseException) -> bool:
    """Whether a failed read is the file's bytes' fault (a checksum, compression or encoding error),
    rather than the store's (a missing object, denied access, a dropped connection) or the config's."""
    return (isinstance(err, (OSError, ValueError, pa.ArrowException)) and not isinstance(err, UserError)
            and not isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)) and not is_transient(err))


def open_binary(path: str) -> BinaryIO:
    """A binary file object for a local path or a URL."""
    fs, local = fsspec.core.url_to_fs(path)
    return fs.open(local, "rb")


def require_columns(path: str, available: Sequence[str], columns: Sequence[str], row: int | None = None) -> None:
    """Raise ``DataError`` when a column is missing; ``row`` given (a record of its own), ``BadRow``."""
    for column in columns:
        if column not in available:
            problem = (f"no column {column!r}; available columns: {', '.join(map(str, available)) or 'none'}. Set the "
                       "matching *_column in the config")
            raise DataError(f"{path}: {problem}") if row is None else BadRow(path, row, problem)
