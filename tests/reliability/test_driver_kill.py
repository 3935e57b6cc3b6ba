"""The driver killed (SIGKILL, no cleanup) at several moments, then the same command run again on the same output:
every input ends with exactly one `images` row and its detections exactly once, and the re-run says how many
inputs it skipped as already done.

The job runs as a user runs it: `jobs/segment_archive.py` in a subprocess with its own embedded Ray. The
subprocess gets a session of its own, so the kill takes its whole process group (driver, GCS, raylet); the Ray
workers, each in a group of their own, must then die with their raylet — a crashed driver must not leave a Ray
behind that goes on using the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
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


class Job:
    """One run of the segment job in its own session, its output captured to files (a pipe could fill up)."""

    def __init__(self, inputs: Path, out: Path, logs: Path, name: str):
        self.stdout_path, self.stderr_path = logs / f"{name}.out", logs / f"{name}.err"
        # A private Ray temp dir, removed after the run; short, because Ray's unix socket paths below it must stay
        # under ~107 characters (pytest's tmp_path is too deep).
        self.ray_tmp = tempfile.mkdtemp(prefix="rk-")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # embedded Ray, never the suite's
        env["RAY_TMPDIR"] = self.ray_tmp
        sets = [f"model.{k}={v}" for k, v in TINY_MODEL.items()]
        sets += [f"input.unit_size={UNIT_SIZE}", "model.batch_size=1", "progress_interval_s=1"]
        cmd = [sys.executable, str(SCRIPT), "--input", str(inputs), "--output", str(out)]
        cmd += [arg for s in sets for arg in ("--set", s)]
        with open(self.stdout_path, "w") as o, open(self.stderr_path, "w") as e:
            self.proc = subprocess.Popen(cmd, stdout=o, stderr=e, env=env, cwd=ROOT, start_new_session=True)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def output(self) -> str:
        return f"--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr_path.read_text()[-3000:]}"

    def kill_when(self, ready: Callable[[], bool], what: str, timeout: float = 240) -> None:
        """SIGKILL the job's process group as soon as `ready()`; fail if the job ended before that moment."""
        deadline = time.time() + timeout
        try:
            while not ready():
                assert self.proc.poll() is None, f"the job ended before {what}:\n{self.output()}"
                assert time.time() < deadline, f"timed out waiting for {what}:\n{self.output()}"
                time.sleep(0.02)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self._assert_ray_gone()

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
            self._assert_ray_gone()

    def _assert_ray_gone(self, timeout: float = 60) -> None:
        """Every process of the job's session (Ray workers live in their own groups, not in the killed one) exits
        on its own once its raylet is gone. Leftovers are killed so the next run starts clean, then reported."""
        deadline = time.time() + timeout
        left = self._leftovers()
        while left and time.time() < deadline:
            time.sleep(0.5)
            left = self._leftovers()
        for p in left:
            p.kill()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        assert not left, f"processes outlived the killed job: {[(p.pid, p.name()) for p in left]}"

    def _leftovers(self) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter():
            try:
                if p.pid != self.proc.pid and os.getsid(p.pid) == self.proc.pid and p.status() != "zombie":
                    out.append(p)
            except (ProcessLookupError, psutil.Error):
                continue
        return out


def test_driver_killed_at_any_moment_resumes_exactly_once(shapes_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in sorted((shapes_dir / "val").glob("*.jpg"))[:8]:
        shutil.copy(f, inputs / f.name)
    (inputs / "broken.jpg").write_bytes((shapes_dir / "val" / "000000.jpg").read_bytes()[:400])
    expected_uris = sorted(str(p) for p in inputs.iterdir())
    n_units = -(-len(expected_uris) // UNIT_SIZE)  # 9 inputs → 5 units
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()

    # 1. Killed right after the plan is written, before any unit is committed.
    job = Job(inputs, out, logs, "1-plan")
    job.kill_when(lambda: (out / "_plan" / "units.jsonl").exists(), "the plan index")
    assert not committed(out)

    # 2. Killed after the first unit commit of the next run (which must reuse the plan, not list again).
    plan_mtime = (out / "_plan" / "units.jsonl").stat().st_mtime_ns
    job = Job(inputs, out, logs, "2-first-commit")
    job.kill_when(lambda: len(committed(out)) >= 1, "the first unit commit")
    assert (out / "_plan" / "units.jsonl").stat().st_mtime_ns == plan_mtime
    assert_commits_are_complete(out)
    before = committed(out)

    # 3. Killed mid-way: more than half the units committed, not all.
    job = Job(inputs, out, logs, "3-mid-way")
    job.kill_when(lambda: len(committed(out)) >= max(n_units // 2 + 1, len(before) + 1), "mid-way")
    assert f"resuming: {len(before)} of {n_units} units already committed" in job.stdout, job.output()
    assert_commits_are_complete(out)
    before = committed(out)
    assert len(before) < n_units, "the mid-way kill came too late to leave work for the re-run"
    inputs_done = sum(json.loads((out / "_committed" / f"{u}.json").read_text())["images"] for u in before)

    # 4. The same command again, to the end.
    job = Job(inputs, out, logs, "4-final")
    assert job.finish() == 0, job.output()
    stdout = job.stdout
    skipped = re.search(r"(\d+) already done \(skipped: (\d+) inputs\)", stdout)
    assert skipped, job.output()
    assert (int(skipped[1]), int(skipped[2])) == (len(before), inputs_done) and inputs_done > 0
    assert f"images: {len(expected_uris)} ({len(expected_uris) - 1} ok, 1 error)" in stdout, job.output()
    assert committed(out) == {f"{i:06d}" for i in range(n_units)}
    assert (out / "_SUCCESS.json").exists()

    images = pads.dataset(str(out / "images"), format="parquet").to_table().to_pylist()
    dets = pads.dataset(str(out / "detections"), format="parquet").to_table().to_pylist()
    assert sorted(r["image_uri"] for r in images) == expected_uris  # each input exactly once
    by_uri = {r["image_uri"]: r for r in images}
    assert by_uri[str(inputs / "broken.jpg")]["status"] == "error"
    instances = Counter((d["image_uri"], d["instance"]) for d in dets)
    assert instances and max(instances.values()) == 1  # no detection twice
    per_image = Counter(d["image_uri"] for d in dets)
    assert {u: r["num_detections"] for u, r in by_uri.items() if r["num_detections"]} == dict(per_image)
    for uri, n in per_image.items():  # instances 0..n-1 of each image: none lost, none from another run
        assert sorted(i for (u, i) in instances if u == uri) == list(range(n))


def assert_commits_are_complete(out: Path) -> None:
    """A completion record promises its unit's rows: both data files present, row counts as recorded."""
    for unit in committed(out):
        record = json.loads((out / "_committed" / f"{unit}.json").read_text())
        images = pads.dataset(str(out / "images" / f"part-{unit}.parquet"), format="parquet").to_table()
        dets = pads.dataset(str(out / "detections" / f"part-{unit}.parquet"), format="parquet").to_table()
        assert (images.num_rows, dets.num_rows) == (record["images"], record["detections"]), unit
