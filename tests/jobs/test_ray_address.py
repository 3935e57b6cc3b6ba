"""Which Ray a job uses (jobs/_ray.py's init_ray), run as real processes with a Ray temp dir of their own.

Issue 14: a plain `ray.init()` joins the latest cluster recorded on the machine (`<RAY_TMPDIR>/ray/ray_current_cluster`),
so after a `ray start --head` cluster died without `ray stop` the next job waited for it for minutes, silently.
Now a job without --ray-address / $RAY_ADDRESS starts its own local Ray whatever is recorded, and joining a cluster
that does not answer ends with one `error: ...` line and exit status 1, within a bounded time.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "jobs"

# A job shaped like ours (init_ray + run_main): argv[1] is the --ray-address ('' for none), argv[2] an optional
# RAY_CONNECT_TIMEOUT_S (jobs/_ray.py) for the test that needs the bounded wait to end sooner than the real 60 s.
TINY_JOB = textwrap.dedent(
    f"""
    import sys
    sys.path.insert(0, {str(JOBS)!r})
    from _cli import init_ray, run_main
    from jobs import _ray

    def main():
        import ray
        if len(sys.argv) > 2:
            _ray.RAY_CONNECT_TIMEOUT_S = float(sys.argv[2])
        init_ray(sys.argv[1] or None)
        print("ray says", ray.get(ray.remote(lambda: 1).remote()), flush=True)
        print("gcs", ray.get_runtime_context().gcs_address, flush=True)
        ray.shutdown()
        return 0

    run_main(main)
    """
)


def _closed_port() -> int:
    """A TCP port nothing listens on, on any local address (Ray dials this node's IP for 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_env():
    """(RAY_TMPDIR, environment): a short private Ray temp dir (its unix socket paths must stay under ~107 chars)
    and an environment without RAY_ADDRESS that uses it; removed afterwards, with any Ray process still under it."""
    ray_tmp = tempfile.mkdtemp(prefix="rs-")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    try:
        yield ray_tmp, env
    finally:
        leftovers = _processes_under(ray_tmp)
        for p in leftovers:
            p.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not leftovers, f"Ray processes outlived the job: {[p.pid for p in leftovers]}"


def _processes_under(ray_tmp: str, grace_s: float = 10.0) -> list[psutil.Process]:
    """Live processes whose command line names `ray_tmp` (an embedded Ray's GCS, raylet, workers), after letting
    a stopping Ray finish for up to `grace_s`."""
    deadline = time.time() + grace_s
    while True:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid != os.getpid() and any(ray_tmp in a for a in p.info["cmdline"] or ()):
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        if not found or time.time() > deadline:
            return found
        time.sleep(0.5)


def _run(args: list[str], env: dict[str, str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """Run `args` in a session of its own (so that a hang can be ended with everything under it); wall time."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{args[1:]} did not end within {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err), time.monotonic() - t0


def _last_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def test_a_stale_recorded_cluster_does_not_stop_the_embedded_default(ray_env):
    ray_tmp, env = ray_env
    record = Path(ray_tmp, "ray", "ray_current_cluster")  # where Ray looks with RAY_TMPDIR set
    record.parent.mkdir()
    record.write_text(f"127.0.0.1:{_closed_port()}")  # a `ray start --head` that died without `ray stop`

    r, took = _run([sys.executable, "-c", TINY_JOB, ""], env, timeout=120)

    assert r.returncode == 0, r.stderr[-3000:]
    assert "ray says 1" in r.stdout
    assert "Failed to get cluster ID" not in r.stderr
    assert took < 90, f"took {took:.0f} s"


def test_an_address_where_nothing_listens_fails_at_once_with_one_line(ray_env, tmp_path):
    _, env = ray_env
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(inputs / "a.jpg")
    address = f"127.0.0.1:{_closed_port()}"

    r, took = _run(
        [
            sys.executable,
            str(JOBS / "segment_archive.py"),
            *("--input", str(inputs), "--output", str(out)),
            *("--set", "model.weights=none", "--ray-address", address),
        ],
        env,
        timeout=60,
    )

    assert r.returncode == 1, r.stderr[-3000:]
    assert _last_line(r).startswith(f"error: cannot reach the Ray cluster at {address} "), r.stderr[-3000:]
    assert "leave out --ray-address" in _last_line(r)
    assert "Traceback" not in r.stderr
    assert took < 30, f"took {took:.0f} s"


def test_ray_address_from_the_environment_is_probed_too(ray_env):
    _, env = ray_env
    address = f"127.0.0.1:{_closed_port()}"

    r, took = _run([sys.executable, "-c", TINY_JOB, ""], {**env, "RAY_ADDRESS": address}, timeout=60)

    assert r.returncode == 1, r.stderr[-3000:]
    assert _last_line(r).startswith(f"error: cannot reach the Ray cluster at {address} "), r.stderr[-3000:]
    assert "unset RAY_ADDRESS" in _last_line(r)
    assert took < 30, f"took {took:.0f} s"


def test_auto_without_a_recorded_cluster_fails_with_one_line(ray_env):
    ray_tmp, env = ray_env  # empty: nothing recorded

    r, took = _run([sys.executable, "-c", TINY_JOB, "auto"], env, timeout=60)

    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [_last_line(r)], r.stderr[-3000:]
    assert _last_line(r).startswith("error: --ray-address auto: no Ray cluster is recorded on this machine")
    assert os.path.join(ray_tmp, "ray", "ray_current_cluster") in _last_line(r)
    assert took < 30, f"took {took:.0f} s"


def test_a_peer_that_accepts_but_never_answers_ends_after_the_connect_timeout(ray_env):
    _, env = ray_env
    with socket.socket() as silent:  # the kernel accepts connections into the backlog; nobody ever answers
        silent.bind(("", 0))
        silent.listen(128)
        address = f"127.0.0.1:{silent.getsockname()[1]}"

        r, took = _run([sys.executable, "-c", TINY_JOB, address, "5"], env, timeout=60)

    assert r.returncode == 1, r.stderr[-3000:]
    assert _last_line(r).startswith(f"error: cannot reach the Ray cluster at {address} "), r.stderr[-3000:]
    assert "did not connect within 5 s" in _last_line(r)
    assert took < 30, f"took {took:.0f} s"


def test_auto_joins_the_cluster_that_ray_start_recorded(ray_env, tmp_path):
    ray_tmp, env = ray_env
    record = Path(ray_tmp, "ray", "ray_current_cluster")
    ports = [
        str(_closed_port()) for _ in range(3)
    ]  # none of Ray's fixed defaults: another cluster may hold them
    with open(tmp_path / "head.log", "w") as log:
        head = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "ray"),
                *("start", "--head", "--block", "--num-cpus", "1", "--include-dashboard", "false"),
                *("--disable-usage-stats", "--port", ports[0], "--ray-client-server-port", ports[1]),
                *("--dashboard-agent-listen-port", ports[2]),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 60
        while not (record.exists() and record.read_text().strip()):
            assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.time() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.2)

        r, took = _run([sys.executable, "-c", TINY_JOB, "auto"], env, timeout=90)

        assert r.returncode == 0, r.stderr[-3000:]
        assert "ray says 1" in r.stdout
        assert f"gcs {record.read_text().strip()}" in r.stdout  # the recorded cluster, not an embedded Ray
        assert took < 60, f"took {took:.0f} s"
    finally:
        _end_session(head)


def _end_session(leader: subprocess.Popen) -> None:
    """Kill every process of the session `leader` started (the head's GCS, raylet, agents, and workers, which
    sit in process groups of their own)."""
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == leader.pid:
                p.kill()
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
    leader.wait(timeout=30)
