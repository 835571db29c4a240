"""Parquet: columns from the footer, row groups decoded only where a shard overlaps them.

Data pages are verified against their CRC32 where the writer stored one (``write_page_checksum``);
a page that fails it, or cannot be decompressed or decoded, makes the rest of its row group
unreadable (``common.Unreadable``): a reader cannot resume inside a column chunk.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import pyarrow.parquet as pq

from msif_ray.store.formats.common import Unreadable, is_corrupt, open_binary, require_columns, unreadable_rows

BATCH_ROWS = 1024  # Parquet rows decoded at a time
READ_BUFFER = 1 << 20  # bytes; Parquet column chunks are streamed through a buffer this large


class Parquet:
    whole_file = False

    def columns(self, path: str) -> list[str]:
        with open_binary(path) as f:
            return pq.ParquetFile(f).schema_arrow.names

    def count(self, path: str, rows_per_shard: int) -> tuple[int, dict[int, int]]:
        with open_binary(path) as f:
            return pq.ParquetFile(f).metadata.num_rows, {}

    def records(self, path: str, columns: Sequence[str], start: int, stop: int | None,
                byte_offset: int, unreadable: Unreadable | None = None) -> Iterator[tuple[int, dict]]:
        """Decodes only the row groups that overlap ``[start, stop)``, one at a time."""
        with open_binary(path) as f:
            parquet = pq.ParquetFile(f, buffer_size=READ_BUFFER, page_checksum_verification=True)
            require_columns(path, parquet.schema_arrow.names, columns)
            stop = parquet.metadata.num_rows if stop is None else stop
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            firsts = list(itertools.accumulate(sizes, initial=0))  # the first row of each group
            for group, size in enumerate(sizes):
                if firsts[group] < stop and firsts[group] + size > start:
                    yield from self._group(parquet, path, group, firsts[group], columns, start, stop, unreadable)

    @staticmethod
    def _group(parquet: pq.ParquetFile, path: str, group: int, first: int, columns: Sequence[str], start: int,
               stop: int, unreadable: Unreadable | None) -> Iterator[tuple[int, dict]]:
        """The rows of ``[start, stop)`` in one row group (its first row: ``first``)."""
        row, end = first, first + parquet.metadata.row_group(group).num_rows
        try:
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=list(columns)):
                lo, hi = max(start - row, 0), min(stop - row, batch.num_rows)
                for offset, record in enumerate(batch.slice(lo, max(hi - lo, 0)).to_pylist()):
                    yield row + lo + offset, record
                row += batch.num_rows
                if row >= stop:
                    return
        except Exception as err:  # noqa: BLE001 - re-raised unless the file's bytes are at fault
            if not is_corrupt(err):
                raise
            unreadable_rows(path, unreadable, max(row, start), min(end, stop),
                            f"unreadable data in row group {group} ({err}); write the file again")
