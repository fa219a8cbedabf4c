"""Where a run's Ray Train workers ran: one record per start of its worker group, in the run folder.

Every time the worker group starts (the first start, each restart after a lost worker or node,
each re-run that resumes in place) rank 0 writes, once every rank has told it where it is::

    <run>/workers/start-<unix ns>.json
        {"step": 3,                  the step this start resumed from (0: from scratch)
         "world_size": 2,
         "time": "2025-01-01T12:00:00Z",
         "workers": [{"rank": 0, "node_id": "...", "node_ip": "...", "pid": 1234}, ...]}

:func:`starts` reads them back, oldest first (the driver's summary lists them as ``workers``).
"""

from __future__ import annotations

import json
import os
import time

from sea_ray import storage

FOLDER = "workers"


def this_worker(rank: int) -> dict:
    """Where this Ray Train worker runs: its Ray node (id and address) and process."""
    import ray

    return {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid()}


def record(run_uri: str, step: int, workers: list[dict]) -> str:
    """Write the record of one start of the worker group; returns its URI."""
    now = time.time_ns()
    uri = storage.join(run_uri, FOLDER, f"start-{now:020d}.json")
    storage.write_text(uri, json.dumps({
        "step": step, "world_size": len(workers),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now / 1e9)),
        "workers": sorted(workers, key=lambda w: w["rank"])}, indent=2, sort_keys=True))
    return uri


def starts(run_uri: str) -> list[dict]:
    """Every recorded start of the run's worker group, oldest first (none: an empty list)."""
    fs, path = storage.fsspec_fs(storage.join(run_uri, FOLDER))
    try:
        names = sorted(p for p in fs.ls(path, detail=False) if p.rstrip("/").split("/")[-1].startswith("start-"))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        with fs.open(name, "rb") as f:
            out.append(json.loads(f.read()))
    return out
