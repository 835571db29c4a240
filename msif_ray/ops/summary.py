"""The one-screen summary that ends every command: what ran, how long, what was reused, where things are.

Everything comes from the run directory: the manifest's stages (state, seconds, and per pass the
shards computed and reused) and the report's ``report/report.json``. A stage whose manifest
record did not change during the command, or says it was reused (``outcome``), was reused whole:
its outputs for its key were there (``pipeline/records.py``).
"""

from __future__ import annotations

from msif_ray.progress import format_duration
from msif_ray.store.layout import BOTTOMK, REPORT_INDEX, REPORT_STATS, TOPK, read_manifest
from msif_ray.store.storage import RunDir

REUSED_WHOLE = "all (up to date, skipped)"


def pass_work(name: str, stats: dict) -> str:
    """``covariance: shards 3 computed / 1 reused, 444 docs, 9,120 tokens`` (or the pass's plain counts)."""
    if "shards_total" in stats:
        return (f"{name}: shards {stats['computed']} computed / {stats['reused']} reused, "
                f"{stats['documents']:,} docs, {stats['tokens']:,} tokens")
    counts = ", ".join(f"{v:,} {k}" for k, v in stats.items() if isinstance(v, int) and not isinstance(v, bool))
    return f"{name}: {counts}" if counts else name


def stage_rows(manifest: dict, before: dict | None = None) -> list[dict]:
    """One row per stage: name, state, seconds (formatted), work of its last run (a line per pass), reused.

    ``before`` is the manifest's ``stages`` when the command started: an unchanged done stage was
    skipped (reused whole) by this command.
    """
    rows = []
    for name, record in manifest.get("stages", {}).items():
        passes = record.get("passes", {})
        sharded = [p for p in passes.values() if "shards_total" in p]
        unchanged = before is not None and before.get(name) == record
        if record.get("state") == "done" and (unchanged or record.get("outcome") == "reused"):
            reused = REUSED_WHOLE
        elif sharded:
            reused = f"{sum(p['reused'] for p in sharded)} of {sum(p['shards_total'] for p in sharded)} shards"
        else:
            reused = "none"
        rows.append({
            "name": name, "state": record.get("state", "?"),
            "seconds": format_duration(record["seconds"]) if "seconds" in record else "",
            "work": [pass_work(n, p) for n, p in passes.items()], "reused": reused,
        })
    return rows


def locations(store: RunDir) -> list[str]:
    """Where the results and the report are (or that they are not there yet)."""
    lines = []
    if store.exists(TOPK):
        lines.append(f"  result   {store.url(TOPK)}  (proponents; opponents in {BOTTOMK.rsplit('/', 1)[-1]})")
    else:
        lines.append("  result   not yet (the scores stage has not finished)")
    if store.exists(REPORT_STATS):
        stats = store.read_json(REPORT_STATS)
        lines.append(f"  report   {store.url(REPORT_INDEX)}  ({stats['queries']} queries, "
                     f"{stats['documents']} documents explained in {format_duration(stats['seconds'])})")
    else:
        lines.append(f"  report   not yet (msif report {store.url()})")
    return lines


def summarize(run_dir: str, command: str, seconds: float, before: dict | None = None) -> str:
    """The summary printed at the end of ``command``; ``before``: the manifest's stages at its start."""
    store = RunDir(run_dir)
    manifest = read_manifest(store)
    method = manifest.get("config", {}).get("method", "?")
    lines = [f"── msif {command}: finished in {format_duration(seconds)} ── run {store.url()}  (method {method})"]
    for row in stage_rows(manifest, before):
        if row["reused"] == REUSED_WHOLE:
            lines.append(f"  {row['name']:<17} reused   (up to date: computed by an earlier run in {row['seconds']})")
            continue
        lines.append(f"  {row['name']:<17} {row['state']:<8} {row['seconds']:>8}  reused: {row['reused']}")
        lines += [f"  {'':<17} {work}" for work in row["work"]]
    return "\n".join(lines + locations(store))
