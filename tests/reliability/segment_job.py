"""Jobs as a user runs them (`jobs/*.py` in a subprocess), for the tests that kill processes under them, and the
checks on the segment job's output that every such test ends with."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil
import pyarrow.dataset as pads

from tests.conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "jobs" / "segment_archive.py"
UNIT_SIZE = 2


def committed(out: Path) -> set[str]:
    d = out / "_committed"
    return {p.stem for p in d.glob("*.json")} if d.is_dir() else set()


def private_ray(prefix: str) -> tuple[str, dict[str, str]]:
    """A Ray temp dir of its own (removed by the caller) and an environment that uses it and never the suite's Ray.
    The dir is short because Ray's unix socket paths below it must stay under ~107 characters (pytest's tmp_path is
    too deep)."""
    ray_tmp = tempfile.mkdtemp(prefix=prefix)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    return ray_tmp, env


class SessionJob:
    """A job script (`jobs/*.py`) run as a user runs it, in a session of its own so that a kill takes its whole
    process group (driver, and with an embedded Ray its GCS and raylet); output captured to files (a pipe could fill
    up). Ray workers sit in process groups of their own within the session, which is how `session()` finds them."""

    def __init__(
        self, script: Path, args: list[str], logs: Path, name: str, env: dict[str, str] | None = None
    ):
        self.stdout_path, self.stderr_path = logs / f"{name}.out", logs / f"{name}.err"
        self.ray_tmp, job_env = private_ray("rk-")  # removed after the run
        env = {**job_env, **(env or {})}
        with open(self.stdout_path, "w") as o, open(self.stderr_path, "w") as e:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), *args],
                stdout=o,
                stderr=e,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def output(self) -> str:
        return f"--- stdout\n{self.stdout[-4000:]}\n--- stderr\n{self.stderr_path.read_text()[-4000:]}"

    def wait_for(self, ready: Callable[[], bool], what: str, timeout: float = 240) -> None:
        """Return as soon as `ready()`; fail if the job ended (or the time ran out) before that moment."""
        deadline = time.time() + timeout
        while not ready():
            assert self.proc.poll() is None, f"the job ended before {what}:\n{self.output()}"
            assert time.time() < deadline, f"timed out waiting for {what}:\n{self.output()}"
            time.sleep(0.02)

    def session(self, name_part: str = "") -> list[psutil.Process]:
        """Live processes of the job's session other than the driver, optionally those whose command line holds
        `name_part`."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid != self.proc.pid and os.getsid(p.pid) == self.proc.pid and p.status() != "zombie":
                    if name_part in " ".join(p.info.get("cmdline") or []):
                        found.append(p)
            except (ProcessLookupError, psutil.Error):
                continue
        return found

    def kill(self, grace: float = 60) -> list[tuple[int, str]]:
        """SIGKILL the job's process group (if still running). Ray workers must then exit on their own once their
        raylet is gone; those still alive after `grace` seconds are killed so the next run starts on a quiet machine,
        and returned as (pid, name), for the tests that require a crashed job to leave no Ray behind."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.time() + grace
        while (left := self.session()) and time.time() < deadline:
            time.sleep(0.5)
        outlived = []
        for p in left:
            try:
                outlived.append((p.pid, p.name()))
                p.kill()
            except psutil.Error:
                continue
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return outlived

    def finish(self, timeout: float = 300) -> int:
        """Wait for the job to end by itself; its exit status."""
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.outlived = self.kill()


class Job(SessionJob):
    """The segment job on `inputs` → `out`, with the tests' tiny model and 2-input units. Without `ray_address` it
    starts its own embedded Ray (as `python jobs/segment_archive.py` does for a user); with one it joins that
    cluster, as it does under `ray job submit`. A job that ends, by itself or killed, must leave no Ray behind."""

    def __init__(
        self,
        inputs: Path,
        out: Path | str,
        logs: Path,
        name: str,
        ray_address: str | None = None,
        sets: list[str] = (),
        env: dict[str, str] | None = None,
    ):
        sets = [f"model.{k}={v}" for k, v in TINY_MODEL.items()] + list(sets)
        sets += [f"input.unit_size={UNIT_SIZE}", "model.batch_size=1", "progress_interval_s=1"]
        args = ["--input", str(inputs), "--output", str(out), *[a for s in sets for a in ("--set", s)]]
        if ray_address:
            args += ["--ray-address", ray_address]
        super().__init__(SCRIPT, args, logs, name, env)

    def kill_when(self, ready: Callable[[], bool], what: str, timeout: float = 240) -> None:
        """SIGKILL the job's process group as soon as `ready()`; fail if the job ended before that moment."""
        try:
            self.wait_for(ready, what, timeout)
        finally:
            outlived = self.kill()
        assert not outlived, f"processes outlived the killed job: {outlived}"

    def finish(self, timeout: float = 300) -> int:
        code = super().finish(timeout)
        assert not self.outlived, f"processes outlived the job: {self.outlived}"
        return code


def assert_commits_are_complete(out: Path) -> None:
    """A completion record promises its unit's rows: both data files present, row counts as recorded."""
    for unit in committed(out):
        record = json.loads((out / "_committed" / f"{unit}.json").read_text())
        images = pads.dataset(str(out / "images" / f"part-{unit}.parquet"), format="parquet").to_table()
        dets = pads.dataset(str(out / "detections" / f"part-{unit}.parquet"), format="parquet").to_table()
        assert (images.num_rows, dets.num_rows) == (record["images"], record["detections"]), unit


def assert_exactly_once(out: Path | str, expected_uris: list[str], filesystem=None) -> dict[str, dict]:
    """Every input has exactly one `images` row and its detections exactly once; returns the rows by URI. `out`: a
    local folder, or a path on `filesystem` (e.g. `bucket/prefix` on an s3fs filesystem)."""
    images = pads.dataset(f"{out}/images", format="parquet", filesystem=filesystem).to_table().to_pylist()
    dets = pads.dataset(f"{out}/detections", format="parquet", filesystem=filesystem).to_table().to_pylist()
    assert sorted(r["image_uri"] for r in images) == sorted(expected_uris)  # each input exactly once
    by_uri = {r["image_uri"]: r for r in images}
    instances = Counter((d["image_uri"], d["instance"]) for d in dets)
    assert instances and max(instances.values()) == 1  # no detection twice
    per_image = Counter(d["image_uri"] for d in dets)
    assert {u: r["num_detections"] for u, r in by_uri.items() if r["num_detections"]} == dict(per_image)
    for uri, n in per_image.items():  # instances 0..n-1 of each image: none lost, none from another run
        assert sorted(i for (u, i) in instances if u == uri) == list(range(n))
    return by_uri


def finish_killing_actors_when(
    job: Job, stalled: threading.Event, before_kill: Callable[[], None] | None = None
) -> tuple[int, list[int]]:
    """Run `job` to its end while a thread SIGKILLs its inference actors once `stalled` is set (a request held by
    the fault proxy); `before_kill()` runs just before. Returns the job's exit code and the pids killed."""
    killed: list[int] = []

    def kill() -> None:
        if not stalled.wait(240):
            return
        if before_kill is not None:
            before_kill()
        for p in job.session("MapBatches(SegmentWorker)"):
            p.send_signal(signal.SIGKILL)
            killed.append(p.pid)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()
    code = job.finish()
    killer.join(timeout=5)
    return code, killed
