"""An inference actor killed mid-run (SIGKILL to its process): Ray restarts it, the batch it held is retried, and
every input still ends up with exactly one images row."""

import os
import signal
import threading
import time

import psutil
import pyarrow.dataset as pads

from pipeline.segment.config import segment_config
from pipeline.segment.run import segment
from tests.conftest import TINY_MODEL


def kill_actor_after_first_commit(out_dir: str, killed: list) -> None:
    deadline = time.time() + 120
    committed = os.path.join(out_dir, "_committed")
    while time.time() < deadline and not (os.path.isdir(committed) and os.listdir(committed)):
        time.sleep(0.05)
    for proc in psutil.process_iter(["cmdline"]):
        if "MapBatches(SegmentWorker)" in " ".join(proc.info.get("cmdline") or []):
            proc.send_signal(signal.SIGKILL)
            killed.append(proc.pid)


def test_killed_actor_loses_no_image(ray_local, shapes_dir, tmp_path):
    out = str(tmp_path / "out")
    cfg = segment_config(
        {
            "input": {"url": str(shapes_dir / "val"), "unit_size": 2},
            "output": {"url": out},
            "model": {**TINY_MODEL, "batch_size": 1},
        }
    )
    killed: list = []
    killer = threading.Thread(target=kill_actor_after_first_commit, args=(out, killed), daemon=True)
    killer.start()
    summary = segment(cfg, log=lambda _: None)
    killer.join(timeout=5)
    assert killed, "the actor process was not found to kill"
    assert summary.complete and summary.images == 12
    images = pads.dataset(f"{out}/images", format="parquet").to_table()
    uris = images.column("image_uri").to_pylist()
    assert len(uris) == 12 and sorted(uris) == sorted(str(p) for p in (shapes_dir / "val").glob("*.jpg"))
    assert set(images.column("status").to_pylist()) == {"ok"}
