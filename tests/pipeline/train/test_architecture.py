"""`model.architecture` in the training job: maskrcnn_resnet50_fpn_v2 trains under Ray Train and its checkpoint
runs in the segment job with no other flag (architecture, sizes and class names from the checkpoint alone, a model
id naming v2); the retired `model.backbone` key maps to the new one or is refused with a line naming it."""

import pyarrow.dataset as pads
import pytest

from model.build import resolve_spec
from pipeline.config import ConfigError
from pipeline.demo.shapes import make_shapes
from pipeline.segment.config import segment_config
from pipeline.segment.run import segment
from pipeline.train.config import train_config
from pipeline.train.run import loop_config, run_training
from tests.pipeline.train.test_run import tiny

V2 = "maskrcnn_resnet50_fpn_v2"


def test_v2_trains_and_its_checkpoint_segments_with_its_class_names(ray_local, tmp_path):
    make_shapes(str(tmp_path / "shapes"), train=4, val=2, seed=8, size=(64, 96))
    base = tiny(str(tmp_path / "shapes"), str(tmp_path / "runs"), name="v2", epochs=1)
    # v2's heads at a CPU test's widths (the builder's own path; torchvision's widths: tests/model/).
    base["model"].update(architecture=V2, fpn_channels=32, box_head_size=64, rois_per_image=32)
    base["model"].update(rpn_proposals_train=100, rpn_proposals_test=50)
    base["scaling"]["num_workers"] = 1
    trained = run_training(train_config(base), log=lambda _: None)
    assert trained.epochs_done == 1 and trained.best_checkpoint_url
    spec = resolve_spec(trained.best_checkpoint_url)
    assert spec.architecture == V2 and spec.model_id.startswith(f"checkpoint:{V2}:")

    seg = segment(
        segment_config(
            {
                "input": {"url": str(tmp_path / "shapes" / "val")},
                "output": {"url": str(tmp_path / "seg")},
                "model": {"weights": trained.best_checkpoint_url, "score_threshold": 0.0},
            }
        ),
        log=lambda _: None,
    )
    assert seg.complete and seg.images == 2 and f"model: {spec.model_id}" in "\n".join(seg.lines())
    dets = pads.dataset(str(tmp_path / "seg" / "detections"), format="parquet").to_table()
    assert dets.num_rows > 0 and set(dets.column("model_id").to_pylist()) == {spec.model_id}
    assert set(dets.column("label_name").to_pylist()) <= {"circle", "square", "triangle", "star"}


def base_config(**model) -> dict:
    split = {"annotations": "a.json", "images": "i"}
    return {
        "data": {"train": split, "val": split},
        "model": model,
        "run": {"name": "x", "storage_path": "/tmp/x"},
    }


def test_architecture_key_and_the_retired_backbone_key():
    assert train_config(base_config()).model.architecture == "maskrcnn_resnet50_fpn"
    cfg = train_config(base_config(architecture=V2, weights="DEFAULT"))
    assert loop_config(cfg)["architecture"] == V2 and loop_config(cfg)["weights"] == "DEFAULT"
    # model.backbone from before: mapped, also when it agrees with model.architecture.
    assert train_config(base_config(backbone="resnet18")).model.architecture == "maskrcnn_resnet18_fpn"
    assert train_config(base_config(backbone="resnet50", architecture="maskrcnn_resnet50_fpn"))
    with pytest.raises(
        ConfigError, match="model.backbone: replaced by model.architecture, one of .*'resnet101'"
    ):
        train_config(base_config(backbone="resnet101"))
    with pytest.raises(ConfigError, match="set model.architecture: maskrcnn_resnet18_fpn instead"):
        train_config(base_config(backbone="resnet18", architecture="maskrcnn_resnet50_fpn"))
    with pytest.raises(ConfigError, match="model.architecture: expected one of 'maskrcnn_resnet50_fpn', "):
        train_config(base_config(architecture="maskrcnn_vit"))
    with pytest.raises(ConfigError, match="DEFAULT .* maskrcnn_resnet50_fpn or maskrcnn_resnet50_fpn_v2"):
        train_config(base_config(architecture="maskrcnn_resnet18_fpn", weights="DEFAULT"))
    with pytest.raises(ConfigError, match="fpn_channels 256"):
        train_config(base_config(architecture=V2, weights="DEFAULT", fpn_channels=64))
