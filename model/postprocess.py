"""Pure functions from the model's raw output to storable detections.

Coordinates: boxes in the model output are xyxy in input-image pixels (floats); stored boxes are COCO xywh.
Masks: soft `[N, 1, H, W]` in 0–1, binarised with `>= MASK_THRESHOLD` (torchvision's documented rule), then
encoded as COCO compressed RLE of the full image (`size` = [H, W], `counts` = ASCII string).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from pycocotools import mask as mask_utils

MASK_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class Detections:
    """Detections of one image, score-descending. Arrays share the leading dimension N (N may be 0)."""

    boxes_xywh: np.ndarray  # float32 [N, 4]
    labels: np.ndarray  # int64 [N]
    scores: np.ndarray  # float32 [N]
    rles: list[dict]  # N dicts: {"size": [H, W], "counts": str}
    areas: np.ndarray  # int64 [N], mask pixel counts

    def __len__(self) -> int:
        return len(self.labels)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """`[N, 4]` xyxy → xywh (COCO's bbox convention), float32."""
    out = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    out[:, 2:] -= out[:, :2]
    return out


def encode_binary_masks(binary: np.ndarray) -> list[dict]:
    """`[N, H, W]` bool/uint8 → N COCO compressed RLEs with `counts` as str (JSON/Parquet friendly)."""
    n = binary.shape[0]
    if n == 0:
        return []
    # pycocotools wants a Fortran-ordered uint8 [H, W, N]; transposing a C array gives exactly that layout.
    fortran = np.asfortranarray(binary.astype(np.uint8, copy=False).transpose(1, 2, 0))
    rles = mask_utils.encode(fortran)
    return [
        {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")} for r in rles
    ]


def to_detections(output: dict[str, torch.Tensor], *, score_threshold: float) -> Detections:
    """One image's model output → `Detections`, keeping scores `>= score_threshold`.

    Filtering happens before mask binarisation so dropped instances cost nothing.
    """
    scores = output["scores"].detach()
    keep = scores >= score_threshold
    scores = scores[keep].float().cpu().numpy()
    labels = output["labels"][keep].cpu().numpy().astype(np.int64)
    boxes = xyxy_to_xywh(output["boxes"][keep].float().cpu().numpy())
    masks = output["masks"][keep]
    if masks.ndim == 4:  # [N, 1, H, W] from torchvision
        masks = masks[:, 0]
    binary = (masks >= MASK_THRESHOLD).cpu().numpy()
    areas = binary.sum(axis=(1, 2), dtype=np.int64)
    return Detections(
        boxes_xywh=boxes,
        labels=labels,
        scores=scores.astype(np.float32),
        rles=encode_binary_masks(binary),
        areas=areas,
    )
