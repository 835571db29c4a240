"""Arrow IPC stream files, as ``datasets.Dataset.save_to_disk`` writes them (``data-XXXXX-of-YYYYY.arrow``).

A ``paths`` entry may name the save_to_disk folder itself: its ``state.json`` lists the files in
order (``save_to_disk_files``). Local files are memory-mapped, so a shard touches only its pages;
remote ones are streamed. Each file is its own content key, as a Parquet file is.

Arrow IPC has no checksums: each batch read is validated in full (offsets in bounds, strings valid
UTF-8), so that flipped bytes fail there, naming the batch's rows, rather than decode to garbage. A
stream whose framing is broken cannot be counted, and is refused when the shards are planned.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import fsspec
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from msif_ray.store.formats.common import Unreadable, is_corrupt, require_columns, unreadable_rows


class ArrowStream:
    """An Arrow IPC stream file: the ``data-XXXXX-of-YYYYY.arrow`` files of ``save_to_disk``."""

    whole_file = False

    def _batches(self, path: str) -> Iterator[pa.RecordBatch]:
        fs, local = fsspec.core.url_to_fs(path)
        if isinstance(fs, LocalFileSystem):
            source = pa.memory_map(local)  # zero-copy: pages are read as the batches are touched
        else:
            source = fs.open(local, "rb")
        with source, pa.ipc.open_stream(source) as reader:
            yield from reader

    def columns(self, path: str) -> list[str]:
        fs, local = fsspec.core.url_to_fs(path)
        with fs.open(local, "rb") as f, pa.ipc.open_stream(f) as reader:
            return reader.schema.names

    def count(self, path: str, rows_per_shard: int) -> tuple[int, dict[int, int]]:
        return sum(batch.num_rows for batch in self._batches(path)), {}

    def records(self, path: str, columns: Sequence[str], start: int, stop: int | None,
                byte_offset: int, unreadable: Unreadable | None = None) -> Iterator[tuple[int, dict]]:
        row = 0
        for batch in self._batches(path):
            if row == 0:
                require_columns(path, batch.schema.names, columns)
            lo, hi = max(start - row, 0), batch.num_rows if stop is None else min(stop - row, batch.num_rows)
            if hi > lo:
                try:
                    part = batch.select(list(columns))
                    part.validate(full=True)  # the whole batch: its rows fail together, however it is sliced
                    records = part.slice(lo, hi - lo).to_pylist()
                except Exception as err:  # noqa: BLE001 - re-raised unless the file's bytes are at fault
                    if not is_corrupt(err):
                        raise
                    unreadable_rows(path, unreadable, row + lo, row + hi, f"unreadable Arrow batch ({err})")
                    records = []
                for offset, record in enumerate(records):
                    yield row + lo + offset, record
            row += batch.num_rows
            if stop is not None and row >= stop:
                return


def save_to_disk_files(folder: str) -> list[str] | None:
    """The Arrow files of a ``Dataset.save_to_disk`` folder, in order (from its ``state.json``), or None."""
    fs, local = fsspec.core.url_to_fs(folder)
    state = local.rstrip("/") + "/state.json"
    if not fs.isdir(local) or not fs.exists(state):
        return None
    with fs.open(state, "rb") as f:
        files = [entry["filename"] for entry in json.load(f).get("_data_files", [])]
    base = folder.rstrip("/")
    return [f"{base}/{name}" for name in files]
