"""``msif status RUN_DIR``: what a run has done, read from its manifest and its shard markers; the
history of its nights (``msif nightly``) and which one ``nights/latest.json`` points to."""

from __future__ import annotations

from msif_ray.store import layout
from msif_ray.store.layout import MANIFEST
from msif_ray.store.lock import LOCK_NAME, Holder
from msif_ray.store.quarantine import BadDocument, quarantined
from msif_ray.ops.nightly import status_lines
from msif_ray.progress import format_duration
from msif_ray.store.storage import RunDir
from msif_ray.ops.summary import locations


def describe(run_dir: str) -> str:
    store = RunDir(run_dir)
    if not store.exists(MANIFEST):
        return "\n".join([f"{run_dir}: no run here yet (no {MANIFEST})"] + status_lines(store))
    manifest = store.read_json(MANIFEST)
    lines = [f"run {run_dir}  method {manifest.get('config', {}).get('method', '?')}"]
    for stage, record in manifest.get("stages", {}).items():
        state = record.get("state", "?")
        took = f"  {format_duration(record['seconds'])}" if "seconds" in record else ""
        why = f"  ({record['reason']})" if record.get("reason") else ""
        why = "  (reused: up to date)" if record.get("outcome") == "reused" else why
        lines.append(f"  {stage:<18} {state}{took}{why}")
        if state != "done":
            lines += _running_passes(store, stage, record["fingerprint"])
        for name, p in record.get("passes", {}).items():
            if name == "candidates":
                lines.append(candidates_line(p))
            elif "shards_total" in p:
                lines.append(
                    f"    {name:<12} shards {p['shards_total']}/{p['shards_total']} (computed {p['computed']}, "
                    f"reused {p['reused']})  docs {p['documents']}  tokens {p['tokens']}  {format_duration(p['seconds'])}"
                )
    lines += _left_out_lines(quarantined(store))
    if store.exists(LOCK_NAME):
        holder = Holder.parse(store.read_bytes(LOCK_NAME))
        lines.append(f"  locked by {holder.describe() if holder else 'an unreadable lock'} "
                     "(or left by a run that died; the next run takes it over)")
    return "\n".join(lines + locations(store) + status_lines(store))


def _left_out_lines(bad: list[BadDocument], shown: int = 10) -> list[str]:
    """The documents left out of the run directory's runs (``store/quarantine.py``), the first ``shown``."""
    if not bad:
        return []
    more = [f"    ... and {len(bad) - shown} more (quarantine/ in the run directory)"] if len(bad) > shown else []
    return ([f"  left out  {len(bad)} bad document(s) (data.on_bad_document: skip):"]
            + [f"    {b.describe()}" for b in bad[:shown]] + more)


def _running_passes(store: RunDir, stage: str, key: str) -> list[str]:
    """Jobs finished so far in an unfinished stage: .done.json markers, and shards in committed checkpoints."""
    from msif_ray.distributed.checkpoints import committed_checkpoints

    prefix = layout.stage_dir(stage, key)
    by_pass: dict[str, int] = {}
    for path in store.list(prefix):
        if layout.is_done_marker(path):
            name = path.rstrip("/").split("/")[-2]
            by_pass[name] = by_pass.get(name, 0) + 1
    folders = {p.rsplit("/", 1)[0] for p in store.list(prefix) if layout.is_checkpoint_marker(p)}
    for folder in sorted(folders):
        name = "/".join(folder.split("/")[-2:])
        by_pass[name] = sum(len(s) for s in committed_checkpoints(store, folder).values())
    return [f"    {name:<12} {count} done so far" for name, count in sorted(by_pass.items())]


def candidates_line(c: dict) -> str:
    """Index mode's account of its top k (``pipeline.index.candidate_summary``)."""
    warn = (f"; {c['still_changing']} queries' top {c['top_k']} still changed in the last round: the index may have "
            "missed documents there, and may elsewhere too (raise scoring.rerank_max)" if c["still_changing"] else "")
    return (f"    candidates   {c['queries']} queries: {c['rescored_per_query']:.0f} re-scored per query (at most "
            f"{c['rescored_max']}); of the returned top {c['top_k']}, {c['found_by_index_share']:.0%} were in the "
            f"index's own top {c['top_k']}, the deepest at index rank {c['deepest_rank_max']}{warn}")
