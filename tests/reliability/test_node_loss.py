"""A worker node lost mid-run: the job, submitted to a multi-node cluster, finishes on the nodes that remain, and
every input still has exactly one `images` row and its detections exactly once — no re-run needed.

The cluster is real Ray nodes on this machine (`ray.cluster_utils.Cluster`, as Ray's own chaos tests do): a head with
no CPUs, where the job's driver attaches, and two 2-CPU worker nodes, each holding one inference actor. After the
first unit commit the node under an actor is killed without warning (raylet, object store, workers). Ray restarts the
lost actor elsewhere and retries the unit it held; that unit's files are named by the unit, so a retry replaces them
rather than doubling rows, and the driver counts a unit once even when a re-executed task reports it again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

from tests.reliability.segment_job import (
    ROOT,
    Job,
    assert_commits_are_complete,
    assert_exactly_once,
    committed,
    private_ray,
)


class ClusterProcess:
    """`tests/reliability/ray_cluster.py` in a process of its own, driven over its stdin/stdout."""

    def __init__(self, workers: int, cpus: float):
        self.ray_tmp, env = private_ray("rn-")
        # The cluster's Ray workers import `pipeline`/`model` from the repo.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        cmd = [
            sys.executable,
            "-m",
            "tests.reliability.ray_cluster",
            f"--workers={workers}",
            f"--cpus={cpus}",
        ]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True
        )
        self.address = self._read()["address"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"the cluster process ended (exit {self.proc.wait()})"
        return json.loads(line)

    def remove_node_with_actor(self) -> dict:
        self.proc.stdin.write("remove\n")
        self.proc.stdin.flush()
        return self._read()

    def __enter__(self) -> ClusterProcess:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.proc.communicate("stop\n", timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def test_lost_node_loses_no_image(shapes_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in sorted((shapes_dir / "val").glob("*.jpg")):
        shutil.copy(f, inputs / f.name)
    expected_uris = sorted(str(p) for p in inputs.iterdir())
    n_units = len(expected_uris) // 2  # 12 inputs, 2 per unit
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()

    with ClusterProcess(workers=2, cpus=2) as cluster:
        job = Job(inputs, out, logs, "node-loss", ray_address=cluster.address)
        job.wait_for(lambda: len(committed(out)) >= 1, "the first unit commit")
        removed = cluster.remove_node_with_actor()
        done_at_loss = len(committed(out))
        assert removed["actors_on_node"] >= 1, removed  # the node really held inference work
        assert removed["marked_dead"], removed  # and Ray saw it go
        assert done_at_loss < n_units, "the node was lost too late to leave work for the remaining node"
        assert job.finish() == 0, job.output()

    stdout = job.stdout
    assert f"images: {len(expected_uris)} ({len(expected_uris)} ok, 0 error)" in stdout, job.output()
    assert committed(out) == {f"{i:08d}" for i in range(n_units)}
    assert (out / "_SUCCESS.json").exists()
    assert_commits_are_complete(out)
    assert_exactly_once(out, expected_uris)
