"""COCO box and mask AP of Mask R-CNN outputs, computed by pycocotools (`COCOeval`), nothing re-implemented.

`predictions_to_coco` turns one torchvision eval output into COCO result dicts (category ids of the dataset, xywh
boxes, compressed-RLE masks); `evaluate` scores a list of them against the ground-truth dict. The 12 numbers per IoU
type are `COCOeval.stats`: AP@[.5:.95], AP50, AP75, AP small/medium/large, AR@1, AR@10, AR@100, AR small/medium/large
(-1 where the ground truth has nothing to measure, e.g. no small objects).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model.postprocess import MASK_THRESHOLD, encode_binary_masks, xyxy_to_xywh

IOU_TYPES = ("bbox", "segm")


def predictions_to_coco(
    image_id: int, output: dict[str, torch.Tensor], *, label_to_cat: dict[int, int]
) -> list[dict]:
    """One image's eval output → COCO result dicts, one per detection, no score filtering.

    `output`: `boxes [N, 4]` xyxy pixels, `labels [N]` contiguous labels, `scores [N]`, optionally `masks [N, 1, H, W]`
    (or `[N, H, W]`) soft in 0–1. Each result: `image_id`, `category_id` (`label_to_cat[label]`), `bbox` xywh floats,
    `score`, and with masks `segmentation`: compressed RLE of `mask >= 0.5`, `counts` as str (JSON-ready).
    """
    labels = output["labels"].detach().cpu().tolist()
    unknown = sorted({label for label in labels if label not in label_to_cat})
    if unknown:
        raise ValueError(
            f"labels {unknown} have no category id in label_to_cat (knows {sorted(label_to_cat)})"
        )
    boxes = xyxy_to_xywh(output["boxes"].detach().float().cpu().numpy()).tolist()
    scores = output["scores"].detach().float().cpu().tolist()
    results = [
        {"image_id": int(image_id), "category_id": int(label_to_cat[label]), "bbox": box, "score": score}
        for label, box, score in zip(labels, boxes, scores)
    ]
    if "masks" in output:
        masks = output["masks"].detach()
        if masks.ndim == 4:  # torchvision's [N, 1, H, W]
            masks = masks[:, 0]
        rles = encode_binary_masks((masks >= MASK_THRESHOLD).cpu().numpy())
        for result, rle in zip(results, rles):
            result["segmentation"] = rle
    return results


def _gt_coco(gt: dict | COCO) -> COCO:
    if isinstance(gt, COCO):
        return gt
    coco = COCO()  # no file: pycocotools would otherwise want a path to read
    coco.dataset = gt
    coco.createIndex()
    return coco


def _results_for(iou_type: str, predictions: list[dict]) -> list[dict]:
    """The fields COCO reads for one IoU type, copied (loadRes writes into its input).

    Box results carry no mask and mask results no box, as torchvision's references do: `loadRes` then takes a mask
    result's `area` (which decides small/medium/large) from the mask, not from the box.
    """
    drop = "segmentation" if iou_type == "bbox" else "bbox"
    need = "bbox" if iou_type == "bbox" else "segmentation"
    out = []
    for p in predictions:
        if need not in p:
            raise ValueError(
                f"{iou_type} evaluation needs {need!r} in every prediction; image {p.get('image_id')}"
            )
        out.append({k: v for k, v in p.items() if k != drop})
    return out


def _empty_results(gt: COCO) -> COCO:
    # loadRes indexes anns[0], so an empty list crashes it; an empty result set built by hand is what it would be.
    res = COCO()
    res.dataset = {
        "images": list(gt.dataset["images"]),
        "categories": list(gt.dataset["categories"]),
        "annotations": [],
    }
    res.createIndex()
    return res


def evaluate(
    gt: dict | COCO,
    predictions: list[dict],
    *,
    iou_types: Sequence[str] = IOU_TYPES,
    verbose: bool = True,
) -> dict[str, list[float]]:
    """COCO AP of `predictions` (dicts as `predictions_to_coco` makes) against the ground truth `gt`.

    `gt`: a COCO instances dict (e.g. `CocoIndex.dataset`; not written to disk) or a `COCO`. Every GT image counts,
    so an image without predictions is all misses. Returns `{iou_type: COCOeval.stats as 12 floats}`. With no
    predictions at all, pycocotools' `loadRes` would crash, so an empty result set is evaluated instead: 0.0 wherever
    the GT has instances (-1 where it has none, as pycocotools reports). `verbose` prints pycocotools' tables.
    """
    unknown_types = [t for t in iou_types if t not in IOU_TYPES]
    if unknown_types:
        raise ValueError(f"iou_types must be among {IOU_TYPES}, got {unknown_types}")
    # pycocotools narrates every step ("creating index...", "DONE (t=0.01s)"); only its tables are worth printing.
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = _gt_coco(gt)
    img_ids = sorted(coco_gt.getImgIds())
    stray = sorted({p["image_id"] for p in predictions} - set(img_ids))
    if stray:
        raise ValueError(f"predictions for image ids not in the ground truth: {stray[:10]}")
    stats = {}
    for iou_type in iou_types:
        with quiet:
            if predictions:
                coco_dt = coco_gt.loadRes(_results_for(iou_type, predictions))
            else:
                coco_dt = _empty_results(coco_gt)
            evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            evaluator.params.imgIds = img_ids
            evaluator.evaluate()
            evaluator.accumulate()
        with contextlib.nullcontext() if verbose else quiet:
            if verbose:
                print(f"IoU metric: {iou_type}")
            evaluator.summarize()
        stats[iou_type] = [float(s) for s in evaluator.stats]
    return stats


def summary_line(stats: dict[str, list[float]]) -> str:
    """`{"bbox": [...], "segm": [...]}` → `"bbox_AP=0.123 segm_AP=0.101"` (AP@[.5:.95], 3 decimals)."""
    return " ".join(f"{iou_type}_AP={values[0]:.3f}" for iou_type, values in stats.items())
