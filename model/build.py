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
# torchvision's widths: FPN/RPN/mask-head channels and the box head's MLP size. Narrower heads are what make CPU
# training affordable: at 256 channels the four 3x3 mask-head convs alone cost ~0.9 GFLOP per positive RoI.
FPN_CHANNELS = 256
BOX_HEAD_SIZE = 1024
# torchvision's RPN proposals kept per image (top-k per FPN level before NMS, and after it): 2,000 while training,
# 1,000 at inference. Images with a handful of objects need far fewer; fewer proposals cut the RPN's NMS and the box
# head's work (BENCHMARKS.md, "How the demo was chosen"). They change no weights, so any count loads any checkpoint.
RPN_PROPOSALS_TRAIN = 2000
RPN_PROPOSALS_TEST = 1000
# torchvision's anchor size per FPN level (P2..P6), 3 aspect ratios each: for objects of ~32 to ~512 pixels at the
# model's input size. Smaller inputs or objects want smaller anchors; the count per level is unchanged, so any sizes
# load any checkpoint's weights, but the sizes a model learned with are part of it (recorded in checkpoints).
ANCHOR_SIZES = (32, 64, 128, 256, 512)
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
    fpn_channels: int = FPN_CHANNELS,
    box_head_size: int = BOX_HEAD_SIZE,
    rpn_proposals_train: int = RPN_PROPOSALS_TRAIN,
    rpn_proposals_test: int = RPN_PROPOSALS_TEST,
    anchor_sizes: tuple[int, ...] = ANCHOR_SIZES,
) -> nn.Module:
    """Build `maskrcnn_<backbone>_fpn` (default torchvision's `maskrcnn_resnet50_fpn`) with the given initialisation (`"DEFAULT"`, `"backbone"` or `"none"`).

    `min_size` as a tuple means multi-scale training: torchvision's transform draws one short side per image in
    train mode (and uses the last one in eval mode). `box_batch_size_per_image`/`box_positive_fraction` are the
    paper's RoI sampling (512 per image, 25% positives). BatchNorm is frozen whenever pretrained weights are loaded
    (`DEFAULT`, `backbone`), as torchvision does; from scratch it trains. `fpn_channels` sets the width of the FPN,
    the RPN head and the mask head (torchvision: 256), `box_head_size` the box head's two-layer MLP (1024); other
    values change the architecture (recorded in checkpoints), so `DEFAULT` weights need the torchvision widths.
    `rpn_proposals_train`/`_test` set the RPN's proposals per image (torchvision's pre- and post-NMS top-k);
    `anchor_sizes` the RPN's anchor size on each of the five FPN levels (three aspect ratios each, as torchvision).
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
        rpn_pre_nms_top_n_train=rpn_proposals_train,
        rpn_post_nms_top_n_train=rpn_proposals_train,
        rpn_pre_nms_top_n_test=rpn_proposals_test,
        rpn_post_nms_top_n_test=rpn_proposals_test,
    )
    if min(rpn_proposals_train, rpn_proposals_test) < 1:
        raise ValueError(
            f"need rpn_proposals_train and rpn_proposals_test >= 1, got {rpn_proposals_train}, {rpn_proposals_test}"
        )
    anchor_sizes = tuple(int(a) for a in anchor_sizes)
    if len(anchor_sizes) != len(ANCHOR_SIZES) or min(anchor_sizes) < 1:
        raise ValueError(
            f"anchor_sizes: one positive size per FPN level ({len(ANCHOR_SIZES)}), got {anchor_sizes}"
        )
    if anchor_sizes != ANCHOR_SIZES:
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        kwargs["rpn_anchor_generator"] = AnchorGenerator(
            sizes=tuple((a,) for a in anchor_sizes), aspect_ratios=((0.5, 1.0, 2.0),) * len(anchor_sizes)
        )
    if fpn_channels < 8 or box_head_size < 8:
        raise ValueError(
            f"need fpn_channels >= 8 and box_head_size >= 8, got {fpn_channels}, {box_head_size}"
        )
    if backbone != "resnet50" or (fpn_channels, box_head_size) != (FPN_CHANNELS, BOX_HEAD_SIZE):
        return _build_custom(
            backbone,
            num_classes=num_classes,
            weights=weights,
            kwargs=kwargs,
            trainable_backbone_layers=trainable_backbone_layers,
            fpn_channels=fpn_channels,
            box_head_size=box_head_size,
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


def _build_custom(
    backbone: str,
    *,
    num_classes: int,
    weights: str,
    kwargs: dict,
    trainable_backbone_layers: int | None,
    fpn_channels: int,
    box_head_size: int,
) -> nn.Module:
    """Mask R-CNN on a ResNet FPN with torchvision's head designs at chosen widths (same I/O, same state-dict keys
    as `maskrcnn_resnet50_fpn` when the widths are torchvision's)."""
    from torchvision import models
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import misc as misc_nn_ops
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    if weights == "DEFAULT":
        raise ValueError(
            "weights='DEFAULT' exists only for resnet50 at torchvision's widths "
            f"(fpn_channels={FPN_CHANNELS}, box_head_size={BOX_HEAD_SIZE}); use 'backbone' or 'none'"
        )
    pretrained = weights == "backbone"
    enum = {
        "resnet18": models.ResNet18_Weights,
        "resnet34": models.ResNet34_Weights,
        "resnet50": models.ResNet50_Weights,
    }[backbone]
    # As torchvision does for R50: frozen BatchNorm under pretrained weights, trainable BatchNorm from scratch.
    norm = misc_nn_ops.FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    layers = trainable_backbone_layers if trainable_backbone_layers is not None else (3 if pretrained else 5)
    if not 0 <= layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be in [0, 5], got {layers}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        body = getattr(models, backbone)(weights=enum.IMAGENET1K_V1 if pretrained else None, norm_layer=norm)
        # What torchvision's `_resnet_fpn_extractor` does, with the FPN width as a parameter.
        trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:layers] + (
            ["bn1"] if layers == 5 else []
        )
        for name, param in body.named_parameters():
            if not any(name.startswith(t) for t in trainable):
                param.requires_grad_(False)
        stage2 = body.inplanes // 8
        fpn = BackboneWithFPN(
            body,
            {f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)},
            [stage2 * 2 ** (k - 1) for k in (1, 2, 3, 4)],
            fpn_channels,
            extra_blocks=LastLevelMaxPool(),
        )
        c = fpn_channels
        return MaskRCNN(
            fpn,
            num_classes=None,  # given through the predictors below
            box_head=TwoMLPHead(c * 7 * 7, box_head_size),  # 7x7 RoIAlign output, as torchvision
            box_predictor=FastRCNNPredictor(box_head_size, num_classes),
            mask_head=MaskRCNNHeads(c, (c, c, c, c), 1),
            mask_predictor=MaskRCNNPredictor(c, c, num_classes),
            **kwargs,
        )


def replace_heads(model: nn.Module, *, num_classes: int) -> nn.Module:
    """New box and mask predictors for `num_classes` (background included), keeping everything else: how COCO
    weights are fine-tuned on another dataset."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    heads = model.roi_heads
    heads.box_predictor = FastRCNNPredictor(heads.box_predictor.cls_score.in_features, num_classes)
    conv5 = heads.mask_predictor.conv5_mask
    heads.mask_predictor = MaskRCNNPredictor(conv5.in_channels, conv5.out_channels, num_classes)
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
    fpn_channels: int = FPN_CHANNELS
    box_head_size: int = BOX_HEAD_SIZE
    rpn_proposals: int = RPN_PROPOSALS_TEST  # at inference
    anchor_sizes: tuple[int, ...] = ANCHOR_SIZES


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
        fpn_channels=int(arch.get("fpn_channels", FPN_CHANNELS)),
        box_head_size=int(arch.get("box_head_size", BOX_HEAD_SIZE)),
        rpn_proposals=int(arch.get("rpn_proposals_test", RPN_PROPOSALS_TEST)),
        anchor_sizes=tuple(int(a) for a in arch.get("anchor_sizes", ANCHOR_SIZES)),
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
        fpn_channels=spec.fpn_channels,
        box_head_size=spec.box_head_size,
        rpn_proposals_test=spec.rpn_proposals,
        anchor_sizes=spec.anchor_sizes,
    )
    if spec.weights in ("DEFAULT", "none"):
        return build_maskrcnn(num_classes=len(spec.class_names), weights=spec.weights, **common).eval()
    loaded = ckpt.load_checkpoint(spec.weights, storage_options=storage_options)
    model = build_maskrcnn(num_classes=len(loaded.class_names), weights="none", **common)
    model.load_state_dict(loaded.model_state)
    return model.eval()
