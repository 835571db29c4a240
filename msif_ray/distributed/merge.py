"""The top-k merge as a tree of bounded merges, run as Ray tasks over the run directory.

Every scoring shard writes its own top and bottom k per query. A merge task reads at most
``fan_in`` such tables and writes the k best rows per (query, side) of their union: a table of the
same kind, so merges stack into a tree of depth log_fan_in(shards). No process holds more than
``fan_in`` partial tables, and the driver holds only file names, whatever the number of shards.
"""

from __future__ import annotations

from typing import Callable, Sequence

import ray

from msif_ray.store.layout import BOTTOMK, TOPK
from msif_ray.engine.topk import final_table, merge_extremes
from msif_ray.store.storage import RunDir
from msif_ray.distributed.reduce import run_bounded

FAN_IN = 16


@ray.remote(num_cpus=0)
def merge_files(run_dir: str, inputs: list[str], output: str | None, k: int,
                final: tuple[str, str] = (TOPK, BOTTOMK)) -> None:
    """Merge ``inputs`` into ``output``; with ``output`` None, write the final top and bottom tables to ``final``."""
    store = RunDir(run_dir)
    merged = merge_extremes([store.read_parquet(name) for name in inputs], k)
    if output is not None:  # extra columns (the index's shard ids) are kept
        store.write_parquet(output, merged)
        return
    store.write_parquet(final[0], final_table(merged, "top"))
    store.write_parquet(final[1], final_table(merged, "bottom"))


def tree_merge(store: RunDir, partials: Sequence[str], k: int, name: Callable[[int, int], str],
               fan_in: int = FAN_IN, final: tuple[str, str] = (TOPK, BOTTOMK), output: str | None = None) -> int:
    """Merge ``partials`` level by level (``name(level, index)`` names the intermediate files) into
    the final top and bottom tables ``final`` (by default ``scores/topk.parquet`` and
    ``scores/bottomk.parquet``), or with ``output`` into one table of the same kind as the
    partials. Returns the number of levels."""
    files, level = list(partials), 0
    while len(files) > fan_in:
        chunks = [files[i : i + fan_in] for i in range(0, len(files), fan_in)]
        outputs = [name(level, i) for i in range(len(chunks))]
        run_bounded([(merge_files, store.url(), chunk, output, k) for chunk, output in zip(chunks, outputs)])
        files, level = outputs, level + 1
    ray.get(merge_files.remote(store.url(), files, output, k, final))
    return level + 1
