"""Two jobs on one output: the second, started while the first is writing, ends at once with one line naming the
live run (its lease), touches nothing, and the first finishes with every input exactly once."""

from __future__ import annotations

import json
import shutil
import time

from tests.reliability.segment_job import Job, assert_exactly_once


def test_a_second_job_on_a_live_output_is_refused_and_the_first_finishes(shapes_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in sorted((shapes_dir / "val").glob("*.jpg"))[:8]:
        shutil.copy(f, inputs / f.name)
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    first = Job(inputs, out, logs, "1-first")
    first.wait_for(lambda: (out / "_plan" / "index.json").exists(), "the first job's plan")
    lease = json.loads((out / "_lease.json").read_text())
    assert lease["pid"] == first.proc.pid
    config_before = (out / "_config.json").read_text()

    started = time.monotonic()
    second = Job(inputs, out, logs, "2-second")
    assert second.finish(timeout=120) == 1, second.output()
    assert time.monotonic() - started < 60  # refused without waiting for the first to end
    last = second.stderr_path.read_text().strip().splitlines()[-1]
    assert last.startswith(f"error: output {out} is being written by run {lease['run_id']} "), second.output()
    assert f"pid {first.proc.pid}" in last and "which holds a lock on it" in last
    assert (out / "_config.json").read_text() == config_before  # the second job touched nothing

    assert first.finish() == 0, first.output()
    assert_exactly_once(out, sorted(str(p) for p in inputs.iterdir()))
