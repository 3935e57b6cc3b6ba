"""The Mask R-CNN architectures this build knows, by name: one table, read by the builder, both jobs' configs and the
checkpoints (which record the name in `arch["name"]`).

| name                       | torchvision builder        | `DEFAULT` (COCO)                       | `backbone` (ImageNet)          |
|----------------------------|----------------------------|----------------------------------------|--------------------------------|
| `maskrcnn_resnet50_fpn`    | `maskrcnn_resnet50_fpn`    | `MaskRCNN_ResNet50_FPN_Weights.COCO_V1`   | `ResNet50_Weights.IMAGENET1K_V1` |
| `maskrcnn_resnet50_fpn_v2` | `maskrcnn_resnet50_fpn_v2` | `MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1` | `ResNet50_Weights.IMAGENET1K_V1` |
| `maskrcnn_resnet34_fpn`    | —                          | —                                      | `ResNet34_Weights.IMAGENET1K_V1` |
| `maskrcnn_resnet18_fpn`    | —                          | —                                      | `ResNet18_Weights.IMAGENET1K_V1` |

COCO box/mask AP (torchvision's model table): v1 37.9 / 34.6 at 134 GFLOPs, v2 47.4 / 41.8 at 334 GFLOPs. v2 is the
same Mask R-CNN with the heads of "Benchmarking Detection Transfer Learning with Vision Transformers" (BatchNorm
everywhere instead of frozen BatchNorm, a two-conv RPN head, a 4-conv + 1-fc box head, BatchNorm in the mask head).
The ResNet-18/34 entries have v1's heads and exist for CPU-sized training (with narrower heads: `fpn_channels`,
`box_head_size`).

Weights are named as strings (`torchvision.models.get_weight` resolves them) so that importing this table, as the
configs do, does not import torch.
"""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    backbone: str  # torchvision's ResNet builder: resnet50 | resnet34 | resnet18
    heads: Literal[
        "v1", "v2"
    ]  # v1: the paper's (torchvision's maskrcnn_resnet50_fpn); v2: maskrcnn_resnet50_fpn_v2's
    builder: str | None  # torchvision's builder of this architecture at its own widths; None: built here
    coco_weights: str | None  # what `weights: DEFAULT` loads; None: no COCO weights exist
    backbone_weights: str  # what `weights: backbone` loads into the ResNet


DEFAULT_ARCHITECTURE = "maskrcnn_resnet50_fpn"
ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            name="maskrcnn_resnet50_fpn",
            backbone="resnet50",
            heads="v1",
            builder="maskrcnn_resnet50_fpn",
            coco_weights="MaskRCNN_ResNet50_FPN_Weights.COCO_V1",
            backbone_weights="ResNet50_Weights.IMAGENET1K_V1",
        ),
        Architecture(
            name="maskrcnn_resnet50_fpn_v2",
            backbone="resnet50",
            heads="v2",
            builder="maskrcnn_resnet50_fpn_v2",
            coco_weights="MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1",
            backbone_weights="ResNet50_Weights.IMAGENET1K_V1",
        ),
        Architecture(
            name="maskrcnn_resnet34_fpn",
            backbone="resnet34",
            heads="v1",
            builder=None,
            coco_weights=None,
            backbone_weights="ResNet34_Weights.IMAGENET1K_V1",
        ),
        Architecture(
            name="maskrcnn_resnet18_fpn",
            backbone="resnet18",
            heads="v1",
            builder=None,
            coco_weights=None,
            backbone_weights="ResNet18_Weights.IMAGENET1K_V1",
        ),
    )
}
ARCHITECTURE_NAMES = tuple(ARCHITECTURES)
WITH_COCO_WEIGHTS = tuple(n for n, a in ARCHITECTURES.items() if a.coco_weights)


def get(name: str) -> Architecture:
    """The table's entry for `name`; ValueError naming the known ones otherwise."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; this build knows {', '.join(ARCHITECTURE_NAMES)}"
        ) from None


def for_backbone(backbone: str) -> str:
    """The architecture that the retired training key `model.backbone: <backbone>` meant (always v1 heads)."""
    name = f"maskrcnn_{backbone}_fpn"
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown backbone {backbone!r}")
    return name


def architecture_of_model_id(model_id: str) -> str | None:
    """The architecture a segment-job model id names, or None for ids that do not say (`checkpoint:<sha256[:16]>`
    of checkpoints written before ids named it).

    Forms: `torchvision:<weights enum>.<member>` (the table's COCO weights), `random-init:<architecture>:seed<n>`,
    `checkpoint:<architecture>:<sha256[:16]>`, and the older `checkpoint:<sha256[:16]>`.
    """
    kind, _, rest = model_id.partition(":")
    if kind == "torchvision":
        return next((a.name for a in ARCHITECTURES.values() if a.coco_weights == rest), None)
    if kind in ("random-init", "checkpoint") and rest.count(":") == 1:
        return rest.split(":")[0]
    return None
