"""A multi-node Ray cluster on this machine for the node-loss test, run as its own process:

    python -m tests.reliability.ray_cluster --workers 2 --cpus 2

Ray's `cluster_utils.Cluster` (what Ray's own chaos tests use) starts a head node with no CPUs (the driver attaches
there and is never lost) and worker nodes that are real raylets with their own object stores and worker processes.
It lives in a process of its own because the Cluster helper resets process-global Ray state on shutdown, which would
break the test suite's in-process Ray.

Protocol, one JSON line per reply on stdout:
  start             → {"address": GCS address}
  "remove" on stdin → removes (SIGKILL, no graceful shutdown) a worker node that runs an inference actor;
                      replies {"removed": node id, "actors_on_node": n, "marked_dead": bool}
  "stop" or EOF     → shuts the cluster down and exits
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import psutil
from ray._private import ray_constants
from ray.cluster_utils import Cluster

# Ray titles an actor process after its class: "ray::MapWorker(MapBatches(SegmentWorker))".
ACTOR_MARK = "MapBatches(SegmentWorker)"


def actors_on(node) -> int:
    """Inference actor processes started by this node's raylet (Ray workers are the raylet's children)."""
    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    n = 0
    for child in raylet.children(recursive=True):
        try:
            if ACTOR_MARK in " ".join(child.cmdline()):
                n += 1
        except psutil.Error:
            continue
    return n


def wait_marked_dead(cluster: Cluster, node_id: str, timeout: float = 60) -> bool:
    """Whether the cluster's control store (GCS) declared the node dead: what the job's driver and Ray Data see."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any(n["NodeID"] == node_id and n["Alive"] for n in cluster.global_state.node_table()):
            return True
        time.sleep(0.2)
    return False


def reply(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus", type=float, default=2)
    args = p.parse_args()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        workers = [cluster.add_node(num_cpus=args.cpus) for _ in range(args.workers)]
        cluster.wait_for_nodes()
        reply({"address": cluster.address})
        for line in sys.stdin:
            if line.strip() != "remove":
                break
            counts = {w.node_id: actors_on(w) for w in workers}
            victim = max(workers, key=lambda w: counts[w.node_id])
            cluster.remove_node(victim, allow_graceful=False)
            workers.remove(victim)
            reply(
                {
                    "removed": victim.node_id,
                    "actors_on_node": counts[victim.node_id],
                    "marked_dead": wait_marked_dead(cluster, victim.node_id),
                }
            )
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
