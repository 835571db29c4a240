"""Whether outputs are done: their ``.done.json`` markers, checked against the outputs' sizes.

A map pass writes each output whole, then its marker, which records the output's byte size
(``bytes``). An output counts as done only when its marker parses, the output exists and its size
is the recorded one: a truncated or emptied output, or a damaged marker, counts as not done. Its
marker is then removed, after one warning naming the output, so that the next check (the stage
record's, then the pass's) sees a plain pending output and the normal resume logic computes it
again. A flipped byte keeps the size; ``RunDir``'s verification on load finds it. Markers written
before sizes were recorded are trusted while their output exists.

The sizes come from one listing per folder (``RunDir.sizes``), not one request per output.
"""

from __future__ import annotations

import posixpath
from typing import Callable, Iterable

from msif_ray.store.layout import done_marker
from msif_ray.store.storage import DamagedArtifactError, RunDir


def done_outputs(store: RunDir, outputs: Iterable[str], warn: Callable[[str], None]) -> dict[str, dict]:
    """output -> the stats in its marker, for those of ``outputs`` that are done (see above)."""
    outputs = list(outputs)
    sizes: dict[str, int] = {}
    for folder in sorted({posixpath.dirname(output) for output in outputs}):
        sizes |= store.sizes(folder)
    done = {}
    for output in outputs:
        if done_marker(output) not in sizes:
            continue
        try:
            stats = store.read_json(done_marker(output))
            problem = size_problem(sizes.get(output), stats.get("bytes"))
        except DamagedArtifactError as err:
            problem = f"its marker is damaged ({err.problem})"
        if problem is None:
            done[output] = stats
            continue
        warn(f"warning: {store.url(output)}: {problem}; it is computed again")
        store.remove(done_marker(output))
    return done


def size_problem(size: int | None, recorded: int | None) -> str | None:
    """What is wrong with an artifact of ``size`` bytes (None: missing) whose marker recorded
    ``recorded`` bytes (None: a marker from before sizes were recorded); None when nothing is."""
    if size is None:
        return "missing, though its marker says it is done"
    if recorded is not None and size != recorded:
        return f"{size} bytes where its marker recorded {recorded} (truncated or emptied)"
    return None
