"""Training faults, with `jobs/train.py` run as a user runs it (a subprocess with its own embedded Ray, a tiny
ResNet-18 configuration on generated shapes):

- a Ray Train worker killed (SIGKILL) mid-epoch: `FailureConfig` restarts the worker group from the latest checkpoint
  and the run finishes all its epochs;
- the driver killed (SIGKILL to its whole process group): the same command resumes from the latest checkpoint;
- a checkpoint that did not finish uploading is never the one resumed from. Ray Train (V2) resumes from the checkpoint
  manager's snapshot (`checkpoint_manager_snapshot.json` in the run folder), not from a scan of `checkpoint_*`
  folders: a worker first copies a checkpoint into its folder, and only a finished copy is reported to the controller,
  which then records it in the snapshot. A folder left by an interrupted copy is therefore in no snapshot. The test
  leaves such a folder (newest by name and time, its weights cut in half) and checks that the re-run ignores it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model.checkpoint import CheckpointError, load_checkpoint
from tests.reliability.segment_job import ROOT, SessionJob

SCRIPT = ROOT / "jobs" / "train.py"
SNAPSHOT = "checkpoint_manager_snapshot.json"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from pipeline.demo.shapes import make_shapes

    root = tmp_path_factory.mktemp("train-shapes")
    # 48 training images in batches of 2: an epoch long enough (24 steps) to be killed in the middle of.
    make_shapes(str(root), train=48, val=2, seed=11, size=(64, 96))
    return root


def sets(data: Path, runs: Path, *, name: str, epochs: int, workers: int) -> list[str]:
    values = {
        "data.train.annotations": data / "annotations" / "instances_train.json",
        "data.train.images": data / "train",
        "data.val.annotations": data / "annotations" / "instances_val.json",
        "data.val.images": data / "val",
        "data.loader_workers": 0,
        "model.weights": "none",
        "model.architecture": "maskrcnn_resnet18_fpn",
        "model.fpn_channels": 32,
        "model.box_head_size": 64,
        "model.rois_per_image": 32,
        "model.min_size": "[64]",
        "model.max_size": 96,
        "train.epochs": epochs,
        "train.batch_size": 2,
        "train.lr": 0.002,
        "train.warmup_iters": 2,
        "train.log_interval": 1,
        "scaling.num_workers": workers,
        "scaling.cpus_per_worker": 1,
        "run.name": name,
        "run.storage_path": runs,
        "run.max_failures": 2,
    }
    return [arg for k, v in values.items() for arg in ("--set", f"{k}={v}")]


def snapshot(run_dir: Path) -> dict | None:
    """Ray Train's record of the run's checkpoints, or None (not written yet, or caught mid-write)."""
    try:
        return json.loads((run_dir / SNAPSHOT).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def recorded(run_dir: Path) -> list[str]:
    snap = snapshot(run_dir)
    return [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]] if snap else []


def latest(run_dir: Path) -> tuple[str, int]:
    """The checkpoint a resume would use: its folder name and the epoch its weights hold."""
    name = snapshot(run_dir)["latest_checkpoint_result"]["checkpoint_dir_name"]
    return name, int(load_checkpoint(str(run_dir / name / "model.pt")).extra["epoch"])


def test_killed_worker_restarts_from_latest_checkpoint(shapes, tmp_path):
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    run_dir = runs / "worker-kill"
    job = SessionJob(SCRIPT, sets(shapes, runs, name="worker-kill", epochs=2, workers=2), logs, "worker-kill")
    try:
        # Epoch 0 is checkpointed and epoch 1 under way (its third step logged): kill one DDP worker.
        job.wait_for(
            lambda: len(recorded(run_dir)) == 1 and "epoch 1 iter 3/" in job.stdout, "epoch 1 under way"
        )
        workers = job.session("RayTrainWorker")
        assert len(workers) == 2, [p.cmdline() for p in workers]
        workers[0].kill()
        [first] = recorded(run_dir)  # epoch 0's: the kill came before epoch 1 was reported, mid-epoch
        assert job.finish() == 0, job.output()
    finally:
        job.kill()
    out = job.stdout
    # Ray Train restarted the worker group, and the new rank 0's resume notice reached the driver once, through the
    # event queue that outlived the killed workers (Ray's own retry messages stay in its logs by default).
    assert out.count(f"resuming from {run_dir}/{first} at epoch 1") == 1, job.output()
    assert "RayTrainWorker" not in out + job.stderr_path.read_text(), job.output()
    assert f"run: {run_dir}  epochs done: 2" in out, job.output()
    name, epoch = latest(run_dir)
    assert name != first and epoch == 1  # the last epoch, checkpointed by the restarted workers


def test_killed_driver_resumes_and_skips_unfinished_checkpoint(shapes, tmp_path):
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    run_dir = runs / "driver-kill"
    args = sets(shapes, runs, name="driver-kill", epochs=3, workers=1)

    job = SessionJob(SCRIPT, args, logs, "1-killed")
    try:
        job.wait_for(lambda: len(recorded(run_dir)) >= 1, "the first recorded checkpoint")
    finally:
        job.kill()
    resume_from, epoch = latest(run_dir)
    assert epoch < 2, "the driver was killed too late to leave work for the re-run"

    # An upload that never finished: the newest folder by name and time, weights cut in half, in no snapshot.
    unfinished = run_dir / "checkpoint_2999-12-31_23-59-59.999999"
    shutil.copytree(run_dir / resume_from, unfinished)
    weights = unfinished / "model.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError):  # really unusable: resuming from it would fail the run
        load_checkpoint(str(weights))

    job = SessionJob(SCRIPT, args, logs, "2-rerun")
    try:
        assert job.finish() == 0, job.output()
    finally:
        job.kill()
    out = job.stdout
    assert f"resuming from {run_dir}/{resume_from} at epoch {epoch + 1}" in out, job.output()
    assert unfinished.name not in out
    assert f"run: {run_dir}  epochs done: 3" in out, job.output()
    assert (
        unfinished.name not in recorded(run_dir) and unfinished.name not in (run_dir / SNAPSHOT).read_text()
    )
    name, last = latest(run_dir)
    assert last == 2 and name != unfinished.name
