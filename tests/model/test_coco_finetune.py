"""Fine-tuning from `weights: DEFAULT`, offline: torchvision's COCO weights come from the torch hub cache (a state
dict of the right shapes planted there, tests/support/hub.py), the predictors are replaced for the dataset's classes,
one step trains, and the checkpoint it writes rebuilds the same model for the segment job. Both architectures with
COCO weights, at torchvision's widths."""

import math
import os

import pytest
import torch

from model.architectures import WITH_COCO_WEIGHTS
from model.build import load_model, resolve_spec
from model.checkpoint import save_checkpoint
from model.train_loop import build_for_training, checkpoint_arch, make_optimizer
from tests.support.hub import PROBE

CLASSES = ["__background__", "circle", "square"]


def loop_config(architecture: str) -> dict:
    """The keys of `pipeline.train.run.loop_config` that building and checkpointing the model read."""
    return {
        "weights": "DEFAULT",
        "architecture": architecture,
        "weights_storage_options": {},
        "min_size": [64],
        "max_size": 96,
        "eval_min_size": 64,
        "trainable_backbone_layers": None,
        "rois_per_image": 8,  # at torchvision's widths every RoI costs ~0.5 GFLOP in the heads
        "positive_fraction": 0.25,
        "rpn_proposals_train": 50,
        "rpn_proposals_test": 50,
    }


def sample(*, label: int) -> tuple[torch.Tensor, dict]:
    """A 64x80 image with one box-shaped instance of `label`."""
    image = torch.rand(3, 64, 80)
    mask = torch.zeros(1, 64, 80, dtype=torch.uint8)
    mask[0, 16:48, 20:60] = 1
    return image, {
        "boxes": torch.tensor([[20.0, 16.0, 60.0, 48.0]]),
        "labels": torch.tensor([label]),
        "masks": mask,
    }


def one_step(model, images, targets) -> torch.Tensor:
    """One SGD step in train mode; the summed loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, kind="sgd", lr=0.001, momentum=0.9, weight_decay=1e-4)
    loss = sum(model.train()(images, targets).values())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize("architecture", WITH_COCO_WEIGHTS)
def test_fine_tune_from_default_weights_trains_a_step_and_checkpoints(
    coco_hub, monkeypatch, tmp_path, architecture
):
    monkeypatch.setenv("TORCH_HOME", coco_hub.torch_home)
    config = loop_config(architecture)
    model = build_for_training(config, len(CLASSES))
    # The COCO weights, from the cache, with new predictors for the dataset's 3 classes.
    assert torch.equal(model.state_dict()[PROBE], coco_hub.probes[architecture])
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3

    image, target = sample(label=2)
    before = model.roi_heads.box_predictor.cls_score.weight.detach().clone()
    loss = one_step(model, [image], [target])
    assert math.isfinite(float(loss.detach())) and not torch.equal(
        before, model.roi_heads.box_predictor.cls_score.weight
    )

    path = tmp_path / "model.pt"
    save_checkpoint(
        str(path),
        model_state={k: v.detach() for k, v in model.state_dict().items()},
        arch=checkpoint_arch(config, len(CLASSES)),
        class_names=CLASSES,
    )
    spec = resolve_spec(str(path))
    assert spec.architecture == architecture and spec.model_id.startswith(f"checkpoint:{architecture}:")
    assert spec.class_names == tuple(CLASSES) and (spec.min_size, spec.rpn_proposals) == (64, 50)
    rebuilt = load_model(spec, box_score_thresh=0.0, box_detections_per_img=5)
    # The same weights, exactly. Outputs are compared with a tolerance: the trained v1 model holds frozen BatchNorm
    # (pretrained weights), the rebuilt one plain BatchNorm in eval mode, the same formula rounded in another order,
    # and boxes decoded from a one-step model's near-random deltas amplify that.
    loaded = rebuilt.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())
    model.eval().roi_heads.score_thresh, model.roi_heads.detections_per_img = 0.0, 5
    with torch.inference_mode():
        a, b = model([image])[0], rebuilt([image])[0]
    assert torch.allclose(a["boxes"], b["boxes"], atol=0.1) and torch.equal(a["labels"], b["labels"])


def test_v2_from_its_imagenet_backbone_trains_a_step(monkeypatch, tmp_path):
    """`weights: backbone` for v2: torchvision's ImageNet ResNet-50 from the hub cache (planted here, never
    downloaded) under new heads, all of v2's BatchNorm trainable; one step trains."""
    from torchvision.models import get_model

    from model import architectures
    from tests.support.hub import cache_path

    arch = architectures.get("maskrcnn_resnet50_fpn_v2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        resnet = get_model(arch.backbone, weights=None)
    path = cache_path(str(tmp_path), arch.backbone_weights)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(resnet.state_dict(), path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    config = {**loop_config(arch.name), "weights": "backbone"}
    model = build_for_training(config, len(CLASSES))
    assert torch.equal(model.backbone.body.conv1.weight, resnet.conv1.weight)  # the cached ImageNet weights
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    image, target = sample(label=1)
    loss = one_step(model, [image, image.flip(-1)], [target, target])
    assert math.isfinite(float(loss.detach()))
