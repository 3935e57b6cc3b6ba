"""A failing device loses nothing (pipeline/segment/faults.py): a device failure fails its unit without committing
anything and ends the actor, Ray restarts it and the unit runs again; an image that kills the device every time is
found and becomes one error row; out of memory on one image is that image's error row; the device check says what
to install.

A GPU that loses its context cannot exist here: the job runs as a user runs it (a subprocess with its embedded Ray)
with `tests/support/device_faults/sitecustomize.py` on its PYTHONPATH, which makes the actors' forward pass raise
what torch raises then (`torch.AcceleratorError`, a `RuntimeError` naming a CUDA error, a cuDNN one), every later
call in that process failing too, as a dead context does.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs

from model.decode import decode_image
from pipeline.errors import JobError
from pipeline.segment import faults
from tests.reliability.segment_job import Job, assert_exactly_once, finish_killing_actors_when
from tests.support.s3proxy import Fault, FaultyS3

INJECT = str(Path(__file__).resolve().parents[1] / "support" / "device_faults")


def inputs(shapes_dir, tmp_path, n: int) -> tuple[Path, list[str]]:
    folder = tmp_path / "in"
    folder.mkdir()
    for f in sorted((shapes_dir / "val").glob("*.jpg"))[:n]:
        shutil.copy(f, folder / f.name)
    return folder, sorted(str(p) for p in folder.iterdir())


def injected(spec: dict) -> dict[str, str]:
    path = os.pathsep.join(p for p in (INJECT, os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "SEGMENT_FAULTS": json.dumps(spec)}


def test_device_failures_in_three_forms_lose_nothing(shapes_dir, tmp_path):
    """The first three actor processes each die at their third forward pass, mid-unit, each with another form of
    device failure: every input ends `ok` exactly once, no `inference failed` row."""
    folder, expected = inputs(shapes_dir, tmp_path, 8)
    counters = tmp_path / "counters"
    counters.mkdir()
    spec = {"mode": "transient", "dead_processes": 3, "at_call": 3, "dir": str(counters)}
    job = Job(folder, tmp_path / "out", tmp_path, "transient", env=injected(spec))
    assert job.finish() == 0, job.output()
    assert sorted(p.name for p in counters.iterdir()) == [
        "failed-0",
        "failed-1",
        "failed-2",
    ]  # all three injected
    rows = assert_exactly_once(tmp_path / "out", expected)
    assert {r["status"] for r in rows.values()} == {"ok"}, {
        u: r["error"] for u, r in rows.items() if r["error"]
    }
    records = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_faults").glob("*.json")]
    assert sum(r["attempts"] for r in records) == 3
    assert f"device failures: {len(records)} unit(s) were run again after the device failed" in job.stdout
    assert (
        "(raylet)" not in job.output() and "A worker died" not in job.output()
    )  # Ray's lines in its log file
    assert {r["last_error"].split(":")[0] for r in records} <= {"AcceleratorError", "RuntimeError"}


def test_an_image_that_kills_the_device_every_time_becomes_one_error_row(shapes_dir, tmp_path):
    folder, expected = inputs(shapes_dir, tmp_path, 6)
    poison = expected[3]
    shape = decode_image(Path(poison).read_bytes(), max_pixels=10**8).shape[:2]
    job = Job(
        folder, tmp_path / "out", tmp_path, "poison", env=injected({"mode": "poison", "shape": list(shape)})
    )
    assert job.finish() == 0, job.output()
    rows = assert_exactly_once(tmp_path / "out", expected)
    assert rows[poison]["status"] == "error"
    assert rows[poison]["error"].startswith("inference failed: the device failed on this image alone 2 times")
    assert "AcceleratorError: CUDA error: an illegal memory access was encountered" in rows[poison]["error"]
    assert all(r["status"] == "ok" for u, r in rows.items() if u != poison)
    [record] = [json.loads(p.read_text()) for p in (tmp_path / "out" / "_faults").glob("*.json")]
    assert record["attempts"] == 4 and list(record["suspects"].values()) == [2]


def test_the_actor_killed_while_it_handles_a_device_failure_loses_nothing(moto_server, shapes_dir, tmp_path):
    """The first actor process fails its device and, while it records the failure (the upload held by the proxy),
    is killed: Ray restarts it, the unit runs again, every input exactly once."""
    folder, expected = inputs(shapes_dir, tmp_path, 6)
    counters = tmp_path / "counters"
    counters.mkdir()
    spec = {"mode": "transient", "dead_processes": 1, "at_call": 2, "dir": str(counters)}
    bucket = f"df-{tmp_path.name[-12:].lower().replace('_', '-')}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_server}, skip_instance_cache=True)
    fs.mkdir(bucket)
    with FaultyS3(moto_server, [Fault("PUT", r"/out/_faults/", kinds=("stall",), delay_s=60)]) as proxy:
        sets = [f"output.storage.endpoint_url={proxy.endpoint}"]
        job = Job(folder, f"s3://{bucket}/out", tmp_path, "kill", sets=sets, env=injected(spec))

        code, killed = finish_killing_actors_when(job, proxy.stalled)
    assert code == 0, job.output()
    assert killed, "the actor was not found mid-record"
    rows = assert_exactly_once(f"{bucket}/out", expected, filesystem=fs)
    assert {r["status"] for r in rows.values()} == {"ok"}


def test_oom_on_one_image_is_its_error_row_isolated_on_the_main_thread(shapes_dir, tmp_path):
    """torch's OutOfMemoryError on a batch: the batch runs again image by image on the main thread (never beside
    another forward pass), after the post thread is idle; exactly the image that fails alone is an error row."""
    from tests.pipeline.segment.test_worker import make_worker, units_for

    datas = {f.name: f.read_bytes() for f in sorted((shapes_dir / "val").glob("*.jpg"))[:6]}
    bad = list(datas)[4]
    bad_shape = decode_image(datas[bad], max_pixels=10**8).shape
    worker = make_worker(tmp_path / "out", batch_size=3, overlap=True)
    real = worker.segmenter.forward
    threads: list[str] = []

    def forward(images, original_sizes=None):
        threads.append(threading.current_thread().name)
        if any(tuple(i.shape) == bad_shape for i in images):
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return real(images, original_sizes)

    worker.segmenter.forward = forward
    [unit] = units_for(tmp_path, datas)
    stats = worker.process(unit)
    rows = {r["image_uri"]: r for r in pq.read_table(tmp_path / "out" / "images").to_pylist()}
    assert rows[bad]["error"] == (
        "inference failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB (injected)"
    )
    assert all(rows[u]["status"] == "ok" for u in datas if u != bad)
    assert (stats.ok, stats.errors) == (5, 1)
    assert set(threads) == {"MainThread"} and len(threads) == 2 + 3  # two batches, then the failed one alone


def test_failures_are_classified_by_what_they_are():
    import torch

    device = [
        torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("CUDA error: device-side assert triggered"),
        RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
        RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, ...)`"),
        RuntimeError("NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:275, unhandled cuda error"),
    ]
    image = [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("Input type (float) and bias type (c10::Half) should be the same"),
        ValueError("images must be 3-channel"),
    ]
    assert [faults.is_device_failure(e) for e in device] == [True] * len(device)
    assert [faults.is_device_failure(e) for e in image] == [False] * len(image)


def test_the_device_check_names_torchs_cuda_the_driver_it_needs_and_what_to_install(monkeypatch, tmp_path):
    """This machine has no GPU, which is what a node with a driver older than torch's CUDA looks like to torch."""
    import torch

    from pipeline.segment.settings import WorkerSettings
    from pipeline.segment.worker import SegmentWorker
    from tests.pipeline.segment.test_worker import SCORE, TINY_MODEL

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(JobError) as caught:
        faults.check_cuda()
    line = str(caught.value)
    assert "\n" not in line and f"built for CUDA {torch.version.cuda}" in line
    assert "R580 series or newer" in line and "download.pytorch.org/whl/cu126" in line
    from model.build import resolve_spec

    spec = resolve_spec("none", min_size=TINY_MODEL["min_size"], max_size=TINY_MODEL["max_size"])
    settings = WorkerSettings(spec=spec, score_threshold=SCORE, output_url=str(tmp_path), device="cuda")
    with pytest.raises(JobError, match="cannot use this node's GPU"):
        SegmentWorker(settings)


def test_a_unit_that_fails_the_device_too_often_ends_the_job_with_its_record(shapes_dir, tmp_path):
    """The job's budget: after MAX_ATTEMPTS device failures on one unit the actor raises `DeviceGaveUp` (a job-level
    one-line error) instead of ending itself again; the record keeps the count."""
    from tests.pipeline.segment.test_worker import make_worker, units_for

    datas = {f.name: f.read_bytes() for f in sorted((shapes_dir / "val").glob("*.jpg"))[:2]}
    worker = make_worker(tmp_path / "out", batch_size=2)
    [unit] = units_for(tmp_path, datas)
    faults.save(worker.output, faults.UnitFaults(unit.unit_id, attempts=faults.MAX_ATTEMPTS - 1))

    def dead(images, original_sizes=None):
        import torch

        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    worker.segmenter.forward = dead
    with pytest.raises(faults.DeviceGaveUp, match="the device failed 10 times"):
        worker.process(unit)
    assert faults.load(worker.output, unit.unit_id).attempts == faults.MAX_ATTEMPTS
    assert not (tmp_path / "out" / "_committed").exists()
