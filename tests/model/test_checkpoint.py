import io
import os

import pytest
import torch

from model.build import build_maskrcnn, load_model, resolve_spec
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

CLASSES = ["__background__", "circle", "square"]


def _save_small(path, **extra):
    model = build_maskrcnn(num_classes=3, weights="none", min_size=128, max_size=192)
    save_checkpoint(
        str(path),
        model_state=model.state_dict(),
        arch={"name": "maskrcnn_resnet50_fpn", "num_classes": 3, "min_size": 128, "max_size": 192},
        class_names=CLASSES,
        **extra,
    )
    return model


def test_checkpoint_round_trip_rebuilds_identical_model(tmp_path):
    path = tmp_path / "ck.pt"
    original = _save_small(path, epoch=3)
    spec = resolve_spec(str(path))
    assert spec.class_names == tuple(CLASSES) and spec.min_size == 128 and spec.max_size == 192
    assert spec.model_id.startswith("checkpoint:")
    rebuilt = load_model(spec)
    for (k, a), (_, b) in zip(original.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), k
    assert load_checkpoint(str(path)).extra["epoch"] == 3


def test_sizes_from_config_override_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    _save_small(path)
    assert resolve_spec(str(path), min_size=160).min_size == 160


def test_pickled_payload_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "archive-segmenter/maskrcnn/v1", "payload": Evil()}, str(path))
    with pytest.raises(CheckpointError, match="refusing checkpoint"):
        load_checkpoint(str(path))


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    foreign = tmp_path / "foreign.pt"
    buf = io.BytesIO()
    torch.save({"state_dict": {}}, buf)
    foreign.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="not an archive-segmenter checkpoint"):
        load_checkpoint(str(foreign))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(str(garbage))


def test_builder_validates_arguments():
    with pytest.raises(ValueError, match="weights"):
        build_maskrcnn(weights="imagenet")
    with pytest.raises(ValueError, match="min_size"):
        build_maskrcnn(min_size=500, max_size=100)
    with pytest.raises(ValueError, match="91-class"):
        build_maskrcnn(weights="DEFAULT", num_classes=5)


def test_random_init_is_reproducible():
    a = build_maskrcnn(num_classes=3, weights="none", min_size=128, max_size=192).state_dict()
    b = build_maskrcnn(num_classes=3, weights="none", min_size=128, max_size=192).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_light_backbone_round_trips_through_checkpoint(tmp_path):
    model = build_maskrcnn(
        num_classes=3, weights="none", min_size=96, max_size=128, architecture="maskrcnn_resnet18_fpn"
    )
    path = tmp_path / "r18.pt"
    save_checkpoint(
        str(path),
        model_state=model.state_dict(),
        arch={"name": "maskrcnn_resnet18_fpn", "num_classes": 3, "min_size": 96, "max_size": 128},
        class_names=CLASSES,
    )
    spec = resolve_spec(str(path))
    assert spec.architecture == "maskrcnn_resnet18_fpn"
    rebuilt = load_model(spec)
    n = sum(p.numel() for p in rebuilt.parameters())
    assert n < 0.8 * sum(p.numel() for p in build_maskrcnn(num_classes=3).parameters())
    with torch.inference_mode():
        out = rebuilt([torch.rand(3, 64, 80)])[0]
    assert out["masks"].shape[-2:] == (64, 80)
    bad = tmp_path / "bad.pt"
    save_checkpoint(
        str(bad),
        model_state={},
        arch={"name": "maskrcnn_vit_fpn", "num_classes": 3},
        class_names=CLASSES,
    )
    with pytest.raises(CheckpointError, match="maskrcnn_vit_fpn"):
        resolve_spec(str(bad))


def test_narrow_heads_round_trip_through_checkpoint(tmp_path):
    """Head widths are part of the architecture: recorded in the checkpoint and rebuilt from it, outputs identical."""
    model = build_maskrcnn(
        num_classes=3,
        weights="none",
        min_size=96,
        max_size=128,
        architecture="maskrcnn_resnet18_fpn",
        fpn_channels=32,
        box_head_size=64,
    ).eval()
    assert model.backbone.out_channels == 32
    assert model.roi_heads.box_head.fc7.out_features == 64
    assert model.roi_heads.mask_predictor.conv5_mask.out_channels == 32
    path = tmp_path / "narrow.pt"
    arch = {"name": "maskrcnn_resnet18_fpn", "num_classes": 3, "min_size": 96, "max_size": 128}
    save_checkpoint(
        str(path),
        model_state=model.state_dict(),
        arch={**arch, "fpn_channels": 32, "box_head_size": 64},
        class_names=CLASSES,
    )
    spec = resolve_spec(str(path))
    assert (spec.fpn_channels, spec.box_head_size) == (32, 64)
    rebuilt = load_model(spec, box_score_thresh=0.0)
    model.roi_heads.score_thresh = 0.0
    image = torch.rand(3, 64, 80)
    with torch.inference_mode():
        a, b = model([image])[0], rebuilt([image])[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])
    # Written without the widths (an older checkpoint): rebuilt at torchvision's, so loading fails loudly.
    save_checkpoint(str(tmp_path / "old.pt"), model_state=model.state_dict(), arch=arch, class_names=CLASSES)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_model(resolve_spec(str(tmp_path / "old.pt")))
    with pytest.raises(ValueError, match="DEFAULT"):
        build_maskrcnn(weights="DEFAULT", fpn_channels=64)


def test_rpn_proposals_and_anchor_sizes_travel_in_the_checkpoint(tmp_path):
    """Fewer RPN proposals and other anchor sizes change no weights' shapes: they reach torchvision's RPN, and what
    the training wrote into the checkpoint is what the segment job's rebuilt model uses (identical outputs)."""
    anchors = (16, 32, 64, 128, 256)
    model = build_maskrcnn(
        num_classes=3,
        weights="none",
        min_size=96,
        max_size=128,
        rpn_proposals_train=300,
        rpn_proposals_test=50,
        anchor_sizes=anchors,
    ).eval()
    rpn = model.rpn
    assert rpn._pre_nms_top_n == {"training": 300, "testing": 50} == rpn._post_nms_top_n
    assert rpn.anchor_generator.sizes == tuple((a,) for a in anchors)
    default = build_maskrcnn(num_classes=3, weights="none", min_size=96, max_size=128).rpn
    assert default._post_nms_top_n == {"training": 2000, "testing": 1000}  # torchvision's
    assert default.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    path = tmp_path / "rpn.pt"
    arch = {"name": "maskrcnn_resnet50_fpn", "num_classes": 3, "min_size": 96, "max_size": 128}
    save_checkpoint(
        str(path),
        model_state=model.state_dict(),
        arch={**arch, "rpn_proposals_test": 50, "anchor_sizes": list(anchors)},
        class_names=CLASSES,
    )
    spec = resolve_spec(str(path))
    assert (spec.rpn_proposals, spec.anchor_sizes) == (50, anchors)
    rebuilt = load_model(spec, box_score_thresh=0.0)
    model.roi_heads.score_thresh = 0.0
    image = torch.rand(3, 96, 120)
    with torch.inference_mode():
        proposals, _ = rebuilt.rpn(*_rpn_inputs(rebuilt, image))
        a, b = model([image])[0], rebuilt([image])[0]
    assert len(proposals[0]) <= 50
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])
    # An older checkpoint without them: torchvision's.
    save_checkpoint(str(tmp_path / "old.pt"), model_state=model.state_dict(), arch=arch, class_names=CLASSES)
    old = resolve_spec(str(tmp_path / "old.pt"))
    assert (old.rpn_proposals, old.anchor_sizes) == (1000, (32, 64, 128, 256, 512))
    with pytest.raises(ValueError, match="rpn_proposals"):
        build_maskrcnn(weights="none", rpn_proposals_test=0)
    with pytest.raises(ValueError, match="anchor_sizes"):
        build_maskrcnn(weights="none", anchor_sizes=(16, 32))


def _rpn_inputs(model, image):
    images, _ = model.transform([image])
    return images, model.backbone(images.tensors)
