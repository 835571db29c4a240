"""The top-k merge as a tree of bounded merges over the run directory.

Every scoring shard writes its own top and bottom k per query. A merge job reads at most
``fan_in`` such tables and writes the k best rows per (query, side) of their union: a table of the
same kind, so merges stack into a tree of depth log_fan_in(shards). No process holds more than
``fan_in`` partial tables, and the driver holds only file names, whatever the number of shards;
the pipeline runs each level's jobs on its worker actors (``Passes.reduce``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from msif_ray.store.layout import BOTTOMK, TOPK
from msif_ray.engine.topk import final_table, merge_extremes
from msif_ray.store.storage import RunDir

FAN_IN = 16


@dataclass(frozen=True)
class Merge:
    """Merge ``inputs`` into ``output``; with ``output`` None, write the final top and bottom tables to ``final``."""

    inputs: tuple[str, ...]
    output: str | None
    k: int
    final: tuple[str, str] = (TOPK, BOTTOMK)

    @property
    def job_id(self) -> str:
        return f"merge into {self.output or self.final[0]}"

    def run(self, store: RunDir, device: object = None) -> dict:  # device: unused (reading, sorting, writing)
        merged = merge_extremes([store.read_parquet(name) for name in self.inputs], self.k)
        if self.output is not None:  # extra columns (the index's shard ids) are kept
            store.write_parquet(self.output, merged)
        else:
            store.write_parquet(self.final[0], final_table(merged, "top"))
            store.write_parquet(self.final[1], final_table(merged, "bottom"))
        return {}


Runner = Callable[[list], list]  # runs reduce jobs (anything with ``run(store, device)``), returns their results in order


def tree_merge(store: RunDir, partials: Sequence[str], k: int, name: Callable[[int, int], str],
               fan_in: int = FAN_IN, final: tuple[str, str] = (TOPK, BOTTOMK), output: str | None = None,
               run: Runner | None = None) -> int:
    """Merge ``partials`` level by level (``name(level, index)`` names the intermediate files) into
    the final top and bottom tables ``final`` (by default ``scores/topk.parquet`` and
    ``scores/bottomk.parquet``), or with ``output`` into one table of the same kind as the
    partials. ``run`` runs a level's jobs (default: here, one after another). Returns the number of levels."""
    run = run or (lambda jobs: [job.run(store) for job in jobs])
    files, level = list(partials), 0
    while len(files) > fan_in:
        chunks = [tuple(files[i : i + fan_in]) for i in range(0, len(files), fan_in)]
        outputs = [name(level, i) for i in range(len(chunks))]
        run([Merge(chunk, output, k) for chunk, output in zip(chunks, outputs)])
        files, level = outputs, level + 1
    run([Merge(tuple(files), output, k, final)])
    return level + 1
