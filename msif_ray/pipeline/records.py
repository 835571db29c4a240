"""The manifest and the stages' done records: the one place that decides whether a stage is reused.

A stage is done for a key when its done record ``<stage>/<key>/stage.json`` exists
(``layout.stage_record``; written after every other output of the stage) and every output it
lists (the query batches, which live outside the key's folder) is done: present, with the size
its marker records (``store/markers.py``). That holds whatever the manifest's single record per
stage says, so going back to earlier inputs (two fine-tuned models in turn on one run directory,
say) reuses their outputs. The manifest keeps, per stage, the key, the named inputs, the outcome
(computed | reused | recomputed | resumed) and why, and the passes' stats.
"""

from __future__ import annotations

import time
from typing import Callable

from msif_ray.store import layout
from msif_ray.store.markers import done_outputs
from msif_ray.store.storage import RunDir


class StageRecords:
    """The run's manifest (``layout.MANIFEST``), kept in memory and written after every change."""

    def __init__(self, store: RunDir, log: Callable[[str], None]):
        self.store = store
        self.log = log
        self.manifest = layout.read_manifest(store)

    def save(self, **fields) -> None:
        self.manifest.update(fields)
        self.store.write_json(layout.MANIFEST, self.manifest)

    def is_done(self, stage: str, key: str, named: dict) -> bool:
        """Whether ``stage`` is done for ``key`` (then its record is the manifest's again), else start it.

        Logs why the stage is reused or (re)computed, comparing ``named`` with the inputs of its
        last manifest record.
        """
        last = self.manifest["stages"].get(stage)
        record_name = layout.stage_record(stage, key)
        record = self.store.read_json(record_name) if self.store.exists(record_name) else None
        if record is not None and self.outputs_done(record):
            self.manifest["stages"][stage] = record | {"outcome": "reused"}
            self.log(f"[{stage}] up to date, skipped: reused (key {key})")
            self.save()
            return True
        named = {n: v for n, v in named.items() if n != "key"}
        outcome, reason = why(key, named, last)
        self.log(f"[{stage}] {reason} (key {key})")
        self.manifest["stages"][stage] = {"fingerprint": key, "state": "running", "inputs": named,
                                          "outcome": outcome, "reason": reason}
        self.save()
        return False

    def outputs_done(self, record: dict) -> bool:
        """Whether every output a done record lists is done (one warning per one that is not)."""
        outputs = record.get("outputs", [])
        return len(done_outputs(self.store, outputs, self.log)) == len(outputs)

    def finish(self, stage: str, key: str, started: float, passes: dict, publish: Callable[[], None] | None = None,
               outputs: list[str] | None = None, done_record: bool = True) -> None:
        """Record ``stage`` done for ``key``: its done record in the key's folder (with its ``outputs``
        when they live outside it; none for the index, whose shards are its records), then (after
        ``publish``, if any) the manifest."""
        running = self.manifest["stages"].get(stage, {})
        record = {"fingerprint": key, "state": "done", "seconds": round(time.monotonic() - started, 3),
                  "passes": passes, "inputs": running.get("inputs", {})} | ({"outputs": outputs} if outputs else {})
        if done_record:
            self.store.write_json(layout.stage_record(stage, key), record)
        if publish is not None:
            publish()
        self.manifest["stages"][stage] = record | {k: running[k] for k in ("outcome", "reason") if k in running}
        self.save()


def why(key: str, named: dict, last: dict | None) -> tuple[str, str]:
    """(outcome, reason) of a stage about to run: what changed since its last manifest record."""
    if not last:
        return "computed", "computed (no earlier run)"
    if last.get("fingerprint") == key:
        if last.get("state") == "done":
            return "recomputed", "recomputed because its outputs are gone"
        return "resumed", "resuming (an earlier run stopped before the end of this stage)"
    before = last.get("inputs")
    if before is None:
        return "recomputed", "recomputed (the earlier run did not record its inputs)"
    changed = sorted(n for n in named.keys() | before.keys() if named.get(n) != before.get(n))
    return "recomputed", f"recomputed because {', '.join(changed) or 'its key'} changed"
