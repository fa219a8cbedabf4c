"""Test helper, run as ``python -m tests.ray_node '<json>'``: a Ray worker node on 127.0.0.1 joined
to a cluster, started as ``ray start --address`` starts one; prints its node id and exits, leaving
the node's processes (raylet, agents) running in this process's session.

Why not ``ray start --address`` itself: on Linux it refuses to join a node unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``, and with that set it resolves ``127.0.0.1`` in the address
to the machine's external address, where a loopback-only head does not listen. What it does after
those two steps is this: ``ray._private.node.Node(RayParams(...), head=False)`` (as
``ray.cluster_utils.Cluster.add_node`` does in-process, which would tie the node to the test's own
process and write the cluster's address into the machine-wide ``/tmp/ray``).

The JSON object holds RayParams fields: gcs_address, num_cpus, resources, temp_dir, ports,
object_store_memory; node_ip_address is always 127.0.0.1. With ``"block": true`` it prints its
node id and process session and stays, as ``ray start --block`` does: the command that
``sea-ray node-guard`` wraps.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> None:
    import ray._private.node
    import ray._private.parameter

    params = json.loads(argv[0])
    block = params.pop("block", False)
    ray_params = ray._private.parameter.RayParams(node_ip_address="127.0.0.1", node_name="127.0.0.1", num_gpus=0,
                                                  min_worker_port=0, max_worker_port=0, **params)
    node = ray._private.node.Node(ray_params, head=False, shutdown_at_exit=False, spawn_reaper=False)
    print(json.dumps({"node_id": node.node_id, "sid": os.getsid(0)}), flush=True)
    while block:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1:])
