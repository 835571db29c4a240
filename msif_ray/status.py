"""``msif status RUN_DIR``: what a run has done, read from its manifest and its shard markers."""

from __future__ import annotations

from msif_ray.lock import LOCK_NAME, Holder
from msif_ray.pipeline import MANIFEST, TOPK
from msif_ray.progress import format_duration
from msif_ray.storage import RunDir


def describe(run_dir: str) -> str:
    store = RunDir(run_dir)
    if not store.exists(MANIFEST):
        return f"{run_dir}: no run here yet (no {MANIFEST})"
    manifest = store.read_json(MANIFEST)
    lines = [f"run {run_dir}  method {manifest.get('config', {}).get('method', '?')}"]
    for stage, record in manifest.get("stages", {}).items():
        state = record.get("state", "?")
        took = f"  {format_duration(record['seconds'])}" if "seconds" in record else ""
        lines.append(f"  {stage:<18} {state}{took}")
        if state != "done":
            lines += _running_passes(store, stage, record["fingerprint"])
        for name, p in record.get("passes", {}).items():
            if "shards_total" in p:
                lines.append(
                    f"    {name:<12} shards {p['shards_total']}/{p['shards_total']} (computed {p['computed']}, "
                    f"reused {p['reused']})  docs {p['documents']}  tokens {p['tokens']}  {format_duration(p['seconds'])}"
                )
    lines.append(f"  result: {store.url(TOPK) if store.exists(TOPK) else 'not yet'}")
    if store.exists(LOCK_NAME):
        holder = Holder.parse(store.read_bytes(LOCK_NAME))
        lines.append(f"  locked by {holder.describe() if holder else 'an unreadable lock'} "
                     "(or left by a run that died; the next run takes it over)")
    return "\n".join(lines)


def _running_passes(store: RunDir, stage: str, key: str) -> list[str]:
    """Shards finished so far in an unfinished stage, counted from their .done.json markers."""
    prefix = f"{stage}/{key}" if stage != "scores" else f"scores/{key}"
    markers = [p for p in store.list(prefix) if p.endswith(".done.json")]
    if not markers:
        return []
    by_pass: dict[str, int] = {}
    for path in markers:
        name = path.rstrip("/").split("/")[-2]
        by_pass[name] = by_pass.get(name, 0) + 1
    return [f"    {name:<12} {count} shards done so far" for name, count in sorted(by_pass.items())]
