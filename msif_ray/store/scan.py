"""The validation scan: every document of a corpus read once, pages and rows, before any heavy pass.

Footers and indexes say how many rows a file has, not whether its data can be read. The scan reads
each file's data pages through ``read_documents`` (its id, text or token and boundary columns), as
the passes will: Parquet pages are verified against their CRC32 where the writer stored one, and
fail on decompression or decoding where it did not; every JSON Lines line is parsed; every Arrow
batch is validated in full. It returns the rows it could not read or decode
(``quarantine.BadDocument``), so that a corrupt file fails in seconds (``data.on_bad_document:
fail``), or its bad rows are known before the first pass (``skip``).

Cached: one JSON file per file content and columns, ``$MSIF_CACHE/scans/<key>.json``
(``config.cache_root()``), keyed by the file's content digest (``digests.file_digests``), so an
unchanged file is never scanned again, wherever it lies; a changed one is. The token formats
(Megatron datasets, raw arrays of token ids) have no data pages and no rows to decode: they are
not scanned (``check_token_ids`` reads them).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from msif_ray.config import cache_root
from msif_ray.store.data import Shard, read_documents
from msif_ray.store.digests import digest, file_digests
from msif_ray.store.formats import is_token_format
from msif_ray.store.quarantine import BadDocument

SCAN_VERSION = 1  # bump when what the scan finds changes: older cache entries are then ignored
PROGRESS_ROWS = 1_000_000  # a corpus with more rows to scan than this prints progress lines
PROGRESS_SECONDS = 10.0  # ... at most this often


def scan_corpus(shards: Sequence[Shard], id_column: str, text_column: str, token_column: str | None = None,
                boundary_column: str | None = None,
                log: Callable[[str], None] = print) -> list[BadDocument]:
    """The rows of the shards' files that cannot be read or decoded, by file and row.

    Every shard of a file is read (they cover it); a file whose content and columns were scanned
    before is not read again. Duplicate ids within a shard raise ``DataError``, as in a pass.
    """
    files: dict[str, list[Shard]] = {}
    for shard in shards:
        if not is_token_format(shard.format):
            files.setdefault(shard.path, []).append(shard)
    columns = [id_column, text_column, token_column, boundary_column]
    caches = [cache_root() / "scans" / f"{digest(content, columns, SCAN_VERSION)}.json"
              for content in file_digests(list(files))]
    found = {path: _cached(cache, path) for path, cache in zip(files, caches)}
    progress = _Progress(sum(s.num_rows for path, group in files.items() if found[path] is None for s in group), log)
    for (path, group), cache in zip(files.items(), caches):
        if found[path] is None:
            found[path] = []
            for shard in group:
                read_documents(shard, *columns, bad=found[path])
                progress.add(shard.num_rows)
            _save(cache, found[path])
    return [b for path in files for b in found[path]]


def _cached(cache: Path, path: str) -> list[BadDocument] | None:
    """The bad rows a scan of the same content found (None: never scanned), placed in ``path``."""
    try:
        entries = json.loads(cache.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    return [BadDocument(e["doc_id"], path, e["row"], e["reason"]) for e in entries]


def _save(cache: Path, bad: list[BadDocument]) -> None:
    """Write the scan's result atomically (no path: the content is the key, wherever the file lies)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    entries = [{"doc_id": b.doc_id, "row": b.row, "reason": b.reason} for b in bad]
    fd, temporary = tempfile.mkstemp(dir=cache.parent, prefix=".scan-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(entries, f)
    os.replace(temporary, cache)


class _Progress:
    """A first line, then one at most every PROGRESS_SECONDS, for PROGRESS_ROWS rows to scan or more."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.done, self.log = total, 0, log
        self.last = time.monotonic()
        if total >= PROGRESS_ROWS:
            log(f"validation scan: reading the data pages of {total:,} corpus rows (once per file content)")

    def add(self, rows: int) -> None:
        self.done += rows
        if self.total >= PROGRESS_ROWS and time.monotonic() - self.last >= PROGRESS_SECONDS:
            self.last = time.monotonic()
            self.log(f"validation scan: {self.done:,} of {self.total:,} corpus rows read ({self.done / self.total:.0%})")
