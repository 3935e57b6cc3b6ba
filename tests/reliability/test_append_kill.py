"""An append (`output.mode: append`) whose driver is killed (SIGKILL, with its embedded Ray) after some of the new
units commit, then run again: the second run resumes that append (same generation, same ordinals, nothing planned
twice), and every input of the first run and of the growth ends with exactly one `images` row."""

from __future__ import annotations

import shutil

from pipeline.segment import plan as plan_mod
from tests.reliability.segment_job import (
    UNIT_SIZE,
    Job,
    assert_commits_are_complete,
    assert_exactly_once,
    committed,
)


def test_append_killed_mid_way_resumes_as_that_append(shapes_dir, tmp_path):
    jpgs = sorted((shapes_dir / "val").glob("*.jpg"))
    inputs, out, logs = tmp_path / "in", tmp_path / "out", tmp_path / "logs"
    inputs.mkdir()
    logs.mkdir()
    for f in jpgs[:4]:
        shutil.copy(f, inputs / f.name)
    job = Job(inputs, out, logs, "1-first")
    assert job.finish() == 0, job.output()
    old_units = len(committed(out))
    assert old_units == 2

    grown = [inputs / f"new-{i:02d}.jpg" for i in range(16)]  # enough units that the kill leaves some to do
    for i, path in enumerate(grown):
        shutil.copy(jpgs[4 + i % 8], path)
    total_units = old_units + len(grown) // UNIT_SIZE
    job = Job(inputs, out, logs, "2-append-killed", sets=["output.mode=append"])
    job.kill_when(lambda: len(committed(out)) >= old_units + 1, "a new unit's commit")
    assert "planned 16 new inputs in 8 units (generation 1" in job.stdout, job.output()
    assert_commits_are_complete(out)
    assert len(committed(out)) < total_units, "the kill came too late to leave work for the re-run"
    assert not (out / "_SUCCESS.json").exists()  # withdrawn before the new units were published

    job = Job(inputs, out, logs, "3-append-again", sets=["output.mode=append"])
    assert job.finish() == 0, job.output()
    assert "nothing new: the 20 inputs at" in job.stdout, job.output()
    assert "units already committed" in job.stdout and "images: 20 (20 ok, 0 error)" in job.stdout, (
        job.output()
    )
    plan = plan_mod.load_plan(str(out / "_plan"))
    assert (plan.generation, plan.units) == (1, total_units)
    assert committed(out) == {f"{i:08d}" for i in range(total_units)}
    assert (out / "_SUCCESS.json").exists()
    assert_exactly_once(out, [str(inputs / f.name) for f in jpgs[:4]] + [str(p) for p in grown])
