"""Documents left out of a run (``data.on_bad_document: skip``): which, where, and why.

A document is quarantined when its row cannot be decoded (not text, not valid UTF-8, token ids
that are not integers), when it sits in a data page that fails its checksum or cannot be read, or
when its loss or gradient is non-finite under the model of a pass. It is then left out of every
sum and every result of the run: the factor passes, self-influence, scores, the index.

One record per shard, ``quarantine/<shard>.json`` (``layout.quarantine_record``): shard ids follow
the file's content, so a resumed run, and every later run on the same run directory, leaves out
the same documents, in every pass, whichever pass found them. ``msif status``, the manifest and
the report list them. With ``data.on_bad_document: fail`` the first one found stops the run
with ``BadDocumentsError`` listing them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterable

from msif_ray.errors import UserError
from msif_ray.store.layout import QUARANTINE, quarantine_record
from msif_ray.store.storage import RunDir

if TYPE_CHECKING:
    from msif_ray.store.data import Shard  # data.py imports this module


@dataclass(frozen=True)
class BadDocument:
    """One row left out: ``doc_id`` is None where the row could not be decoded far enough to read it."""

    doc_id: str | None
    path: str
    row: int
    reason: str

    def describe(self) -> str:
        who = f"document {self.doc_id!r}" if self.doc_id is not None else "a document"
        return f"{who} ({self.path}, row {self.row}): {self.reason}"


class BadDocumentsError(UserError, ValueError):
    """``data.on_bad_document: fail`` and bad documents were found; the message lists them."""

    def __init__(self, bad: Iterable[BadDocument], where: str = ""):
        self.bad, self.where = list(bad), where
        listed = "\n  - ".join(b.describe() for b in self.bad[:20])
        more = f"\n  ... and {len(self.bad) - 20} more" if len(self.bad) > 20 else ""
        super().__init__(f"{where}{len(self.bad)} bad document(s) (data.on_bad_document: fail):\n  - {listed}{more}\n"
                         "fix or remove them, or set data.on_bad_document: skip to leave them out and list them")

    def __reduce__(self):  # a worker's error crosses to the driver pickled: rebuild it from its fields
        return type(self), (self.bad, self.where)


def read_quarantine(store: RunDir, shard_id: str) -> list[BadDocument]:
    """The documents of shard ``shard_id`` left out so far (none: an empty list)."""
    name = quarantine_record(shard_id)
    if not store.exists(name):
        return []
    return [BadDocument(**entry) for entry in store.read_json(name)]


def add_to_quarantine(store: RunDir, shard_id: str, bad: Iterable[BadDocument]) -> list[BadDocument]:
    """Add ``bad`` to the shard's record (one entry per row; the first reason found stays); returns
    those of ``bad`` whose rows were not in it yet.

    Rows are the key: a shard is rows of one file, whose path may differ between machines. One pass
    works on a shard at a time, so the read-modify-write has no concurrent writer.
    """
    record = {b.row: b for b in read_quarantine(store, shard_id)}
    new = {}
    for b in bad:
        if b.row not in record:
            record[b.row] = new[b.row] = b
    if new:
        store.write_json(quarantine_record(shard_id), [asdict(record[row]) for row in sorted(record)])
    return list(new.values())


def quarantined(store: RunDir, shard_ids: Iterable[str] | None = None) -> list[BadDocument]:
    """Every document left out in the run directory (of ``shard_ids`` only, when given), by file and row."""
    wanted = None if shard_ids is None else {quarantine_record(s) for s in shard_ids}
    names = [n for n in store.list(QUARANTINE) if n.endswith(".json") and (wanted is None or n in wanted)]
    return sorted((BadDocument(**e) for n in names for e in store.read_json(n)), key=lambda b: (b.path, b.row))


def quarantine_rows(store: RunDir, shards: Sequence[Shard], bad: Iterable[BadDocument]) -> int:
    """Add each bad row to the record of the shard holding it (same path, row in ``[row_start,
    row_stop)``); returns how many rows fell in one of ``shards``."""
    by_path: dict[str, list[Shard]] = {}
    for shard in shards:
        by_path.setdefault(shard.path, []).append(shard)
    placed: dict[str, list[BadDocument]] = {}
    for b in bad:
        shard = next((s for s in by_path.get(b.path, ()) if s.row_start <= b.row < s.row_stop), None)
        if shard is not None:
            placed.setdefault(shard.shard_id, []).append(b)
    for shard_id, rows in placed.items():
        add_to_quarantine(store, shard_id, rows)
    return sum(len(rows) for rows in placed.values())
