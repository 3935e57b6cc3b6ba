"""A synthetic COCO-format instance-segmentation dataset: coloured shapes on textured backgrounds.

Used by the offline demo, the tests and the training benchmark, since no real dataset can be downloaded there.
Each image holds 1–6 shapes of four classes (circle, square, triangle, star) with varied sizes, colours and
textures; later shapes occlude earlier ones, and each annotation is the *visible* mask (compressed RLE,
`iscrowd=0`), its bbox and area. Deterministic for a given seed.

Layout written under `--output` (any fsspec URL):
    train/000000.jpg ...              val/000000.jpg ...
    annotations/instances_train.json  annotations/instances_val.json
Category ids are 1..4 in COCO's `categories` list.
"""

from __future__ import annotations

import io
import json
import posixpath

import fsspec
import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "star", "supercategory": "shape"},
]
MIN_VISIBLE_PIXELS = 30  # an almost fully occluded shape is not annotated: nobody could label it either


def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Gradient + noise + optional stripes: enough texture that shapes are not found by colour alone."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, size=3)
    slope = rng.uniform(-0.4, 0.4, size=(2, 3))
    img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    img += rng.normal(0, rng.uniform(4, 18), size=(h, w, 3))
    if rng.random() < 0.5:
        period = rng.uniform(6, 24)
        img += 20 * np.sin((xx + yy * rng.uniform(-1, 1)) / period * 2 * np.pi)[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _shape_polygon(kind: int, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == 2:
        n, radii = 4, [r]
    elif kind == 3:
        n, radii = 3, [r]
    else:  # star
        n, radii = 10, [r, r * 0.45]
    pts = []
    for k in range(n):
        a = angle + 2 * np.pi * k / n
        rr = radii[k % len(radii)]
        pts.append((cx + rr * np.cos(a), cy + rr * np.sin(a)))
    return pts


def render_scene(
    rng: np.random.Generator,
    *,
    height: int,
    width: int,
    max_shapes: int = 6,
    radius: tuple[float, float] = (0.08, 0.28),
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One image (uint8 `[H, W, 3]`) and its instances as (category id, visible bool mask `[H, W]`): 1 to
    `max_shapes` shapes of radius `radius` x the image's short side."""
    img = _background(rng, height, width)
    draw = ImageDraw.Draw(img)
    owner = np.full((height, width), -1, dtype=np.int32)  # which instance each pixel shows
    kinds = []
    for idx in range(int(rng.integers(1, max_shapes + 1))):
        kind = int(rng.integers(1, 5))
        r = float(rng.uniform(*radius) * min(height, width))
        cx, cy = rng.uniform(r * 0.5, width - r * 0.5), rng.uniform(r * 0.5, height - r * 0.5)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        layer = Image.new("L", (width, height), 0)
        ldraw = ImageDraw.Draw(layer)
        if kind == 1:
            box = (cx - r, cy - r, cx + r, cy + r)
            draw.ellipse(box, fill=colour)
            ldraw.ellipse(box, fill=255)
        else:
            poly = _shape_polygon(kind, cx, cy, r, float(rng.uniform(0, 2 * np.pi)))
            draw.polygon(poly, fill=colour)
            ldraw.polygon(poly, fill=255)
        owner[np.asarray(layer) > 0] = idx
        kinds.append(kind)
    pixels = np.asarray(img).astype(np.float32)
    pixels += rng.normal(0, 3, size=pixels.shape)  # sensor noise over shapes too
    image = np.clip(pixels, 0, 255).astype(np.uint8)
    instances = []
    for idx, kind in enumerate(kinds):
        visible = owner == idx
        if visible.sum() >= MIN_VISIBLE_PIXELS:
            instances.append((kind, visible))
    return image, instances


def _annotation(ann_id: int, image_id: int, kind: int, mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": kind,
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": float(mask_utils.area(rle)),
        "bbox": [x, y, w, h],
        "iscrowd": 0,
    }


def write_split(
    url: str,
    split: str,
    n: int,
    *,
    seed: int,
    size: tuple[int, int] = (192, 256),
    max_shapes: int = 6,
    radius: tuple[float, float] = (0.08, 0.28),
    storage_options: dict | None = None,
) -> dict:
    """Write `n` images of `split` and its COCO JSON under `url`; returns the COCO dict."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    # Separate streams per split so train and val never share images for the same seed.
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}.get(split, 2)])
    images, annotations = [], []
    fs.makedirs(posixpath.join(root, split), exist_ok=True)
    fs.makedirs(posixpath.join(root, "annotations"), exist_ok=True)
    pending: dict[str, bytes] = {}
    for i in range(n):
        h = int(rng.integers(int(size[0] * 0.75), size[0] + 1))
        w = int(rng.integers(int(size[1] * 0.75), size[1] + 1))
        image, instances = render_scene(rng, height=h, width=w, max_shapes=max_shapes, radius=radius)
        file_name = f"{i:06d}.jpg"
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=92)
        pending[posixpath.join(root, split, file_name)] = buf.getvalue()
        images.append({"id": i + 1, "file_name": file_name, "height": h, "width": w})
        for kind, mask in instances:
            annotations.append(_annotation(len(annotations) + 1, i + 1, kind, mask))
        if len(pending) >= 64:
            fs.pipe(pending)
            pending = {}
    if pending:
        fs.pipe(pending)
    coco = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    fs.pipe_file(posixpath.join(root, "annotations", f"instances_{split}.json"), json.dumps(coco).encode())
    return coco


def make_shapes(
    url: str,
    *,
    train: int,
    val: int,
    seed: int = 0,
    size: tuple[int, int] = (192, 256),
    max_shapes: int = 6,
    radius: tuple[float, float] = (0.08, 0.28),
    storage_options: dict | None = None,
) -> dict[str, dict]:
    """Write both splits; returns {split: coco dict}."""
    out = {}
    for split, n in (("train", train), ("val", val)):
        if n > 0:
            out[split] = write_split(
                url,
                split,
                n,
                seed=seed,
                size=size,
                max_shapes=max_shapes,
                radius=radius,
                storage_options=storage_options,
            )
    return out
