"""Parquet: columns from the footer, row groups decoded only where a shard overlaps them."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import pyarrow.parquet as pq

from msif_ray.store.formats.common import open_binary, require_columns

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
                byte_offset: int) -> Iterator[tuple[int, dict]]:
        """Decodes only the row groups that overlap ``[start, stop)``."""
        with open_binary(path) as f:
            parquet = pq.ParquetFile(f, buffer_size=READ_BUFFER)
            require_columns(path, parquet.schema_arrow.names, columns)
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
