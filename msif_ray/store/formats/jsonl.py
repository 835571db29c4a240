"""JSON Lines, plain or compressed: one JSON object per line, blank lines ignored.

Plain files are counted once (the byte offset of every shard's first row is kept), so a shard
seeks to its rows. Compressed files (gzip ``.gz``, zstd ``.zst``: how the Pile and Dolma ship) are
streamed: they cannot seek, so a shard is the whole file, and counting decompresses it whole, so a
truncated or corrupt file is refused at validation, naming it.
"""

from __future__ import annotations

import gzip
import io
import json
from contextlib import contextmanager, nullcontext
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import fsspec
import zstandard

from msif_ray.store.formats.common import BadRow, DataError, Unreadable, require_columns

READ_BUFFER = 1 << 20  # bytes of decompressed text read at a time


class JsonLines:
    def __init__(self, compression: str | None = None):
        self.compression = compression
        self.whole_file = compression is not None

    def _open(self, path: str) -> BinaryIO:
        fs, local = fsspec.core.url_to_fs(path)
        if self.compression == "zstd":
            return io.BufferedReader(ZstdFrames(fs.open(local, "rb"), path), READ_BUFFER)
        return fs.open(local, "rb", compression=self.compression)

    def columns(self, path: str) -> list[str]:
        first = next(self.records(path, (), 0, 1, 0), None)
        return list(first[1]) if first else []

    def count(self, path: str, rows_per_shard: int) -> tuple[int, dict[int, int]]:
        """One streaming pass (a compressed file is decompressed whole, so a truncated one fails here)."""
        num_rows, position, offsets = 0, 0, {}
        with self._decoding(path):
            with self._open(path) as f:
                for line in f:
                    if line.strip():
                        if num_rows % rows_per_shard == 0:
                            offsets[num_rows] = position
                        num_rows += 1
                    position += len(line)
        return num_rows, ({} if self.whole_file else offsets)

    def records(self, path: str, columns: Sequence[str], start: int, stop: int | None,
                byte_offset: int, unreadable: Unreadable | None = None) -> Iterator[tuple[int, dict]]:
        """A line that is not a JSON object in UTF-8, or lacks one of ``columns``, is one unreadable row."""
        with self._decoding(path):
            with self._open(path) as f:
                if not self.whole_file:
                    f.seek(byte_offset)
                row = start if not self.whole_file else 0
                for line in f:
                    if stop is not None and row >= stop:
                        return
                    if not line.strip():
                        continue
                    if row >= start:
                        try:
                            record = parse_line(path, row, line)
                            require_columns(path, list(record), columns, row)
                        except BadRow as err:
                            if unreadable is None:
                                raise
                            unreadable(row, row + 1, err.reason)
                        else:
                            yield row, record
                    row += 1

    def _decoding(self, path: str):
        return compressed_errors(path) if self.compression else nullcontext()


@contextmanager
def compressed_errors(path: str) -> Iterator[None]:
    """Turn a truncated or corrupt compressed stream into a ``DataError`` naming the file."""
    try:
        yield
    except (EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: the compressed stream is truncated or corrupt ({err}); write the file again") from None
    except zstandard.ZstdError as err:
        raise DataError(f"{path}: the compressed stream is truncated or corrupt ({err}); write the file again") from None


class ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a zstd file of one or more frames; a file that ends inside a frame
    (truncated) raises ``DataError`` naming it, where a plain stream reader would just stop."""

    def __init__(self, raw: BinaryIO, path: str):
        self.raw, self.path = raw, path
        self.frame, self.started, self.pending = zstandard.ZstdDecompressor().decompressobj(), False, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            chunk = self.raw.read(READ_BUFFER)
            if not chunk:
                if self.started and not self.frame.eof:
                    raise DataError(f"{self.path}: the compressed stream is truncated or corrupt (it ends inside a "
                                    "zstd frame); write the file again")
                return 0
            self.pending = self._decompress(chunk)
        n = min(len(buffer), len(self.pending))
        buffer[:n], self.pending = self.pending[:n], self.pending[n:]
        return n

    def _decompress(self, chunk: bytes) -> bytes:
        out = b""
        while chunk:
            if self.frame.eof:  # the next frame starts in this chunk
                self.frame, self.started = zstandard.ZstdDecompressor().decompressobj(), False
            self.started = True
            out += self.frame.decompress(chunk)
            chunk = self.frame.unused_data if self.frame.eof else b""
        return out

    def close(self) -> None:
        self.raw.close()
        super().close()


def parse_line(path: str, row: int, line: bytes) -> dict:
    """The JSON object on one line, else ``BadRow`` (a ``DataError``) naming the file and row."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise BadRow(path, row, f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise BadRow(path, row, f"not valid JSON ({err.msg}); JSON Lines needs one object per line") from None
    if not isinstance(record, dict):
        raise BadRow(path, row, f"expected a JSON object, got {type(record).__name__}")
    return record
