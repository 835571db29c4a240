"""msif-ray: multi-stage influence functions with EK-FAC curvature, on Ray.

The package, bottom to top (imports flow downwards only; ``tests/test_layers.py`` checks it):

    config, errors, progress   the typed config, the user-error base class, progress lines
    engine/        the mathematics on one process: no Ray, no storage (the Python API is here)
    store/         the run directory and its layout, content digests, corpus and model readers, the lock
    distributed/   Ray glue: the worker pool and actors, reduce jobs, the tree merge, the report's pass
    pipeline/      the stages of ``msif run``, their keys and reuse rules, the resource plan
    ops/           operating runs: status, the closing summary, nightly
    report/        the HTML report
    demo/          the toy world and ``msif demo``
    cli            ``msif``: imports everything, imported by nothing

The Python API is re-exported here (``from msif_ray import TrackedLM, Examples, Chain``); it is
imported on first use, so that ``msif`` starts without loading torch.
"""

from __future__ import annotations

import importlib

_API = {
    "TrackedLM": "msif_ray.engine.api", "Examples": "msif_ray.engine.api", "Scores": "msif_ray.engine.api",
    "Chain": "msif_ray.engine.influence", "precondition": "msif_ray.engine.influence",
    "QueryVectors": "msif_ray.engine.vectors", "Factors": "msif_ray.engine.curvature",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'msif_ray' has no attribute {name!r}")
