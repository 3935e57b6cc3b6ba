"""Builders for torchvision's Mask R-CNN, keyword-only, returning a plain `nn.Module`.

I/O contract of the returned model (torchvision's, unchanged):
- eval mode input: a list of float tensors `[3, H, W]`, RGB, values in 0–1, any sizes (resized inside so the short
  side is `min_size`, long side capped at `max_size`, then mapped back: outputs are in input-image pixels).
- eval mode output: one dict per image: `boxes [N, 4]` float xyxy, `labels [N]` int64 (0 is background, never
  returned), `scores [N]` float sorted descending, `masks [N, 1, H, W]` soft masks in 0–1 (threshold at 0.5).

`architecture` is a name from `model.architectures` (default `maskrcnn_resnet50_fpn`, torchvision's; also its
`maskrcnn_resnet50_fpn_v2` and lighter ResNet-18/34 variants), the same for training and inference.

`weights` selects the initialisation:
- `"DEFAULT"`: torchvision's COCO weights of the architecture (downloaded on first use into the torch hub cache,
  `$TORCH_HOME/hub/checkpoints/`; needs internet or a warm cache).
- `"backbone"`: the ImageNet ResNet only (downloaded), new heads; what training from scratch on a new dataset
  usually wants.
- `"none"`: random initialisation (tests, offline machines). Seeded, so every actor builds the same model.
- anything else: a checkpoint URL (local path or fsspec URL) written by `save_checkpoint`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from model import architectures
from model import checkpoint as ckpt
from model.architectures import ARCHITECTURE_NAMES, DEFAULT_ARCHITECTURE, WITH_COCO_WEIGHTS
from model.labels import COCO_CATEGORIES

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
    architecture: str = DEFAULT_ARCHITECTURE,
    num_classes: int = 91,
    weights: str = "none",
    min_size: int | tuple[int, ...] = 800,
    max_size: int = 1333,
    box_score_thresh: float = 0.05,
    box_detections_per_img: int = 100,
    trainable_backbone_layers: int | None = None,
    box_batch_size_per_image: int = 512,
    box_positive_fraction: float = 0.25,
    fpn_channels: int = FPN_CHANNELS,
    box_head_size: int = BOX_HEAD_SIZE,
    rpn_proposals_train: int = RPN_PROPOSALS_TRAIN,
    rpn_proposals_test: int = RPN_PROPOSALS_TEST,
    anchor_sizes: tuple[int, ...] = ANCHOR_SIZES,
) -> nn.Module:
    """Build `architecture` (a name from `model.architectures`) with the given initialisation (`"DEFAULT"`,
    `"backbone"` or `"none"`).

    `min_size` as a tuple means multi-scale training: torchvision's transform draws one short side per image in
    train mode (and uses the last one in eval mode). `box_batch_size_per_image`/`box_positive_fraction` are the
    paper's RoI sampling (512 per image, 25% positives). v1 heads: BatchNorm is frozen whenever pretrained weights
    are loaded (`DEFAULT`, `backbone`), as torchvision does; from scratch it trains. v2 trains BatchNorm always, as
    torchvision's v2. `fpn_channels` sets the width of the FPN, the RPN head, the mask head (and v2's box-head
    convs) (torchvision: 256), `box_head_size` the box head's fully connected width (1024); other values change
    the architecture (recorded in checkpoints), so `DEFAULT` weights need the torchvision widths.
    `rpn_proposals_train`/`_test` set the RPN's proposals per image (torchvision's pre- and post-NMS top-k);
    `anchor_sizes` the RPN's anchor size on each of the five FPN levels (three aspect ratios each, as torchvision).
    Checkpoint URLs are handled by `load_model`, which reads the architecture stored in the checkpoint first.
    """
    from torchvision.models import get_model, get_weight

    if weights not in BUILTIN_WEIGHTS:
        raise ValueError(f"weights must be one of {BUILTIN_WEIGHTS}, got {weights!r}")
    arch = architectures.get(architecture)
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
    if fpn_channels < 8 or box_head_size < 8:
        raise ValueError(
            f"need fpn_channels >= 8 and box_head_size >= 8, got {fpn_channels}, {box_head_size}"
        )
    if arch.builder is None or (fpn_channels, box_head_size) != (FPN_CHANNELS, BOX_HEAD_SIZE):
        model = _build_custom(
            arch,
            num_classes=num_classes,
            weights=weights,
            kwargs=kwargs,
            trainable_backbone_layers=trainable_backbone_layers,
            fpn_channels=fpn_channels,
            box_head_size=box_head_size,
        )
    elif weights == "DEFAULT":
        if num_classes != 91:
            raise ValueError(
                "weights='DEFAULT' is the 91-class COCO head; use 'backbone' for another class count"
            )
        model = get_model(arch.builder, weights=get_weight(arch.coco_weights), **kwargs)
    elif weights == "backbone":
        model = get_model(
            arch.builder,
            weights=None,
            weights_backbone=get_weight(arch.backbone_weights),
            num_classes=num_classes,
            trainable_backbone_layers=trainable_backbone_layers,
            **kwargs,
        )
    else:
        # Random init: fork the RNG so seeding here does not disturb the caller's random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = get_model(
                arch.builder, weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
            )
    if anchor_sizes != ANCHOR_SIZES:
        # Set after building: torchvision's v2 builder passes its own generator. Anchors hold no weights, and the
        # count per location (3) is unchanged, so the RPN head fits either way.
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        model.rpn.anchor_generator = AnchorGenerator(
            sizes=tuple((a,) for a in anchor_sizes), aspect_ratios=((0.5, 1.0, 2.0),) * len(anchor_sizes)
        )
    return model


def _build_custom(
    arch: architectures.Architecture,
    *,
    num_classes: int,
    weights: str,
    kwargs: dict,
    trainable_backbone_layers: int | None,
    fpn_channels: int,
    box_head_size: int,
) -> nn.Module:
    """Mask R-CNN on a ResNet FPN with torchvision's head designs (v1 or v2) at chosen widths (same I/O, same
    state-dict keys as torchvision's builder when the backbone and widths are torchvision's)."""
    from torchvision.models import get_model, get_weight
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import misc as misc_nn_ops
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    if weights == "DEFAULT":
        raise ValueError(
            f"weights='DEFAULT' exists only for {', '.join(WITH_COCO_WEIGHTS)} at torchvision's widths "
            f"(fpn_channels={FPN_CHANNELS}, box_head_size={BOX_HEAD_SIZE}); use 'backbone' or 'none'"
        )
    pretrained = weights == "backbone"
    v2 = arch.heads == "v2"
    # As torchvision does: v1 freezes BatchNorm under pretrained weights and trains it from scratch; v2 always
    # trains it, and adds BatchNorm to the FPN and the heads.
    norm = nn.BatchNorm2d if v2 or not pretrained else misc_nn_ops.FrozenBatchNorm2d
    layers = trainable_backbone_layers if trainable_backbone_layers is not None else (3 if pretrained else 5)
    if not 0 <= layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be in [0, 5], got {layers}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        body = get_model(
            arch.backbone, weights=get_weight(arch.backbone_weights) if pretrained else None, norm_layer=norm
        )
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
            norm_layer=nn.BatchNorm2d if v2 else None,
        )
        c = fpn_channels
        # Built in this order (box head, box predictor, mask head, mask predictor; the RPN head last, as MaskRCNN
        # does when given none): the order the seeded random init draws in, kept so v1's stays what it was.
        box_head = (
            FastRCNNConvFCHead((c, 7, 7), [c] * 4, [box_head_size], norm_layer=nn.BatchNorm2d)
            if v2  # torchvision's maskrcnn_resnet50_fpn_v2 heads, at width c
            else TwoMLPHead(c * 7 * 7, box_head_size)  # 7x7 RoIAlign output, as torchvision
        )
        box_predictor = FastRCNNPredictor(box_head_size, num_classes)
        mask_head = MaskRCNNHeads(c, [c] * 4, 1, norm_layer=nn.BatchNorm2d if v2 else None)
        mask_predictor = MaskRCNNPredictor(c, c, num_classes)
        return MaskRCNN(
            fpn,
            num_classes=None,  # given through the predictors
            box_head=box_head,
            box_predictor=box_predictor,
            mask_head=mask_head,
            mask_predictor=mask_predictor,
            rpn_head=RPNHead(c, 3, conv_depth=2 if v2 else 1),
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
    architecture: str = DEFAULT_ARCHITECTURE  # a name from model.architectures
    fpn_channels: int = FPN_CHANNELS
    box_head_size: int = BOX_HEAD_SIZE
    rpn_proposals: int = RPN_PROPOSALS_TEST  # at inference
    anchor_sizes: tuple[int, ...] = ANCHOR_SIZES


def resolve_spec(
    weights: str,
    *,
    architecture: str | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    storage_options: dict | None = None,
) -> ModelSpec:
    """Resolve `weights` without building the model: architecture, class names, sizes and an id.

    `architecture` None means "the checkpoint's own" (`DEFAULT_ARCHITECTURE` for built-in weights); given with a
    checkpoint it must be the one the checkpoint records. `min_size`/`max_size` of None mean "the checkpoint's own"
    (torchvision's 800/1333 for built-in weights). A checkpoint is read (and validated) here, so a bad URL fails
    before any work starts. ValueError for an unknown architecture or one without COCO weights under `DEFAULT`.

    Model ids, written next to every result row and part of an output's fingerprint (see `model.architectures.
    architecture_of_model_id`): `torchvision:<COCO weights>`, `random-init:<architecture>:seed0`,
    `checkpoint:<architecture>:<sha256[:16]>`; checkpoints written before ids named the architecture (no
    `arch["schema"]`) keep their `checkpoint:<sha256[:16]>`, so outputs made with them resume.
    """
    if weights in ("DEFAULT", "none"):
        arch = architectures.get(architecture or DEFAULT_ARCHITECTURE)
        if weights == "DEFAULT" and not arch.coco_weights:
            raise ValueError(
                f"weights DEFAULT: torchvision has COCO weights for {', '.join(WITH_COCO_WEIGHTS)}, not {arch.name}"
            )
        return ModelSpec(
            weights=weights,
            model_id=(
                f"torchvision:{arch.coco_weights}"
                if weights == "DEFAULT"
                else f"random-init:{arch.name}:seed{RANDOM_INIT_SEED}"
            ),
            class_names=tuple(COCO_CATEGORIES),
            min_size=min_size or 800,
            max_size=max_size or 1333,
            architecture=arch.name,
        )
    header = ckpt.load_checkpoint(weights, storage_options=storage_options, with_state=False)
    arch = header.arch
    name = str(arch.get("name", DEFAULT_ARCHITECTURE))
    if name not in ARCHITECTURE_NAMES:
        raise ckpt.CheckpointError(
            f"checkpoint {weights} is a {name!r}; this build knows {', '.join(ARCHITECTURE_NAMES)}"
        )
    if architecture and architecture != name:
        raise ckpt.CheckpointError(f"checkpoint {weights} is a {name}, not the {architecture} asked for")
    digest = header.digest[:16]
    return ModelSpec(
        weights=weights,
        model_id=f"checkpoint:{name}:{digest}" if "schema" in arch else f"checkpoint:{digest}",
        class_names=tuple(header.class_names),
        min_size=min_size or int(arch.get("min_size", 800)),
        max_size=max_size or int(arch.get("max_size", 1333)),
        architecture=name,
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
        architecture=spec.architecture,
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
