"""Builders for torchvision's Mask R-CNN, keyword-only, returning a plain `nn.Module`.

I/O contract of the returned model (torchvision's, unchanged):
- eval mode input: a list of float tensors `[3, H, W]`, RGB, values in 0–1, any sizes (resized inside so the short
  side is `min_size`, long side capped at `max_size`, then mapped back: outputs are in input-image pixels).
- eval mode output: one dict per image: `boxes [N, 4]` float xyxy, `labels [N]` int64 (0 is background, never
  returned), `scores [N]` float sorted descending, `masks [N, 1, H, W]` soft masks in 0–1 (threshold at 0.5).

`weights` selects the initialisation:
- `"DEFAULT"`: torchvision's COCO weights (downloaded on first use; needs internet or a warm torch hub cache).
- `"backbone"`: ImageNet ResNet-50 backbone only (downloaded), new heads; what training from scratch on a new
  dataset usually wants.
- `"none"`: random initialisation (tests, offline machines). Seeded, so every actor builds the same model.
- anything else: a checkpoint URL (local path or fsspec URL) written by `save_checkpoint`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from model import checkpoint as ckpt
from model.labels import COCO_CATEGORIES

BACKBONES = ("resnet50", "resnet34", "resnet18")
# The default stays torchvision's R50-FPN; the lighter ResNets are for CPU-sized training (same heads, same I/O).
ARCHITECTURES = tuple(f"maskrcnn_{b}_fpn" for b in BACKBONES)


def architecture_name(backbone: str) -> str:
    return f"maskrcnn_{backbone}_fpn"


def backbone_of(architecture: str) -> str:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; this build knows {ARCHITECTURES}")
    return architecture[len("maskrcnn_") : -len("_fpn")]


BUILTIN_WEIGHTS = ("DEFAULT", "backbone", "none")
# The seed that makes `weights="none"` reproducible across processes: every inference actor must hold the same model.
RANDOM_INIT_SEED = 0


def build_maskrcnn(
    *,
    num_classes: int = 91,
    weights: str = "none",
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    box_score_thresh: float = 0.05,
    box_detections_per_img: int = 100,
    trainable_backbone_layers: int | None = None,
    box_batch_size_per_image: int = 512,
    box_positive_fraction: float = 0.25,
    backbone: str = "resnet50",
) -> nn.Module:
    """Build `maskrcnn_<backbone>_fpn` (default torchvision's `maskrcnn_resnet50_fpn`) with the given initialisation (`"DEFAULT"`, `"backbone"` or `"none"`).

    `min_size` as a tuple means multi-scale training: torchvision's transform draws one short side per image in
    train mode (and uses the last one in eval mode). `box_batch_size_per_image`/`box_positive_fraction` are the
    paper's RoI sampling (512 per image, 25% positives). BatchNorm is frozen whenever pretrained weights are loaded
    (`DEFAULT`, `backbone`), as torchvision does; from scratch it trains.
    Checkpoint URLs are handled by `load_model`, which reads the architecture stored in the checkpoint first.
    """
    from torchvision.models import ResNet50_Weights
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights, maskrcnn_resnet50_fpn

    if weights not in BUILTIN_WEIGHTS:
        raise ValueError(f"weights must be one of {BUILTIN_WEIGHTS}, got {weights!r}")
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    sizes = tuple(min_size) if isinstance(min_size, (tuple, list)) else (min_size,)
    if not sizes or min(sizes) <= 0 or max_size < max(sizes):
        raise ValueError(f"need 0 < min_size <= max_size, got min_size={min_size} max_size={max_size}")
    if not 0.0 <= box_score_thresh <= 1.0:
        raise ValueError(f"box_score_thresh must be in [0, 1], got {box_score_thresh}")
    kwargs: dict[str, Any] = dict(
        min_size=sizes if len(sizes) > 1 else sizes[0],
        max_size=max_size,
        box_score_thresh=box_score_thresh,
        box_detections_per_img=box_detections_per_img,
        box_batch_size_per_image=box_batch_size_per_image,
        box_positive_fraction=box_positive_fraction,
    )
    if backbone != "resnet50":
        return _build_light(
            backbone,
            num_classes=num_classes,
            weights=weights,
            kwargs=kwargs,
            trainable_backbone_layers=trainable_backbone_layers,
        )
    if weights == "DEFAULT":
        if num_classes != 91:
            raise ValueError(
                "weights='DEFAULT' is the 91-class COCO head; use 'backbone' for another class count"
            )
        return maskrcnn_resnet50_fpn(weights=MaskRCNN_ResNet50_FPN_Weights.DEFAULT, **kwargs)
    if weights == "backbone":
        return maskrcnn_resnet50_fpn(
            weights=None,
            weights_backbone=ResNet50_Weights.IMAGENET1K_V1,
            num_classes=num_classes,
            trainable_backbone_layers=trainable_backbone_layers,
            **kwargs,
        )
    # Random init: fork the RNG so seeding here does not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)


def _build_light(
    backbone: str, *, num_classes: int, weights: str, kwargs: dict, trainable_backbone_layers: int | None
) -> nn.Module:
    """Mask R-CNN on a ResNet-18/34 FPN: torchvision's heads, a backbone several times cheaper."""
    from torchvision import models
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc as misc_nn_ops

    if weights == "DEFAULT":
        raise ValueError(
            f"weights='DEFAULT' exists only for resnet50; use 'backbone' or 'none' with {backbone}"
        )
    pretrained = weights == "backbone"
    enum = {"resnet18": models.ResNet18_Weights, "resnet34": models.ResNet34_Weights}[backbone]
    # As torchvision does for R50: frozen BatchNorm under pretrained weights, trainable BatchNorm from scratch.
    norm = misc_nn_ops.FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    layers = trainable_backbone_layers if trainable_backbone_layers is not None else (3 if pretrained else 5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        body = getattr(models, backbone)(weights=enum.IMAGENET1K_V1 if pretrained else None, norm_layer=norm)
        return MaskRCNN(_resnet_fpn_extractor(body, layers), num_classes=num_classes, **kwargs)


def replace_heads(model: nn.Module, *, num_classes: int) -> nn.Module:
    """New box and mask predictors for `num_classes` (background included), keeping everything else: how COCO
    weights are fine-tuned on another dataset."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    heads = model.roi_heads
    heads.box_predictor = FastRCNNPredictor(heads.box_predictor.cls_score.in_features, num_classes)
    heads.mask_predictor = MaskRCNNPredictor(heads.mask_predictor.conv5_mask.in_channels, 256, num_classes)
    return model


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a resolved `weights` value means: enough to rebuild the model and to name it in outputs."""

    weights: str  # "DEFAULT" | "none" | checkpoint URL
    model_id: str  # stable identifier written next to every result row
    class_names: tuple[str, ...]  # index = label; index 0 is "__background__"
    min_size: int
    max_size: int
    architecture: str = "maskrcnn_resnet50_fpn"


def resolve_spec(
    weights: str,
    *,
    min_size: int | None = None,
    max_size: int | None = None,
    storage_options: dict | None = None,
) -> ModelSpec:
    """Resolve `weights` without building the model: class names, sizes and an id.

    `min_size`/`max_size` of None mean "the checkpoint's own" (torchvision's 800/1333 for built-in weights).
    A checkpoint is read (and validated) here, so a bad URL fails before any work starts.
    """
    if weights in ("DEFAULT", "none"):
        model_id = (
            "torchvision:MaskRCNN_ResNet50_FPN_Weights.COCO_V1"
            if weights == "DEFAULT"
            else f"random-init:maskrcnn_resnet50_fpn:seed{RANDOM_INIT_SEED}"
        )
        return ModelSpec(
            weights=weights,
            model_id=model_id,
            class_names=tuple(COCO_CATEGORIES),
            min_size=min_size or 800,
            max_size=max_size or 1333,
        )
    header = ckpt.load_checkpoint(weights, storage_options=storage_options, with_state=False)
    arch = header.arch
    if arch.get("name", "maskrcnn_resnet50_fpn") not in ARCHITECTURES:
        raise ckpt.CheckpointError(
            f"checkpoint {weights} is a {arch.get('name')!r}; this build knows {', '.join(ARCHITECTURES)}"
        )
    return ModelSpec(
        weights=weights,
        model_id=f"checkpoint:{header.digest[:16]}",
        class_names=tuple(header.class_names),
        min_size=min_size or int(arch.get("min_size", 800)),
        max_size=max_size or int(arch.get("max_size", 1333)),
        architecture=str(arch.get("name", "maskrcnn_resnet50_fpn")),
    )


def load_model(
    spec: ModelSpec,
    *,
    box_score_thresh: float = 0.05,
    box_detections_per_img: int = 100,
    storage_options: dict | None = None,
) -> nn.Module:
    """Build the model a `ModelSpec` describes, weights loaded, in eval mode, on the CPU."""
    common = dict(
        backbone=backbone_of(spec.architecture),
        min_size=spec.min_size,
        max_size=spec.max_size,
        box_score_thresh=box_score_thresh,
        box_detections_per_img=box_detections_per_img,
    )
    if spec.weights in ("DEFAULT", "none"):
        return build_maskrcnn(num_classes=len(spec.class_names), weights=spec.weights, **common).eval()
    loaded = ckpt.load_checkpoint(spec.weights, storage_options=storage_options)
    model = build_maskrcnn(num_classes=len(loaded.class_names), weights="none", **common)
    model.load_state_dict(loaded.model_state)
    return model.eval()
