"""What every reader shares: the error type, opening a file through fsspec, column checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO

import fsspec

from msif_ray.errors import UserError


class DataError(UserError, ValueError):
    """Input data that cannot be used; the message names the file, the row and the column."""


def open_binary(path: str) -> BinaryIO:
    """A binary file object for a local path or a URL."""
    fs, local = fsspec.core.url_to_fs(path)
    return fs.open(local, "rb")


def require_columns(path: str, available: Sequence[str], columns: Sequence[str], row: int | None = None) -> None:
    where = path if row is None else f"{path}, row {row}"
    for column in columns:
        if column not in available:
            raise DataError(f"{where}: no column {column!r}; available columns: {', '.join(map(str, available)) or 'none'}."
                            " Set the matching *_column in the config")
