"""COCO instance-segmentation data for training Mask R-CNN, read through fsspec (local paths and `s3://` alike).

- `load_coco` reads a standard COCO instances JSON into a `CocoIndex`: contiguous labels for the (possibly sparse)
  category ids, annotations grouped per image.
- `CocoInstances` is a map-style `Dataset` of `(image, target)` pairs in torchvision's detection format.
- `collate` and `GroupedBatchSampler` (aspect-ratio grouping, as torchvision's `references/detection`) build the
  `DataLoader`.

Coordinates are image pixels with the origin at the top-left corner of the top-left pixel; boxes are xyxy in targets
(torchvision's convention) and xywh in the JSON (COCO's). Images are decoded upright (EXIF orientation applied), and
the annotations must refer to that upright image.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import posixpath
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
import numpy as np
import torch
from pycocotools import mask as mask_utils

from model.decode import DecodeError, decode_image

# Training images come from a curated annotation file, not an arbitrary archive: a generous cap.
MAX_TRAIN_PIXELS = 1_000_000_000


@dataclasses.dataclass(frozen=True, eq=False)
class CocoIndex:
    """A COCO instances file, indexed. Category ids may be sparse (COCO's own are 1..90 with gaps).

    `dataset` is the raw dict (give it to `model.coco_eval.evaluate` as ground truth); `images` are its image dicts
    (`id`, `file_name`, `height`, `width`) sorted by id; `anns_by_image` maps every image id (also those without
    annotations: valid negatives) to its annotation dicts in file order. Label 0 is the background.
    """

    url: str
    dataset: dict
    cat_ids: tuple[int, ...]  # ascending
    cat_to_label: dict[int, int]  # category id -> contiguous label 1..K
    label_to_cat: dict[int, int]
    class_names: tuple[str, ...]  # index = label; [0] is "__background__"
    images: tuple[dict, ...]
    anns_by_image: dict[int, list[dict]]

    @property
    def num_classes(self) -> int:
        """K + 1: what `model.build.build_maskrcnn(num_classes=...)` wants."""
        return len(self.class_names)


def load_coco(annotations_url: str, *, storage_options: dict | None = None) -> CocoIndex:
    """Read and index a COCO instances JSON from a local path or fsspec URL.

    Raises `FileNotFoundError` or `ValueError` naming the URL (and the offending key or id) for a missing file,
    invalid JSON, missing top-level keys, or annotations pointing at unknown images or categories.
    """
    try:
        with fsspec.open(annotations_url, "rb", **(storage_options or {})) as f:
            dataset = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"COCO annotations not found: {annotations_url}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{annotations_url}: not valid JSON: {e}") from None
    return index_coco(dataset, url=annotations_url)


def index_coco(dataset: dict, *, url: str = "<dict>") -> CocoIndex:
    """Index an already loaded COCO instances dict (what `load_coco` does after reading). `url` names it in errors."""
    if not isinstance(dataset, dict):
        raise ValueError(f"{url}: expected a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise ValueError(f"{url}: missing or non-list key {key!r}")
    if not dataset["categories"]:
        raise ValueError(f"{url}: 'categories' is empty; a detector needs at least one class")
    names = {}
    for cat in dataset["categories"]:
        if "id" not in cat or "name" not in cat:
            raise ValueError(f"{url}: category {cat!r} lacks 'id' or 'name'")
        if int(cat["id"]) in names:
            raise ValueError(f"{url}: duplicate category id {cat['id']}")
        names[int(cat["id"])] = str(cat["name"])
    cat_ids = tuple(sorted(names))
    cat_to_label = {cat_id: label for label, cat_id in enumerate(cat_ids, start=1)}

    images = []
    for img in dataset["images"]:
        missing = [k for k in ("id", "file_name", "height", "width") if k not in img]
        if missing:
            raise ValueError(f"{url}: image {img.get('id', '?')} lacks {missing}")
        images.append(img)
    images.sort(key=lambda img: int(img["id"]))
    anns_by_image: dict[int, list[dict]] = {int(img["id"]): [] for img in images}
    if len(anns_by_image) != len(images):
        raise ValueError(f"{url}: duplicate image ids")
    for ann in dataset["annotations"]:
        ann_id = ann.get("id", "?")
        image_id, cat_id = ann.get("image_id"), ann.get("category_id")
        if image_id not in anns_by_image:
            raise ValueError(f"{url}: annotation {ann_id} refers to unknown image_id {image_id!r}")
        if cat_id not in cat_to_label:
            raise ValueError(f"{url}: annotation {ann_id} refers to unknown category_id {cat_id!r}")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list | tuple) or len(bbox) != 4:
            raise ValueError(f"{url}: annotation {ann_id} has no 4-number 'bbox' (got {bbox!r})")
        anns_by_image[image_id].append(ann)
    return CocoIndex(
        url=url,
        dataset=dataset,
        cat_ids=cat_ids,
        cat_to_label=cat_to_label,
        label_to_cat={label: cat_id for cat_id, label in cat_to_label.items()},
        class_names=("__background__", *(names[c] for c in cat_ids)),
        images=tuple(images),
        anns_by_image=anns_by_image,
    )


def clip_xywh_to_xyxy(bbox: Sequence[float], *, height: int, width: int) -> tuple[float, float, float, float]:
    """COCO `[x, y, w, h]` → `(x1, y1, x2, y2)` clipped to the image `[0, width] × [0, height]`."""
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return (0.0, 0.0, 0.0, 0.0)  # NaN/inf boxes exist in the wild; zero size makes them degenerate
    x1, x2 = min(max(x, 0.0), width), min(max(x + w, 0.0), width)
    y1, y2 = min(max(y, 0.0), height), min(max(y + h, 0.0), height)
    return (x1, y1, x2, y2)


def is_degenerate(xyxy: Sequence[float]) -> bool:
    """A box under one pixel wide or high: torchvision's training losses reject (or NaN on) such boxes."""
    x1, y1, x2, y2 = xyxy
    return x2 - x1 < 1.0 or y2 - y1 < 1.0


def segmentation_to_mask(segm: Any, *, height: int, width: int) -> np.ndarray:
    """A COCO `segmentation` → uint8 mask `[height, width]` (1 = instance).

    Accepts polygons (list of `[x1, y1, x2, y2, ...]` lists, merged), uncompressed RLE (`counts` a list) and
    compressed RLE (`counts` a str or bytes), as `pycocotools.coco.COCO.annToRLE` does. Raises `ValueError` for RLE
    whose `size` is not `[height, width]` or an unknown format.
    """
    if isinstance(segm, list):
        # Fewer than 3 points has no area, and pycocotools reads a 4-number "polygon" as a bbox: drop them.
        polygons = [p for p in segm if isinstance(p, list | tuple) and len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if [int(s) for s in segm["size"]] != [height, width]:
            raise ValueError(f"RLE size {list(segm['size'])} does not match the image's [{height}, {width}]")
        if isinstance(segm["counts"], list):
            rle = mask_utils.frPyObjects(segm, height, width)
        else:
            counts = segm["counts"]
            rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"unknown segmentation format: {type(segm).__name__}")
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


class CocoInstances(torch.utils.data.Dataset):
    """COCO instances as `(image, target)` pairs for torchvision's Mask R-CNN.

    `image`: float32 `[3, H, W]`, RGB in 0–1, upright. `target`:
    - `boxes` float32 `[N, 4]` xyxy pixels (the annotation's bbox clipped to the image),
    - `labels` int64 `[N]` contiguous labels 1..K (`index.label_to_cat` maps back to category ids),
    - `masks` uint8 `[N, H, W]`, `area` float32 `[N]` (the annotation's), `iscrowd` int64 `[N]`,
    - `image_id` int64 scalar: the COCO image id.
    N may be 0 (an image without annotations is a valid negative).

    `images_url` is the folder/prefix the `file_name`s are relative to (`file_name` may hold subfolders).

    `train=True`: crowd annotations and boxes under 1 pixel wide/high after clipping are dropped (torchvision's
    references do the same; the losses cannot use them), counted over the whole index in `self.dropped`; and the
    image, boxes and masks are flipped horizontally together with probability `flip_prob`, drawn from torch's global
    RNG (so `torch.manual_seed` and the DataLoader's per-worker seeding make it reproducible).
    `train=False`: every annotation is returned as it is, crowds with `iscrowd=1` (evaluation uses the GT JSON).

    Multi-scale resizing is *not* done here: the model's `GeneralizedRCNNTransform` resizes (and picks a random short
    side per image when `min_size` is a tuple), so targets stay in original-image pixels.
    """

    def __init__(
        self,
        *,
        annotations_url: str,
        images_url: str,
        storage_options: dict | None = None,
        train: bool,
        flip_prob: float = 0.5,
        index: CocoIndex | None = None,
    ):
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.index = (
            index if index is not None else load_coco(annotations_url, storage_options=storage_options)
        )
        self.annotations_url = annotations_url
        self.images_url = images_url
        self.storage_options = dict(storage_options or {})
        self.train = train
        self.flip_prob = flip_prob
        self.dropped = {"crowd": 0, "degenerate_box": 0}
        # Filtering once here, from the JSON's bboxes, makes `dropped` exact without reading a single image.
        self._anns: list[list[dict]] = []
        for img in self.index.images:
            kept = []
            for ann in self.index.anns_by_image[int(img["id"])]:
                if train and ann.get("iscrowd", 0):
                    self.dropped["crowd"] += 1
                    continue
                xyxy = clip_xywh_to_xyxy(ann["bbox"], height=int(img["height"]), width=int(img["width"]))
                if train and is_degenerate(xyxy):
                    self.dropped["degenerate_box"] += 1
                    continue
                kept.append(ann)
            self._anns.append(kept)

    def __len__(self) -> int:
        return len(self.index.images)

    def aspect_ratios(self) -> list[float]:
        """Width / height of every item, in item order, from the index (no image reads)."""
        return [float(img["width"]) / float(img["height"]) for img in self.index.images]

    def image_url(self, i: int) -> str:
        return posixpath.join(self.images_url, self.index.images[i]["file_name"])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        info = self.index.images[i]
        url = self.image_url(i)
        try:
            with fsspec.open(url, "rb", **self.storage_options) as f:
                data = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {url} (image id {info['id']})") from None
        try:
            # The segment job's decoder: training sees images exactly as inference will (EXIF, modes, 16-bit).
            pixels = decode_image(data, max_pixels=MAX_TRAIN_PIXELS)
        except DecodeError as e:
            raise ValueError(f"cannot decode image {url}: {e.reason}") from None
        h, w = int(info["height"]), int(info["width"])
        if pixels.shape[:2] != (h, w):
            raise ValueError(
                f"{url}: upright image is {pixels.shape[1]}x{pixels.shape[0]} (WxH) but "
                f"{self.index.url} says {w}x{h} for image id {info['id']}"
            )
        image = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0).contiguous()
        target = self._target(self._anns[i], image_id=int(info["id"]), height=h, width=w, url=url)
        if self.train and self.flip_prob > 0 and float(torch.rand(())) < self.flip_prob:
            image, target = hflip(image, target)
        return image, target

    def _target(self, anns: list[dict], *, image_id: int, height: int, width: int, url: str) -> dict:
        masks = np.zeros((len(anns), height, width), dtype=np.uint8)
        for k, ann in enumerate(anns):
            if "segmentation" not in ann:
                raise ValueError(
                    f"{self.index.url}: annotation {ann.get('id', '?')} ({url}) has no segmentation"
                )
            try:
                masks[k] = segmentation_to_mask(ann["segmentation"], height=height, width=width)
            except ValueError as e:
                raise ValueError(f"{self.index.url}: annotation {ann.get('id', '?')} ({url}): {e}") from None
        boxes = [clip_xywh_to_xyxy(ann["bbox"], height=height, width=width) for ann in anns]
        areas = [float(ann["area"]) if "area" in ann else float(masks[k].sum()) for k, ann in enumerate(anns)]
        return {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(
                [self.index.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64
            ),
            "masks": torch.from_numpy(masks),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "area": torch.tensor(areas, dtype=torch.float32),
            "iscrowd": torch.tensor([int(bool(a.get("iscrowd", 0))) for a in anns], dtype=torch.int64),
        }


def hflip(
    image: torch.Tensor, target: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mirror `image [C, H, W]` and its target left-right: boxes `x1' = W - x2, x2' = W - x1`, masks flipped."""
    width = image.shape[-1]
    out = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, 0] = width - target["boxes"][:, 2]
    boxes[:, 2] = width - target["boxes"][:, 0]
    out["boxes"] = boxes
    out["masks"] = target["masks"].flip(-1)
    return image.flip(-1), out


def collate(batch: Sequence[tuple[Any, Any]]) -> tuple[list, list]:
    """`[(image, target), ...]` → `(images, targets)` lists: detection models take lists, images differ in size."""
    if not batch:
        return [], []
    images, targets = zip(*batch)
    return list(images), list(targets)


def aspect_ratio_group_ids(aspect_ratios: Sequence[float], *, k: int = 3) -> list[int]:
    """Quantise width/height ratios into `2k + 2` bins split at `2 ** linspace(-1, 1, 2k + 1)` (references'
    `create_aspect_ratio_groups`); `k=0` gives two groups: 0 = portrait (`w < h`), 1 = landscape or square."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    bins = (2 ** np.linspace(-1, 1, 2 * k + 1)).tolist() if k > 0 else [1.0]
    return [bisect.bisect_right(bins, float(ar)) for ar in aspect_ratios]


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of `batch_size` indices from `sampler` whose items share a group id (e.g. an aspect-ratio bin), so a
    batch pads little. Use as `DataLoader(dataset, batch_sampler=..., collate_fn=collate)`.

    Guarantee: every epoch yields exactly `len(self) == len(sampler) // batch_size` batches, each of exactly
    `batch_size` indices. Batches form as indices arrive; when the sampler runs out, the fullest incomplete groups
    are topped up with repeats of their own group's indices from this epoch (torchvision's
    `references/detection/group_by_aspect_ratio.py` rule) until the count is reached; the remaining partial groups are
    dropped. So with a `DistributedSampler` (same length on every rank) every DDP worker runs the same number of
    iterations, as collective ops require. Call `set_epoch(epoch)` each epoch: it is forwarded to the wrapped sampler
    (a `DistributedSampler` reshuffles only then). With Ray Train, pass `add_dist_sampler=False` to
    `prepare_data_loader`, which would otherwise rebuild the loader around a plain `DistributedSampler`.
    """

    def __init__(self, sampler: torch.utils.data.Sampler, *, group_ids: Sequence[int], batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = {}
        seen: dict[int, list[int]] = {}
        num_batches = 0
        for idx in self.sampler:
            try:
                group = self.group_ids[idx]
            except IndexError:
                raise IndexError(
                    f"sampler gave index {idx}, but group_ids has {len(self.group_ids)}"
                ) from None
            buffers.setdefault(group, []).append(idx)
            seen.setdefault(group, []).append(idx)
            if len(buffers[group]) == self.batch_size:
                yield buffers.pop(group)
                num_batches += 1
        # Leftovers L = len(sampler) - num_batches * batch_size; missing batches = L // batch_size, and the partial
        # buffers (each < batch_size items, together L) are always more than that, so the count is always reached.
        missing = len(self) - num_batches
        for group, buf in sorted(buffers.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            if missing <= 0:
                break
            pool = seen[group]
            need = self.batch_size - len(buf)
            yield buf + [pool[j % len(pool)] for j in range(need)]
            missing -= 1
