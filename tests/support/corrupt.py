"""Damaged input files for the tests of bad documents."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROWS, GROUP = 30, 10  # a Parquet file of 3 row groups; the middle one has a corrupt data page


def corrupt_parquet(path: Path, rows: int = ROWS, prefix: str = "d") -> str:
    """A Parquet file (page checksums, groups of GROUP rows) with bytes flipped inside the text
    column's data page of row group 1 (rows GROUP to 2 * GROUP - 1)."""
    texts = [f"document {prefix}{i} says something long enough to fill its page" for i in range(rows)]
    pq.write_table(pa.table({"id": [f"{prefix}{i}" for i in range(rows)], "text": texts}), path,
                   row_group_size=GROUP, write_page_checksum=True, use_dictionary=False, compression="none")
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(1)
    end = chunk.data_page_offset + chunk.total_compressed_size  # the page's values end the chunk
    data = bytearray(path.read_bytes())
    for k in range(end - 20, end - 4):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))
    return str(path)
