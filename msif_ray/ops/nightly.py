"""``msif nightly CONFIG [--date YYYY-MM-DD]``: one night, and its publication under ``<run_dir>/nights/``.

A night is ``msif run`` under the run directory's lock: every stage whose fingerprint is
unchanged is reused, so a night with nothing new recomputes nothing, and new queries, shards or
checkpoints pay only for the stages they change. Once the run succeeded, the night is published
(names in ``store/layout.py``)::

    nights/<date>/topk.parquet, bottomk.parquet   copies of scores/topk.parquet and scores/bottomk.parquet
    nights/<date>/night.json                      date, started / finished (UTC), seconds, status, per stage:
                                                  recomputed or reused, its passes' shards computed / reused,
                                                  its fingerprint
    nights/history/<start>-<date>-<id>.json       one record per attempt, good or failed
    nights/latest.json                            the pointer to the last good night

Order: the night's files, then its history record, then ``latest.json``, so that whoever follows
the pointer finds the night's files complete (a pointer, not a symlink: run_dir may be on S3).

The history is one small object per attempt, written once and never rewritten: an object store
has no append, and a read-modify-write of one ``history.json`` would lose a record whenever two
writers raced (a night refused by the lock still records itself). Listing ``nights/history/``
gives the history; the names sort by the attempt's start.

A failed night (bad input, the lock held by another run, a bug) writes only its history record,
with status ``failed`` and the error's message on one line; ``latest.json`` keeps pointing at the
last good night, and the exit code is what ``msif run`` would give (2, 3, or the traceback).

Running a date again overwrites ``nights/<date>/`` (and points ``latest.json`` at it); the history
keeps both attempts.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid

from msif_ray.config import redact_text
from msif_ray.errors import user_error
from msif_ray.store import layout
from msif_ray.progress import format_duration
from msif_ray.store.storage import RunDir

PER_SHARD_STAGES = ("self_influence", "index")  # run every time, computing only the shards not done yet
STAGES = {  # the stages a method runs, in order
    "multi_stage": ["factors/finetune", "factors/pretrain", "queries", "scores"],
    "single_stage": ["factors/pretrain", "queries", "scores"],
    "grad_dot": ["queries", "scores"],
}
STATUS_LIMIT = 10  # nights listed by `msif status` (the most recent ones)


def parse_date(text: str) -> str:
    """A night's date, YYYY-MM-DD (YYYYMMDD accepted, as the CronJob names its RayJobs): normalized."""
    match = re.fullmatch(r"(\d{4})-?(\d{2})-?(\d{2})", text.strip())
    try:
        if match is None:
            raise ValueError
        return dt.date(*(int(g) for g in match.groups())).isoformat()
    except ValueError:
        raise ValueError(f"--date: {text!r} is not a date (YYYY-MM-DD)") from None


def today() -> str:
    return dt.datetime.now(dt.timezone.utc).date().isoformat()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _iso(moment: dt.datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def one_line(err: BaseException) -> str:
    """The error's message on one line: the input error behind it (as ``msif run`` prints it), else its type
    too; credentials in URLs masked (the history is read by others, like the manifest)."""
    cause = user_error(err) if isinstance(err, Exception) else None
    text = str(cause) if cause is not None else f"{type(err).__name__}: {err}"
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    text = redact_text(text)
    return text if len(text) <= 500 else text[:497] + "..."


def night_stages(method: str, before: dict, after: dict) -> dict:
    """Per stage the method runs: recomputed or reused, its passes' shards computed / reused, its fingerprint.

    ``before`` / ``after``: the manifest's ``stages`` when the night started and when it finished.
    A stage this run skipped (outcome ``reused``; without an outcome: a record that did not change)
    was reused whole: every shard of each pass counts as reused.
    The ``PER_SHARD_STAGES`` (listed before ``scores``) run every time to find shards not done yet:
    such a stage counts as recomputed when it computed any, and its seconds are always its own.
    """
    stages = {}
    for name in _with_optional(STAGES.get(method, list(after)), after):
        record = after.get(name)
        if record is None:
            continue
        if record.get("state") != "done":
            recomputed = True
        elif "outcome" in record:  # what this run did with the stage (a skipped stage is "reused")
            recomputed = record["outcome"] != "reused"
        else:
            recomputed = before.get(name) != record
        if name in PER_SHARD_STAGES:  # its record is rewritten by every run (it checks its shards): new shards count
            recomputed = any(p.get("computed", 0) > 0 for p in record.get("passes", {}).values())
        passes = {}
        for pass_name, p in record.get("passes", {}).items():
            if "shards_total" not in p:
                continue
            computed = p["computed"] if recomputed else 0
            passes[pass_name] = {"shards_total": p["shards_total"], "computed": computed,
                                 "reused": p["shards_total"] - computed}
        seconds = record.get("seconds", 0.0) if recomputed or name in PER_SHARD_STAGES else 0.0
        stages[name] = {"recomputed": recomputed, "fingerprint": record.get("fingerprint"),
                        "seconds": seconds, "passes": passes}
    return stages


def _with_optional(stages: list[str], after: dict) -> list[str]:
    """The method's stages, with ``self_influence`` (scoring.normalize) and index mode's ``index`` before
    ``scores`` when the run has them."""
    optional = [name for name in PER_SHARD_STAGES if name in after and name not in stages]
    at = stages.index("scores") if "scores" in stages else len(stages)
    return stages[:at] + optional + stages[at:]


class Night:
    """One attempt at the night ``date`` on ``run_dir``: ``publish`` after a good run, else ``fail``."""

    def __init__(self, run_dir: str, date: str):
        self.store = RunDir(run_dir)
        self.date = date
        self.started = _now()
        self.attempt = uuid.uuid4().hex[:8]
        start = self.started.strftime("%Y%m%dT%H%M%S.") + f"{self.started.microsecond // 1000:03d}Z"
        self.record_name = layout.history_record(start, date, self.attempt)
        self.published = False

    def _record(self, status: str, finished: dt.datetime | None = None, **fields) -> dict:
        finished = finished or _now()
        return {"date": self.date, "status": status, "started": _iso(self.started), "finished": _iso(finished),
                "seconds": round((finished - self.started).total_seconds(), 3), "attempt": self.attempt, **fields}

    def publish(self, method: str, before: dict, after: dict) -> dict:
        """Copy the result into ``nights/<date>/``, write night.json, the history record, then latest.json."""
        store, date = self.store, self.date
        store.copy(layout.TOPK, layout.night_topk(date))
        store.copy(layout.BOTTOMK, layout.night_bottomk(date))
        record = self._record("ok", stages=night_stages(method, before, after), topk=layout.night_topk(date),
                              bottomk=layout.night_bottomk(date))
        store.write_json(layout.night_record(date), record)
        store.write_json(self.record_name, record)
        store.write_json(layout.NIGHTS_LATEST, {
            "date": date, "finished": record["finished"], "night": layout.night_record(date),
            "topk": layout.night_topk(date), "bottomk": layout.night_bottomk(date),
            "url": store.url(layout.night_dir(date))})
        self.published = True
        return record

    def fail(self, err: BaseException) -> dict | None:
        """Record this attempt as failed (best effort: a run directory that cannot be written stays as it is)."""
        if self.published:  # e.g. the lease was lost after the night was complete: its files and pointer stand
            return None
        finished = _now()
        record = self._record("failed", finished, error=one_line(err))
        try:
            self.store.write_json(self.record_name, record)
        except Exception:  # noqa: BLE001 - the night's own error is the one to report
            return None
        return record


# --------------------------------------------------------------------------- reading


def history_names(store: RunDir) -> list[str]:
    """The history records' names, oldest first (their names start with the attempt's start)."""
    return [name for name in store.list(layout.NIGHTS_HISTORY) if name.endswith(".json")]


def history(store: RunDir, last: int | None = None) -> list[dict]:
    """The night attempts' records, oldest first; only the ``last`` ones when given (one read each)."""
    names = history_names(store)
    return [store.read_json(name) for name in (names[-last:] if last else names)]


def latest(store: RunDir) -> dict | None:
    return store.read_json(layout.NIGHTS_LATEST) if store.exists(layout.NIGHTS_LATEST) else None


def describe_night(record: dict) -> str:
    """``2026-11-30  ok      1m 02s  recomputed: queries, scores`` (or the error of a failed night)."""
    head = f"{record['date']}  {record['status']:<6} {format_duration(record.get('seconds', 0.0)):>8}"
    if record["status"] != "ok":
        return f"{head}  {record.get('error', '')}"
    stages = record.get("stages", {})
    recomputed = [name for name, s in stages.items() if s["recomputed"]]
    if not recomputed:
        return f"{head}  recomputed: nothing (every stage reused)"
    shards = []
    for name in recomputed:
        passes = stages[name]["passes"].values()
        computed, total = sum(p["computed"] for p in passes), sum(p["shards_total"] for p in passes)
        shards.append(f"{name} ({computed}/{total} shards)" if passes else name)
    return f"{head}  recomputed: {', '.join(shards)}"


def status_lines(store: RunDir, limit: int = STATUS_LIMIT) -> list[str]:
    """The night history and the latest pointer, for ``msif status`` (empty when the run dir has no nights)."""
    names = history_names(store)
    pointer = latest(store)
    if not names and pointer is None:
        return []
    where = (f"latest {pointer['date']} -> {store.url(layout.night_dir(pointer['date']))}/" if pointer
             else "latest: none (no good night yet)")
    lines = [f"  nights   {where}"]
    if len(names) > limit:
        lines.append(f"    ... {len(names) - limit} earlier nights in {store.url(layout.NIGHTS_HISTORY)}/")
    return lines + [f"    {describe_night(store.read_json(name))}" for name in names[-limit:]]
