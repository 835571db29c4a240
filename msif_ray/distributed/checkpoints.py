"""Worker-level checkpoints of the factor passes: exactly-once sums whose storage scales with workers.

A worker adds every shard it is given to one running sum in memory and, at most every
``interval`` seconds, commits it: the sum goes to ``<folder>/<worker>-<seq>.safetensors``, then a
marker ``… .json`` lists the shards it contains and the worker's previous checkpoint it replaces
(sums are cumulative), and only then is that previous checkpoint removed. So:

- a shard counts once it is listed by a committed checkpoint that no other marker replaces;
- a crash loses only the shards accumulated since the worker's last commit (the driver hands them
  out again), and a crash between any two writes leaves a consistent set of markers;
- storage holds about one checkpoint per worker, whatever the number of shards.

The marker also records the checkpoint's byte size: a checkpoint that is missing or whose size
differs (truncated, emptied), or whose marker does not parse, is not committed; its marker is
removed after one warning, and its shards are summed again (an earlier checkpoint it replaced, if
still there, counts again: it holds a part of the same shards). A flipped byte keeps the size: the reduce job reading it finds it
(``DamagedArtifactError``) and the pipeline discards it.

A commit happens before a new shard is added, never after, so the shard of a call that crashes
is never in a checkpoint; the driver re-queues exactly the shards that no committed checkpoint lists.
A shard that fails with an exception half-way has polluted the running sum: the worker then drops
the whole accumulation (its committed checkpoint stays valid) and starts a new one.
"""

from __future__ import annotations

import time
import uuid
from typing import Callable, Protocol

import torch

from msif_ray.store.layout import checkpoint_file, checkpoint_marker, is_checkpoint_marker
from msif_ray.store.markers import size_problem
from msif_ray.store.storage import DamagedArtifactError, RunDir


class Sums(Protocol):
    """CovarianceSums or LambdaSums: passes add into them in place."""

    def to_tensors(self) -> dict[str, torch.Tensor]: ...


class Accumulation:
    """One worker's running sum for one checkpoint folder (one pass of one layer group)."""

    def __init__(self, store: RunDir, folder: str, interval: float, sums: Sums):
        self.store, self.folder, self.interval = store, folder, interval
        self.worker = uuid.uuid4().hex[:12]
        self.sequence = 0
        self.sums = sums  # the pass adds each shard into it in place
        self.shards: dict[str, dict] = {}
        self.uncommitted = 0
        self.committed: str | None = None
        self.last_commit = time.monotonic()

    def added(self, shard_id: str, stats: dict) -> None:
        """Record that ``shard_id`` has been added into ``sums``."""
        self.shards[shard_id] = stats
        self.uncommitted += 1

    def commit_if_due(self) -> None:
        if self.uncommitted and time.monotonic() - self.last_commit >= self.interval:
            self.commit()

    def commit(self) -> str | None:
        """Write the running sum and its marker; drop the checkpoint it replaces. Returns its name."""
        if not self.uncommitted:
            return self.committed
        name = checkpoint_file(self.folder, self.worker, self.sequence)
        size = self.store.save_tensors(name, self.sums.to_tensors(), {"worker": self.worker})
        self.store.write_json(checkpoint_marker(name), {"shards": self.shards, "bytes": size,
                                                        "replaces": [self.committed] if self.committed else []})
        if self.committed:
            self.store.remove(checkpoint_marker(self.committed))
            self.store.remove(self.committed)
        self.committed, self.sequence, self.uncommitted = name, self.sequence + 1, 0
        self.last_commit = time.monotonic()
        return name


def committed_checkpoints(store: RunDir, folder: str, warn: Callable[[str], None] | None = None
                          ) -> dict[str, dict[str, dict]]:
    """checkpoint name -> {shard id: stats} of the valid checkpoints of ``folder``.

    Valid: its marker parses, its tensors exist with the size the marker recorded
    (``committed_markers``), no other marker replaces it, and it shares no shard with a checkpoint
    accepted before it (a defensive rule: its shards are then recomputed). Sizes come from one
    listing of the folder. With ``warn`` (the pipeline), an invalid marker is reported and removed;
    without (``msif status``, which only reads), it is left out.
    """
    sizes = store.sizes(folder)
    markers = committed_markers(store, sizes, warn)
    replaced = {r for m in markers.values() for r in m["replaces"]}
    valid: dict[str, dict[str, dict]] = {}
    seen: set[str] = set()
    for name in sorted(markers):
        shards = markers[name]["shards"]
        if name in replaced or seen & shards.keys():
            continue
        valid[name] = shards
        seen |= shards.keys()
    return valid


def committed_markers(store: RunDir, sizes: dict[str, int], warn: Callable[[str], None] | None
                      ) -> dict[str, dict]:
    """checkpoint name -> its marker, for the markers among ``sizes`` (a folder's listing) that
    parse and whose checkpoint exists with the recorded size; the others are left out, or with
    ``warn`` reported and removed."""
    markers = {}
    for marker in filter(is_checkpoint_marker, sizes):
        name = marker.removesuffix(checkpoint_marker(""))
        try:
            content = store.read_json(marker)
            problem = size_problem(sizes.get(name), content.get("bytes"))
        except DamagedArtifactError as err:
            problem = f"its marker is damaged ({err.problem})"
        if problem is None:
            markers[name] = content
        elif warn is not None:
            warn(f"warning: checkpoint {store.url(name)}: {problem}; its shards are summed again")
            store.remove(marker)
    return markers
