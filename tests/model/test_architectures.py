"""The table of architectures: every entry names torchvision builders and weights that exist; v2 is torchvision's
v2, also at narrow widths and through a checkpoint; model ids name the architecture, except the ids that existed
before (v1's COCO weights, checkpoints written before), which stay as they were so that their outputs resume."""

import hashlib

import pytest
import torch

from model.architectures import (
    ARCHITECTURES,
    WITH_COCO_WEIGHTS,
    architecture_of_model_id,
    for_backbone,
)
from model.build import build_maskrcnn, load_model, resolve_spec
from model.checkpoint import ARCH_SCHEMA, CheckpointError, save_checkpoint

V2 = "maskrcnn_resnet50_fpn_v2"
CLASSES = ["__background__", "circle", "square"]


def test_every_entry_names_torchvision_builders_and_weights_that_exist():
    from torchvision.models import get_model_builder, get_model_weights, get_weight

    for arch in ARCHITECTURES.values():
        assert get_weight(arch.backbone_weights).meta["categories"][0] == "tench"  # ImageNet's first class
        if arch.builder:
            get_model_builder(arch.builder)
        if arch.coco_weights:  # the COCO weights of that very builder, 91 classes
            assert get_weight(arch.coco_weights) in list(get_model_weights(arch.builder))
            assert len(get_weight(arch.coco_weights).meta["categories"]) == 91
    assert WITH_COCO_WEIGHTS == ("maskrcnn_resnet50_fpn", V2)
    assert for_backbone("resnet18") == "maskrcnn_resnet18_fpn"


def test_v2_is_torchvisions_v2():
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

    ours = build_maskrcnn(architecture=V2, num_classes=5, min_size=64, max_size=96)
    theirs = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=5)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert isinstance(ours.roi_heads.box_head, FastRCNNConvFCHead) and len(ours.rpn.head.conv) == 2
    # Anchor sizes are set after torchvision's v2 builder, which passes its own generator.
    small = build_maskrcnn(
        architecture=V2, num_classes=5, min_size=64, max_size=96, anchor_sizes=(8, 16, 32, 64, 128)
    )
    assert small.rpn.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))


def test_narrow_v2_round_trips_through_a_checkpoint_whose_id_names_it(tmp_path):
    model = build_maskrcnn(
        architecture=V2, num_classes=3, min_size=64, max_size=96, fpn_channels=32, box_head_size=64
    ).eval()
    head = model.roi_heads.box_head  # v2's: 4 convs (with BatchNorm), then one fully connected layer
    assert model.backbone.out_channels == 32 and [type(m).__name__ for m in head][3:6] == [
        "Conv2dNormActivation",
        "Flatten",
        "Linear",
    ]
    assert head[5].out_features == 64
    path = tmp_path / "v2.pt"
    arch = {"name": V2, "schema": ARCH_SCHEMA, "num_classes": 3, "min_size": 64, "max_size": 96}
    save_checkpoint(
        str(path),
        model_state=model.state_dict(),
        arch={**arch, "fpn_channels": 32, "box_head_size": 64},
        class_names=CLASSES,
    )
    spec = resolve_spec(str(path))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert spec.architecture == V2 and spec.model_id == f"checkpoint:{V2}:{sha[:16]}"
    assert architecture_of_model_id(spec.model_id) == V2
    rebuilt = load_model(spec, box_score_thresh=0.0)
    model.roi_heads.score_thresh = 0.0
    image = torch.rand(3, 64, 80)
    with torch.inference_mode():
        a, b = model([image])[0], rebuilt([image])[0]
    assert len(a["boxes"]) > 0 and torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])
    with pytest.raises(CheckpointError, match="not the maskrcnn_resnet50_fpn asked for"):
        resolve_spec(str(path), architecture="maskrcnn_resnet50_fpn")


def test_a_checkpoint_from_before_keeps_its_id_and_loads(tmp_path):
    """What the training job wrote before model.architecture: no `schema`, the id `checkpoint:<sha256[:16]>`."""
    model = build_maskrcnn(num_classes=3, weights="none", min_size=64, max_size=96).eval()
    path = tmp_path / "old.pt"
    save_checkpoint(
        str(path),
        model_state=model.state_dict(),
        arch={"name": "maskrcnn_resnet50_fpn", "num_classes": 3, "min_size": 64, "max_size": 96},
        class_names=CLASSES,
        epoch=3,
    )
    spec = resolve_spec(str(path))
    assert spec.model_id == f"checkpoint:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
    assert spec.architecture == "maskrcnn_resnet50_fpn" and architecture_of_model_id(spec.model_id) is None
    assert resolve_spec(str(path), architecture="maskrcnn_resnet50_fpn").model_id == spec.model_id
    rebuilt = load_model(spec)
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in model.state_dict().items())


def test_builtin_ids_v1_unchanged_v2_named():
    assert resolve_spec("DEFAULT").model_id == "torchvision:MaskRCNN_ResNet50_FPN_Weights.COCO_V1"
    assert resolve_spec("none").model_id == "random-init:maskrcnn_resnet50_fpn:seed0"
    v2 = resolve_spec("DEFAULT", architecture=V2)
    assert v2.model_id == "torchvision:MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1" and v2.architecture == V2
    assert resolve_spec("none", architecture=V2).model_id == f"random-init:{V2}:seed0"
    for spec in (resolve_spec("DEFAULT"), v2, resolve_spec("none", architecture="maskrcnn_resnet18_fpn")):
        assert architecture_of_model_id(spec.model_id) == spec.architecture
    with pytest.raises(ValueError, match="COCO weights for maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2"):
        resolve_spec("DEFAULT", architecture="maskrcnn_resnet18_fpn")
    with pytest.raises(ValueError, match="unknown architecture 'maskrcnn_vit'"):
        resolve_spec("none", architecture="maskrcnn_vit")
    with pytest.raises(ValueError, match="DEFAULT"):
        build_maskrcnn(architecture=V2, weights="DEFAULT", fpn_channels=64)
