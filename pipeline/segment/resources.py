"""Resources: how many inference actors, with how many GPUs, CPUs and threads each, from the cluster's shape."""

from __future__ import annotations

import dataclasses
import math

from pipeline.config import ConfigError
from pipeline.errors import JobError
from pipeline.segment.config import ComputeConfig
from pipeline.segment.settings import IO_THREADS


@dataclasses.dataclass(frozen=True)
class Resources:
    device: str  # "cuda" | "cpu"
    min_actors: int
    max_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    threads_per_actor: int
    read_cpus: float
    io_threads: int = IO_THREADS


def plan_resources(
    compute: ComputeConfig, *, device: str, cluster_gpus: float, node_cpus: list[float]
) -> Resources:
    """Size the actor pool from the cluster (pure; `auto` = None in `compute`).

    GPU clusters: one actor per GPU, 1 CPU each (its reads and decodes run on `io_threads` threads that mostly wait
    on storage or hold no GIL). CPU-only clusters: one actor per node, taking all of the node's CPUs but one and
    running torch with one thread per core. The reservations always leave `read_cpus` free on a node: an actor
    asking for every CPU starves the small tasks that feed it units, and Ray Data then waits forever (seen on a
    2-CPU machine).
    """
    if not node_cpus:
        raise JobError("the Ray cluster has no node with CPUs")
    per_node = min(node_cpus)
    read = compute.read_cpus
    use_gpu = device == "cuda" or (device == "auto" and cluster_gpus > 0 and compute.gpus_per_actor != 0)
    if use_gpu:
        if cluster_gpus <= 0 and device == "cuda":
            raise JobError("model.device is 'cuda' but the Ray cluster reports no GPU")
        gpus = compute.gpus_per_actor or 1.0
        cpus = compute.cpus_per_actor if compute.cpus_per_actor is not None else 1.0
        threads = compute.threads_per_actor or max(1, int(cpus))
        fit = max(1, int(cluster_gpus // gpus))
    else:
        gpus = 0.0
        if compute.cpus_per_actor is None:
            cpus = max(per_node - max(1.0, read), per_node / 2)
            threads = compute.threads_per_actor or max(1, int(per_node))
            fit = len(node_cpus)
        else:
            cpus = compute.cpus_per_actor
            threads = compute.threads_per_actor or max(1, int(cpus))
            fit = max(1, int(sum(math.floor((n - read) / cpus) if cpus else 1 for n in node_cpus)))
    if cpus + read > per_node + 1e-9:
        raise ConfigError(
            f"compute.cpus_per_actor: {cpus:g} CPUs per actor plus compute.read_cpus={read:g} exceed the "
            f"{per_node:g} CPUs of the smallest node; allowed at most {per_node - read:g}"
        )
    max_actors = compute.max_actors or fit
    min_actors = min(compute.min_actors or max_actors, max_actors)
    return Resources(
        device="cuda" if use_gpu else "cpu",
        min_actors=min_actors,
        max_actors=max_actors,
        gpus_per_actor=gpus,
        cpus_per_actor=cpus,
        threads_per_actor=threads,
        read_cpus=read,
        io_threads=compute.io_threads or IO_THREADS,
    )


def cluster_resources() -> tuple[float, list[float]]:
    """(total GPUs, CPUs of each alive node) of the connected Ray cluster."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return gpus, [c for c in nodes if c > 0]


def memory_per_actor(res: Resources, nodes: list[dict]) -> float | None:
    """Bytes of memory each inference actor has on the nodes that can run one (pure): a node's Ray `memory` resource
    over the actors it holds (GPU pools: its GPUs over `gpus_per_actor`; CPU pools: its CPUs, less `read_cpus`,
    over `cpus_per_actor`), the smallest over those nodes. A head with no CPUs or a CPU node of a GPU pool holds
    none and does not count. None when no node says."""
    shares = []
    for node in nodes:
        memory = node.get("memory")
        if not memory:
            continue
        if res.device == "cuda":
            fit = int(node.get("GPU", 0) // res.gpus_per_actor) if res.gpus_per_actor else 0
        else:
            fit = int((node.get("CPU", 0) - res.read_cpus) // res.cpus_per_actor) if res.cpus_per_actor else 1
        if fit >= 1:
            shares.append(memory / fit)
    return min(shares) if shares else None


def node_resources() -> list[dict]:
    """The resources (`CPU`, `GPU`, `memory`, ...) of each alive node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
