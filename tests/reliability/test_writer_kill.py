"""A writer killed mid-write: the inference actor (which writes its unit's files) dies with one of them uploaded and
the next in flight. Nothing it left is trusted — a unit is done only when its completion record exists, written
after both data files — and the unit is written again: by Ray's retry within the same run when only the actor
died, by the next run when the whole job died. Either way every input ends with exactly one `images` row and its
detections exactly once.

The output is on moto's S3 behind `tests/support/s3proxy.FaultyS3`, which stalls one upload (the detections file of unit 1,
its first attempt): the moment the proxy holds it is a writer mid-write, known exactly rather than raced for.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time

import psutil
import s3fs

from pipeline.segment.config import segment_config
from pipeline.segment.run import segment
from tests.conftest import TINY_MODEL
from tests.reliability.segment_job import UNIT_SIZE, Job, assert_exactly_once
from tests.support.s3proxy import Fault, FaultyS3

HELD = r"/out/detections/part-00000001\.parquet$"


def inputs_of(shapes_dir, tmp_path, n: int = 6) -> tuple:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in sorted((shapes_dir / "val").glob("*.jpg"))[:n]:
        shutil.copy(f, inputs / f.name)
    return inputs, sorted(str(p) for p in inputs.iterdir())


def bucket_on(moto_server: str, name: str) -> s3fs.S3FileSystem:
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_server}, skip_instance_cache=True)
    fs.mkdir(name)
    return fs


def state_of_unit_1(fs: s3fs.S3FileSystem, bucket: str) -> tuple[bool, bool, bool]:
    fs.invalidate_cache()
    return (
        fs.exists(f"{bucket}/out/images/part-00000001.parquet"),
        fs.exists(f"{bucket}/out/detections/part-00000001.parquet"),
        fs.exists(f"{bucket}/out/_committed/00000001.json"),
    )


def test_actor_killed_mid_write_its_unit_is_written_again_in_the_same_run(
    ray_local, moto_server, shapes_dir, tmp_path
):
    inputs, expected = inputs_of(shapes_dir, tmp_path)
    bucket = f"wk-actor-{tmp_path.name[-12:].lower().replace('_', '-')}"
    fs = bucket_on(moto_server, bucket)
    killed: list[int] = []
    seen: list[tuple] = []

    with FaultyS3(moto_server, [Fault("PUT", HELD, kinds=("stall",), delay_s=60)]) as proxy:

        def kill_writer_mid_write() -> None:
            if not proxy.stalled.wait(timeout=240):
                return
            # The unit's two data files go up concurrently: the images file, not held, may still be in flight
            # when the detections file stalls. Kill once it has landed (the stall holds for 60 s).
            deadline = time.monotonic() + 20
            state = state_of_unit_1(fs, bucket)
            while not state[0] and time.monotonic() < deadline:
                time.sleep(0.2)
                state = state_of_unit_1(fs, bucket)
            seen.append(state)
            for p in psutil.process_iter(["cmdline"]):
                if "MapBatches(SegmentWorker)" in " ".join(p.info.get("cmdline") or []):
                    p.send_signal(signal.SIGKILL)
                    killed.append(p.pid)

        killer = threading.Thread(target=kill_writer_mid_write, daemon=True)
        killer.start()
        storage = {"endpoint_url": proxy.endpoint}
        cfg = segment_config(
            {
                "input": {"url": str(inputs), "unit_size": UNIT_SIZE},
                "output": {"url": f"s3://{bucket}/out", "storage": storage},
                "model": {**TINY_MODEL, "batch_size": 1},
            }
        )
        summary = segment(cfg, log=lambda _: None)
        killer.join(timeout=5)
    assert killed, "the writer was not found mid-write"
    assert seen == [(True, False, False)]  # killed with its images file up, detections in flight, no record
    assert summary.complete and summary.units_committed == 3 and summary.images == len(expected)
    assert_exactly_once(f"{bucket}/out", expected, filesystem=fs)


def test_job_killed_while_a_writer_is_mid_write_then_rerun_exactly_once(moto_server, shapes_dir, tmp_path):
    inputs, expected = inputs_of(shapes_dir, tmp_path)
    bucket = f"wk-job-{tmp_path.name[-12:].lower().replace('_', '-')}"
    fs = bucket_on(moto_server, bucket)
    logs = tmp_path / "logs"
    logs.mkdir()
    with FaultyS3(moto_server, [Fault("PUT", HELD, kinds=("stall",), delay_s=60)]) as proxy:
        # A short lease: the killed driver cannot release it, and the re-run takes it over after one period.
        sets = [f"output.storage.endpoint_url={proxy.endpoint}", "output.lease_s=4"]
        job = Job(inputs, f"s3://{bucket}/out", logs, "1-killed", sets=sets)
        job.kill_when(proxy.stalled.is_set, "a writer mid-write")
        assert state_of_unit_1(fs, bucket) == (True, False, False)
        # Units 0 and 2 may or may not have committed before the kill (Ray Data does not promise an order).
        done = [u for u in (0, 2) if fs.exists(f"{bucket}/out/_committed/{u:08d}.json")]
        rerun = Job(inputs, f"s3://{bucket}/out", logs, "2-rerun", sets=sets)
        assert rerun.finish() == 0, rerun.output()
    assert "took over the lease of run" in rerun.stdout, rerun.output()
    if done:
        line = f"resuming: {len(done)} of 3 units already committed ({2 * len(done)} inputs skipped), "
        assert line + f"{3 - len(done)} to do" in rerun.stdout, rerun.output()
    assert f"units: 3 planned, {3 - len(done)} committed now, {len(done)} already done" in rerun.stdout, (
        rerun.output()
    )
    assert_exactly_once(f"{bucket}/out", expected, filesystem=fs)
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/out/_SUCCESS.json") and not fs.exists(f"{bucket}/out/_lease.json")
