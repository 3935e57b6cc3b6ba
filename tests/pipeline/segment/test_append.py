"""Appending to an output (`output.mode: append`) and the unit size by device: growth of a folder and of an S3
Inventory picked up as new units, old rows untouched, an interrupted append planned again, the hint of a plain
re-run, `input.unit_size: auto` stored in the plan."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.errors import JobError
from pipeline.segment import plan as plan_mod
from pipeline.segment.config import segment_config
from pipeline.segment.run import _fingerprint_v1, segment
from tests.conftest import TINY_MODEL
from tests.reliability.segment_job import assert_exactly_once
from tests.support.s3inventory import write_inventory


def run(input_url: str, output_url: str, *, mode: str = "resume", unit_size=2, storage: dict | None = None):
    data = {
        "input": {"url": input_url, "unit_size": unit_size},
        "output": {"url": output_url, "mode": mode},
        "model": dict(TINY_MODEL),
    }
    if storage:
        data["input"]["storage"] = data["output"]["storage"] = storage
    lines: list[str] = []
    summary = segment(segment_config(data), log=lines.append)
    return summary, "\n".join(lines)


def _jpegs(shapes_dir):
    return sorted((shapes_dir / "val").glob("*.jpg"))


def test_append_after_growth_of_a_folder(ray_local, shapes_dir, tmp_path, monkeypatch):
    jpgs = _jpegs(shapes_dir)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for f in jpgs[:6]:
        shutil.copy(f, src / f.name)
    first, _ = run(str(src), str(out))
    assert first.complete and first.units_total == 3
    old_files = {p.name: p.read_bytes() for p in (out / "images").iterdir()}

    # Grown by 4, and one input of the first run deleted.
    for f in jpgs[6:10]:
        shutil.copy(f, src / f.name)
    (src / jpgs[0].name).unlink()
    summary, log = run(str(src), str(out))
    assert summary.complete and summary.units_committed == 0
    assert "4 new inputs at" in log and "--set output.mode=append" in log, log

    # An append that stops after staging its parts, before publishing the index: nothing refers to them.
    def crash(*args, **kwargs):
        raise RuntimeError("killed before the index")

    with monkeypatch.context() as m:
        m.setattr(plan_mod, "append_generation", crash)
        with pytest.raises(JobError):
            run(str(src), str(out), mode="append")
    assert list((out / "_plan" / "g00001").glob("*.parquet"))
    assert plan_mod.load_plan(str(out / "_plan")).units == 3

    summary, log = run(str(src), str(out), mode="append")
    assert "planned 4 new inputs in 2 units (generation 1, units 3..4" in log, log
    assert summary.complete and summary.units_committed == 2 and summary.units_skipped == 3
    plan = plan_mod.load_plan(str(out / "_plan"))
    assert [p.first_unit for p in plan.parts] == [0, 3] and plan.generation == 1
    # Every input of either listing once, the deleted one's row kept, the first run's files untouched.
    assert_exactly_once(out, [str(src / f.name) for f in jpgs[:10]])
    assert all((out / "images" / name).read_bytes() == data for name, data in old_files.items())
    assert (out / "_SUCCESS.json").exists()

    summary, log = run(str(src), str(out), mode="append")
    assert summary.complete and summary.units_committed == 0 and "nothing new: the 9 inputs at" in log, log
    summary, log = run(str(src), str(out))
    assert summary.units_committed == 0 and f"nothing new at {src}" in log, log
    assert "new inputs at" not in log


def test_append_a_second_days_s3_inventory(ray_local, s3, shapes_dir):
    fs, bucket, endpoint = s3
    storage = {"endpoint_url": endpoint}
    jpgs = _jpegs(shapes_dir)
    day1 = [f"photos/{f.name}" for f in jpgs[:3]]
    day2 = day1[1:] + [f"photos/{f.name}" for f in jpgs[3:5]]  # one key deleted, two added
    for f in jpgs[:5]:
        fs.pipe_file(f"{bucket}/photos/{f.name}", f.read_bytes())
    rows = lambda keys: [[bucket, k, "1", "false"] for k in keys] + [[bucket, "notes.txt", "1", "false"]]  # noqa: E731
    first_manifest = write_inventory(fs, bucket, rows(day1))
    out = f"s3://{bucket}/out"
    first, _ = run(first_manifest, out, storage=storage)
    assert first.complete and first.images == 3

    # The next day's report, delivered under its own date.
    second_manifest = write_inventory(fs, bucket, rows(day2)).replace("2026-11-29", "2026-11-30")
    fs.copy(first_manifest.removeprefix("s3://"), second_manifest.removeprefix("s3://"))
    summary, log = run(second_manifest, out, mode="append", storage=storage)
    assert (
        "planned 2 new inputs in 1 units (generation 1" in log and "2 already in this output's plan" in log
    ), log
    assert summary.complete and summary.units_committed == 1
    assert_exactly_once(f"{bucket}/out", [f"s3://{bucket}/{k}" for k in sorted(set(day1) | set(day2))], fs)
    config = json.loads(fs.cat_file(f"{bucket}/out/_config.json"))
    assert config["inputs"] == [first_manifest, second_manifest]

    # A plain re-run names an input of this output: resumed, and it says it did not read the manifest again.
    summary, log = run(second_manifest, out, storage=storage)
    assert summary.complete and "did not look for new inputs" in log, log
    with pytest.raises(JobError, match="--set output.mode=append"):
        run(f"s3://{bucket}/photos/", out, storage=storage)


def test_unit_size_auto_is_small_on_cpu_and_stored(ray_local, shapes_dir, tmp_path):
    assert plan_mod.auto_unit_size(device="auto", gpus_per_actor=None, cluster_gpus=4) == 2048
    assert plan_mod.auto_unit_size(device="cpu", gpus_per_actor=None, cluster_gpus=4) == 64
    assert plan_mod.auto_unit_size(device="auto", gpus_per_actor=None, cluster_gpus=0) == 64
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for f in _jpegs(shapes_dir)[:3]:
        shutil.copy(f, src / f.name)
    summary, log = run(str(src), str(out), unit_size="auto")
    assert (
        summary.complete
        and "unit size: 64 inputs per unit (input.unit_size auto: the cluster has no GPU)" in log
    )
    assert plan_mod.load_plan(str(out / "_plan")).unit_size == 64

    # As an output written before appends existed: its config holds the fingerprint of input URL and unit size.
    config = json.loads((out / "_config.json").read_text())
    config["config"]["input"]["unit_size"] = 2048
    cfg = segment_config({"input": {"url": str(src)}, "output": {"url": str(out)}, "model": TINY_MODEL})
    config["fingerprint"] = _fingerprint_v1(cfg, _spec(), config["config"])
    del config["inputs"]
    (out / "_config.json").write_text(json.dumps(config))
    (out / "_committed" / "00000000.json").unlink()  # one unit to redo, on a resume with another unit size
    summary, log = run(str(src), str(out), unit_size=2)
    assert "input.unit_size=2 not used: this output's plan has units of 64 inputs" in log, log
    assert summary.complete and summary.units_committed == 1 and summary.units_total == 1
    assert "new inputs" not in log
    assert plan_mod.load_plan(str(out / "_plan")).unit_size == 64


def _spec():
    from model.build import resolve_spec

    return resolve_spec(
        "none", architecture=None, min_size=TINY_MODEL["min_size"], max_size=TINY_MODEL["max_size"]
    )
