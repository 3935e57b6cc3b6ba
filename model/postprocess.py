"""Pure functions from the model's raw output to storable detections.

Coordinates: boxes in the model output are xyxy in input-image pixels (floats); stored boxes are COCO xywh.
Masks: soft `[N, 1, H, W]` in 0–1, binarised with `>= MASK_THRESHOLD` (torchvision's documented rule), then
encoded as COCO compressed RLE of the full image (`size` = [H, W], `counts` = ASCII string).

Three routes to `Detections`:
- `to_detections(model(images)[i])`: torchvision's full forward, whose masks are pasted into full-image canvases.
- `detections_from_mask_probs(forward_to_mask_probs(model, images)[i])`: the forward pass stops before that paste;
  each kept 28x28 mask is pasted, thresholded and RLE-encoded within its box only, one mask after another. Equal to
  the first route to the last bit. What the segment job runs on CPUs.
- `model.paste_batched.detections_batched(forward_to_mask_probs(model, images), ...)`: all kept masks of a batch pasted, thresholded and
  turned into run boundaries in a few tensor operations on the masks' device (no Python loop over masks, one copy
  to the host per chunk), and the COCO strings made on the host from the run lengths (`model.rle`). What the segment
  job runs on GPUs, where a loop of small kernels per mask would hold the GPU up. Its bilinear paste computes the same
  sample positions and weights as `F.interpolate`, but sums them in another order: a pixel can differ in the last bit
  of its probability, and so flip at exactly 0.5 (none in tests/model/test_postprocess_batched.py's 2,000 masks). The
  RLE strings equal pycocotools' on the same thresholded masks.

pycocotools is needed only by the first route (imported where used): the others run with torch and NumPy alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

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
    from pycocotools import mask as mask_utils

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


# --- the fast path: masks pasted, thresholded and encoded within their boxes ------------------------------------------
#
# torchvision's eval forward ends in `GeneralizedRCNNTransform.postprocess`, which pastes every 28x28 mask into a
# full-image float canvas (`paste_masks_in_image`): N x H x W floats per image, thresholded and encoded afterwards.
# The functions below stop the forward pass before that paste and do the same arithmetic on the box only, so the
# cost follows the boxes' area instead of image area x detections. Every step reuses torchvision's own functions
# or repeats its code line for line, so the result is bit-identical to thresholding its pasted masks.


def forward_to_mask_probs(
    model: torch.nn.Module,
    images: list[torch.Tensor],
    *,
    original_sizes: list[tuple[int, int]] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """torchvision Mask R-CNN's eval forward pass without the full-image mask paste.

    `images`: float `[3, H, W]` in 0–1 (the model's input contract). Returns one dict per image: `boxes [N, 4]` xyxy
    in input-image pixels (rescaled exactly as `transform.postprocess` does), `labels [N]`, `scores [N]`
    (descending), `masks [N, 1, M, M]` the mask head's probabilities for the predicted class (M = 28), not pasted.
    `original_sizes` (`(H, W)` per image): an image whose tensor is smaller than its original size was already
    resized to the model's size (`model.resize.shrink_for_model`): the transform only normalises it, and its boxes
    are reported at the original size. The caller picks the grad mode (`torch.inference_mode()`).
    """
    from collections import OrderedDict

    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.transform import resize_boxes

    if model.training:
        raise ValueError("forward_to_mask_probs needs the model in eval mode (model.eval())")
    given = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    original_sizes = given if original_sizes is None else [(int(h), int(w)) for h, w in original_sizes]
    if original_sizes == given:
        image_list, _ = model.transform(images)
    else:
        # `GeneralizedRCNNTransform.forward`'s steps, with the resize left out for the images already resized.
        t = model.transform
        prepared = []
        for img, size, original in zip(images, given, original_sizes):
            img = t.normalize(img)
            if size == original:
                img, _ = t.resize(img, None)
            prepared.append(img)
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in prepared]
        image_list = ImageList(t.batch_images(prepared, size_divisible=t.size_divisible), sizes)
    features = model.backbone(image_list.tensors)
    # As GeneralizedRCNN.forward: a backbone returning one feature map gets the key "0".
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    proposals, _ = model.rpn(image_list, features)
    detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
    for det, resized, original in zip(detections, image_list.image_sizes, original_sizes):
        det["boxes"] = resize_boxes(det["boxes"], resized, original)
    return detections


def paste_boxes(boxes: torch.Tensor, mask_size: int, padding: int = 1) -> torch.Tensor:
    """Float xyxy boxes `[N, 4]` → the int64 boxes torchvision pastes `mask_size` masks into (padded by `padding`).

    Same calls as `paste_masks_in_image`: the box grows by the padded mask's scale, then truncates toward zero.
    """
    from torchvision.models.detection.roi_heads import expand_boxes

    scale = float(mask_size + 2 * padding) / mask_size  # expand_masks' scale
    return expand_boxes(boxes, scale).to(dtype=torch.int64)


def threshold_masks_in_boxes(
    masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int]
) -> list[tuple[np.ndarray, int, int]]:
    """Soft masks `[N, 1, M, M]` and float xyxy boxes `[N, 4]` (image pixels) → per mask `(crop, x0, y0)`.

    `crop` is a bool array `[y1 - y0, x1 - x0]`: the binarised (`>= MASK_THRESHOLD`) pasted mask inside the part of
    its expanded box that lies in the `image_size = (H, W)` image, whose top-left pixel is `(x0, y0)`; every pixel
    outside the crop is 0. Equal, pixel for pixel, to `paste_masks_in_image(masks, boxes, image_size) >= 0.5`.
    """
    from torchvision.models.detection.roi_heads import expand_masks

    im_h, im_w = image_size
    if len(masks) == 0:
        return []
    padded, _ = expand_masks(masks, padding=1)
    int_boxes = paste_boxes(boxes, masks.shape[-1]).tolist()  # one device→host copy, not one per box
    crops: list[torch.Tensor] = []
    places: list[tuple[int, int, int, int]] = []
    for mask, (bx0, by0, bx1, by1) in zip(padded, int_boxes):
        # paste_mask_in_image, line for line, with the canvas left out.
        w = max(int(bx1 - bx0 + 1), 1)
        h = max(int(by1 - by0 + 1), 1)
        resized = F.interpolate(
            mask.expand((1, 1, -1, -1)), size=(h, w), mode="bilinear", align_corners=False
        )
        x0, x1 = max(bx0, 0), min(bx1 + 1, im_w)
        y0, y1 = max(by0, 0), min(by1 + 1, im_h)
        # A box that misses the image pastes nothing (torchvision's slice assignment is empty then).
        x1, y1 = max(x1, x0), max(y1, y0)
        crops.append(resized[0, 0, y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0] >= MASK_THRESHOLD)
        places.append((x0, y0, y1 - y0, x1 - x0))
    # One transfer for all crops: on a GPU a copy per mask would synchronise once per detection.
    flat = torch.cat([c.reshape(-1) for c in crops]).cpu().numpy()
    out = []
    offset = 0
    for x0, y0, ch, cw in places:
        out.append((flat[offset : offset + ch * cw].reshape(ch, cw), x0, y0))
        offset += ch * cw
    return out


def rle_from_crop(crop: np.ndarray, x0: int, y0: int, image_size: tuple[int, int]) -> dict:
    """COCO compressed RLE (`counts` as str) of the `image_size = (H, W)` mask that is `crop` (bool `[h, w]`) at
    top-left `(x0, y0)` and 0 elsewhere — the same string `mask_utils.encode` gives for the full mask.

    Built from the crop alone: COCO RLE runs over the image column by column (Fortran order), and outside the crop
    every column is zeros, so each crop column is preceded by `y0` zeros and followed by `H - y0 - h` zeros, the
    first crop column by `x0 * H` zeros and the last by `(W - x0 - w) * H`. Those zero stretches become single
    weighted elements, and run lengths are sums of weights between value changes.
    """
    im_h, im_w = image_size
    h, w = crop.shape
    if h == 0 or w == 0 or not crop.any():
        return {"size": [im_h, im_w], "counts": _compress([im_h * im_w], im_h, im_w)}
    top, bottom = y0, im_h - y0 - h
    pad_top, pad_bottom = int(top > 0), int(bottom > 0)
    columns = np.zeros((pad_top + h + pad_bottom, w), np.uint8)
    columns[pad_top : pad_top + h] = crop
    row_weights = np.ones(len(columns), np.int64)
    row_weights[0] = top if pad_top else 1
    row_weights[-1] = bottom if pad_bottom else 1
    values = columns.ravel(order="F")
    weights = np.tile(row_weights, w)
    left, right = x0 * im_h, (im_w - x0 - w) * im_h
    if left:
        values, weights = np.concatenate([[0], values]), np.concatenate([[left], weights])
    if right:
        values, weights = np.concatenate([values, [0]]), np.concatenate([weights, [right]])
    # Runs: boundaries where the value changes; lengths: weight sums between them. COCO RLE starts with a run of 0s.
    starts = np.concatenate([[0], np.flatnonzero(values[1:] != values[:-1]) + 1])
    ends = np.concatenate([starts[1:], [len(values)]])
    cumulative = np.concatenate([[0], np.cumsum(weights)])
    runs = cumulative[ends] - cumulative[starts]
    if values[0]:
        runs = np.concatenate([[0], runs])
    return {"size": [im_h, im_w], "counts": _compress(runs, im_h, im_w)}


def _compress(runs, im_h: int, im_w: int) -> str:
    # COCO's compressed string of one mask's run lengths (`model.rle`: pycocotools' encoding, without pycocotools).
    from model.rle import encode_counts

    runs = np.asarray(runs, dtype=np.int64)
    return encode_counts(runs, np.array([len(runs)]))[0]


def detections_from_mask_probs(
    output: dict[str, torch.Tensor], *, image_size: tuple[int, int], score_threshold: float
) -> Detections:
    """One image's `forward_to_mask_probs` output → `Detections`, keeping scores `>= score_threshold`.

    Same result as `to_detections` on the model's full output (boxes, labels, scores, RLE strings, areas), at the
    cost of the boxes' area: masks are pasted, thresholded and encoded within their boxes only.
    """
    keep = output["scores"] >= score_threshold
    scores = output["scores"][keep]
    boxes = output["boxes"][keep]
    crops = threshold_masks_in_boxes(output["masks"][keep], boxes, image_size)
    return Detections(
        boxes_xywh=xyxy_to_xywh(boxes.float().cpu().numpy()),
        labels=output["labels"][keep].cpu().numpy().astype(np.int64),
        scores=scores.float().cpu().numpy().astype(np.float32),
        rles=[rle_from_crop(crop, x0, y0, image_size) for crop, x0, y0 in crops],
        areas=np.array([int(crop.sum()) for crop, _, _ in crops], dtype=np.int64),
    )
