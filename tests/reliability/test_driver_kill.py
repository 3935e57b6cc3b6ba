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
import re
import shutil

from tests.reliability.segment_job import (
    UNIT_SIZE,
    Job,
    assert_commits_are_complete,
    assert_exactly_once,
    committed,
)


def test_driver_killed_at_any_moment_resumes_exactly_once(shapes_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    # Enough units that a mid-way kill leaves some: an actor runs two units at once, so they commit in pairs.
    for f in sorted((shapes_dir / "val").glob("*.jpg"))[:12]:
        shutil.copy(f, inputs / f.name)
    (inputs / "broken.jpg").write_bytes((shapes_dir / "val" / "000000.jpg").read_bytes()[:400])
    expected_uris = sorted(str(p) for p in inputs.iterdir())
    n_units = -(-len(expected_uris) // UNIT_SIZE)  # 13 inputs → 7 units
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()

    # 1. Killed right after the plan is written, before any unit is committed.
    job = Job(inputs, out, logs, "1-plan")
    job.kill_when(lambda: (out / "_plan" / "index.json").exists(), "the plan index")
    assert not committed(out)

    # 2. Killed after the first unit commit of the next run (which must reuse the plan, not list again).
    plan_mtime = (out / "_plan" / "index.json").stat().st_mtime_ns
    job = Job(inputs, out, logs, "2-first-commit")
    job.kill_when(lambda: len(committed(out)) >= 1, "the first unit commit")
    assert (out / "_plan" / "index.json").stat().st_mtime_ns == plan_mtime
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
    assert committed(out) == {f"{i:08d}" for i in range(n_units)}
    assert (out / "_SUCCESS.json").exists()

    by_uri = assert_exactly_once(out, expected_uris)
    assert by_uri[str(inputs / "broken.jpg")]["status"] == "error"
