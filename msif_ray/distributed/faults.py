"""Fault injection for the tests and the fault matrix (``benchmarks/fault_matrix.py``).

``MSIF_FAULT_INJECT="<pass>[:hang|:oom],..."`` in the driver's environment reaches every worker
through its settings. Once per pass named, on one of its jobs, the worker then dies (a real process
exit), hangs (sleeps until killed) or runs out of GPU memory (torch's own exception, where a real
one would come from). The marker ``_faults/<pass>`` in the run directory records where (node id,
pid), so that a test can take that node away, and makes the fault happen once per run directory.
"""

from __future__ import annotations

import os
import time
import uuid

import ray
import torch

from msif_ray.store.storage import RunDir

FAULT_ENV = "MSIF_FAULT_INJECT"


def maybe_fault(store: RunDir, spec: str | None, pass_name: str) -> None:
    """Inject the fault ``spec`` names for ``pass_name``, unless none does or it happened already."""
    faults = dict(f.partition(":")[::2] for f in (spec or "").split(",") if f)
    if pass_name not in faults:
        return
    marker = f"_faults/{pass_name.replace('/', '_')}"
    if store.exists(marker):
        return
    where = {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "fault": faults[pass_name] or "exit",
             "token": uuid.uuid4().hex}
    store.write_json(marker, where)
    time.sleep(1.0)  # a worker racing for the same pass wrote the marker too: the last write wins, the other goes on
    if store.read_json(marker)["token"] != where["token"]:
        return
    if faults[pass_name] == "hang":
        while True:
            time.sleep(60)
    if faults[pass_name] == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by a test)")
    os._exit(1)
