"""Ray Train end to end on a local Ray: two DDP workers (gloo) train a tiny configuration for a few iterations from
data on the moto S3 server, report COCO AP, write the checkpoint to S3; the segment job runs that checkpoint; a
second run with the same name resumes (the epoch counter goes on)."""

import pyarrow.dataset as pads
import pytest
import s3fs

from model.build import resolve_spec
from pipeline.config import ConfigError
from pipeline.demo.shapes import make_shapes
from pipeline.segment.config import segment_config
from pipeline.segment.run import segment
from pipeline.train.config import train_config
from pipeline.train.run import run_training


def tiny(data_root: str, storage_path: str, *, name: str, epochs: int, storage=None) -> dict:
    split = lambda s: {  # noqa: E731
        "annotations": f"{data_root}/annotations/instances_{s}.json",
        "images": f"{data_root}/{s}",
    }
    return {
        "data": {
            "train": split("train"),
            "val": split("val"),
            "loader_workers": 0,
            **({"storage": storage} or {}),
        },
        "model": {"weights": "none", "min_size": [64, 72], "max_size": 128},
        "train": {"epochs": epochs, "batch_size": 2, "lr": 0.002, "warmup_iters": 2, "log_interval": 1},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "run": {"name": name, "storage_path": storage_path, **({"storage": storage} if storage else {})},
    }


def test_two_workers_from_s3_checkpoint_to_s3_then_segment(ray_local, s3, tmp_path):
    fs, bucket, endpoint = s3
    storage = {"endpoint_url": endpoint}
    make_shapes(
        f"s3://{bucket}/shapes",
        train=8,
        val=4,
        seed=5,
        size=(64, 96),
        storage_options={"client_kwargs": {"endpoint_url": endpoint}},
    )
    data = tiny(f"s3://{bucket}/shapes", f"s3://{bucket}/runs", name="s3run", epochs=1, storage=storage)
    # Mixed precision on CPU workers (bfloat16 where oneDNN has it), fewer RPN proposals and smaller anchors,
    # which the checkpoint hands to the segment job.
    data["model"].update(rpn_proposals_train=200, rpn_proposals_test=60, anchor_sizes=[16, 32, 64, 128, 256])
    data["train"]["amp"] = True
    summary = run_training(train_config(data))
    assert summary.epochs_done == 1
    assert 0.0 <= summary.metrics["segm_AP"] <= 1.0 and 0.0 <= summary.metrics["bbox_AP"] <= 1.0
    url = summary.best_checkpoint_url
    assert url.startswith(f"s3://{bucket}/runs/s3run/checkpoint_") and url.endswith("/model.pt")
    s3fs.S3FileSystem.clear_instance_cache()
    assert s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).exists(url)
    options = {"client_kwargs": {"endpoint_url": endpoint}}
    spec = resolve_spec(url, storage_options=options)
    assert (spec.rpn_proposals, spec.anchor_sizes) == (60, (16, 32, 64, 128, 256))

    # The segment job runs the checkpoint with no other flag: sizes and class names come from it.
    seg = segment_config(
        {
            "input": {"url": f"s3://{bucket}/shapes/val", "storage": storage},
            "output": {"url": str(tmp_path / "seg")},
            "model": {"weights": url, "storage": storage, "score_threshold": 0.0},
        }
    )
    result = segment(seg, log=lambda _: None)
    assert result.complete and result.images == 4 and result.model_id.startswith("checkpoint:")
    dets = pads.dataset(str(tmp_path / "seg" / "detections"), format="parquet").to_table()
    assert set(dets.column("label_name").to_pylist()) <= {"circle", "square", "triangle", "star"}


def test_same_name_resumes_and_epoch_counter_goes_on(ray_local, tmp_path):
    make_shapes(str(tmp_path / "shapes"), train=8, val=4, seed=6, size=(64, 96))
    base = tiny(str(tmp_path / "shapes"), str(tmp_path / "runs"), name="resume", epochs=1)
    lines: list[str] = []
    first = run_training(train_config(base), log=lines.append)
    assert first.epochs_done == 1
    # Rank 0's lines reach the driver once each, through the event queue (not Ray's log forwarding).
    assert sum(line.startswith("epoch 0: bbox_AP=") for line in lines) == 1, lines
    assert sum(line.startswith("epoch 0 iter 1/") for line in lines) == 1, lines
    assert sum(line == "IoU metric: segm" for text in lines for line in text.splitlines()) == 1
    base["train"]["epochs"] = 2
    lines.clear()
    second = run_training(train_config(base), log=lines.append, tables=False)
    assert second.epochs_done == 2 and second.metrics["epoch"] == 1
    assert any(line.startswith("resuming from ") and line.endswith("at epoch 1") for line in lines), lines
    assert not any("IoU metric" in text for text in lines)  # tables=False: the AP line only
    assert sum(line.startswith("epoch 1: bbox_AP=") for line in lines) == 1


def test_bad_train_config_names_key():
    with pytest.raises(ConfigError, match="data.train.annotations: required"):
        train_config({"run": {"name": "x", "storage_path": "/tmp/x"}})
    with pytest.raises(ConfigError, match="unknown key 'train.lerning_rate'"):
        train_config({"train": {"lerning_rate": 1}})


def test_shipped_train_configs_validate():
    import os

    import yaml

    root = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs")
    for name in ("train.yaml", "train_cpu_small.yaml"):
        cfg = train_config(yaml.safe_load(open(os.path.join(root, name))))
        assert cfg.lr > 0 and cfg.run.name

    from pipeline.train.config import TrainConfig
    from tests.config_keys import dataclass_keys, yaml_keys

    # configs/train.yaml documents every key (the README points there for the list).
    assert dataclass_keys(TrainConfig) == yaml_keys(yaml.safe_load(open(os.path.join(root, "train.yaml"))))


def test_non_finite_loss_stops_with_iteration_and_losses(ray_local, tmp_path):
    from pipeline.errors import JobError

    make_shapes(str(tmp_path / "shapes"), train=16, val=2, seed=7, size=(64, 96))
    base = tiny(str(tmp_path / "shapes"), str(tmp_path / "runs"), name="nan", epochs=1)
    base["train"].update(lr=10.0, warmup_iters=1)  # the largest lr allowed: diverges within a few steps
    base["scaling"]["num_workers"] = 1
    with pytest.raises(JobError, match=r"non-finite loss at epoch \d+ iteration \d+ .*losses on rank 0: \{"):
        run_training(train_config(base))
