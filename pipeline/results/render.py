"""One image of a results folder: its detections, decoded masks, and overlays drawn on the image.

- `masks(results, image_uri)` → `[(detection row, bool [H, W] array), ...]` for NumPy users.
- `render(results, image_uri, path)` → a PNG of the image at its own size with each instance's mask filled in its
  own colour, its box and `label score`; `render_sample` does it for the N ok images with the most detections.

Images are re-read from their `image_uri` (a local path, an fsspec URL, or `<shard>.tar#<member>`) and decoded by
`model.decode.decode_image`, the decoder the segment job used, so EXIF orientation and sizes match the stored
coordinates. Relative local paths are relative to the directory the segment job ran in.

Fallbacks for results from another tool (`pipeline.results.common.REQUIRED` lists what cannot be missing): without
`instance`, detections are ordered (and coloured) by descending score, which is what `instance` means; without
`num_detections`, images are ranked by their rows in `detections`; without `height`/`width`, a render checks the
masks' own size against the image instead.
"""

from __future__ import annotations

import posixpath
import re

import fsspec
import numpy as np
import pyarrow.dataset as ds
from PIL import Image, ImageDraw

from model.decode import DecodeError, decode_image
from pipeline.errors import describe_storage_error
from pipeline.results.common import (
    QueryError,
    as_results,
    missing_column,
    options_for,
    require,
    write_output,
)
from pipeline.results.open import Results, decode_mask
from pipeline.results.sql import sql
from pipeline.segment.naming import read_member, split_tar_member
from pipeline.segment.schema import DETECTIONS_DIR, IMAGES_DIR, STATUS_OK

# Distinct, saturated colours (Tableau 10 without its grey, which vanishes on photos); instance i gets
# PALETTE[i % len], so a picture's colours follow the instances' score order.
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
]
ALPHA = 0.5  # mask fill opacity


# --- masks and images -------------------------------------------------------------------------------------------------


def image_row(results: Results, image_uri: str) -> dict:
    """The `images` row of `image_uri`; `QueryError` if the results hold no such input."""
    rows = results.table(IMAGES_DIR, filter=ds.field("image_uri") == image_uri).to_pylist()
    if not rows:
        raise QueryError(
            f"{image_uri}: not in the results at {results.url} (image_uri is as the job wrote it)"
        )
    require(rows[:1], IMAGES_DIR, f" for {image_uri}")
    return rows[0]


def detections_of(results: Results, image_uri: str, *, min_score: float = 0.0) -> list[dict]:
    """Detection rows of one image with `score >= min_score`, in instance order (descending score).

    Rows without `instance` (results from another tool) are ordered by descending score instead; a required column
    that is missing is a `QueryError` naming it.
    """
    # All rows of the image, then the score filter: a missing `score` must be reported, not filtered away as null.
    rows = results.table(DETECTIONS_DIR, filter=ds.field("image_uri") == image_uri).to_pylist()
    require(rows, DETECTIONS_DIR, f" for {image_uri}")
    kept = [row for row in rows if row["score"] >= min_score]
    return [kept[i] for _, i in instance_order(kept)]


def instance_order(rows: list[dict]) -> list[tuple[int, int]]:
    """`(rank, index into rows)` in instance order. The rank is `instance` when every row has one, else the position
    by descending score (ties by input order), which is what `instance` means. Overlays colour by this rank."""
    if all(row.get("instance") is not None for row in rows):
        return sorted((row["instance"], i) for i, row in enumerate(rows))
    by_score = sorted(range(len(rows)), key=lambda i: -rows[i]["score"])  # stable: ties keep their order
    return list(enumerate(by_score))


def masks(
    results: Results | str, image_uri: str, *, min_score: float = 0.0, storage_options: dict | None = None
) -> list[tuple[dict, np.ndarray]]:
    """`[(detection row, mask), ...]` of one image: each mask a bool array `[H, W]` of the upright image.

    An image without detections (or in error) gives `[]`; an `image_uri` the results do not hold is a `QueryError`.
    """
    results = as_results(results, storage_options)
    image_row(results, image_uri)
    return [(row, decode_mask(row["mask"])) for row in detections_of(results, image_uri, min_score=min_score)]


def read_image_bytes(image_uri: str, *, storage_options: dict | None = None) -> bytes:
    """The encoded bytes behind an `image_uri`: a local path, an fsspec URL, or `<shard>.tar#<member>`."""
    location, member = split_tar_member(image_uri) or (image_uri, None)
    opts = options_for(location, storage_options)
    try:
        with fsspec.open(location, "rb", **opts) as f:
            return f.read() if member is None else read_member(f, member)
    except Exception as e:  # noqa: BLE001  (storage failures become one line)
        hint = " (relative paths are relative to where the segment job ran)" if "://" not in location else ""
        raise QueryError(f"cannot read the image: {describe_storage_error(image_uri, e)}{hint}") from None


def load_image(results: Results | str, image_uri: str, *, storage_options: dict | None = None) -> np.ndarray:
    """The upright RGB uint8 image `[H, W, 3]` the segment job saw, checked against its stored size."""
    results = as_results(results, storage_options)
    row = image_row(results, image_uri)
    if row["status"] != STATUS_OK:
        raise QueryError(f"{image_uri}: status=error in the results ({row['error']}); nothing to draw on")
    data = read_image_bytes(image_uri, storage_options=results.storage_options)
    try:
        image = decode_image(data, max_pixels=_max_pixels(results))
    except DecodeError as e:
        raise QueryError(f"{image_uri}: cannot decode the image now: {e.reason}") from None
    stored = (row.get("height"), row.get("width"))
    # Without the stored size (an optional column) `render` compares the masks' own size instead.
    if None not in stored and image.shape[:2] != stored:
        # The file changed since the run: the stored boxes and masks would land in the wrong places.
        raise QueryError(
            f"{image_uri}: the image is {image.shape[1]}x{image.shape[0]} now but was "
            f"{row['width']}x{row['height']} when segmented"
        )
    return image


def _max_pixels(results: Results) -> int:
    # The run's own cap: the image passed it once. Without a config, no cap (the image was decodable then).
    cfg = (results.config or {}).get("config") or {}
    return int((cfg.get("input") or {}).get("max_pixels") or 2**62)


# --- overlays ---------------------------------------------------------------------------------------------------------


def overlay(image: np.ndarray, detections: list[tuple[dict, np.ndarray]]) -> Image.Image:
    """Draw `(row, mask)` pairs on `image` (`[H, W, 3]` uint8): mask filled at `ALPHA` in the instance's colour,
    its box outlined and `label_name score` written above it (inside, at the image's top edge)."""
    h, w = image.shape[:2]
    canvas = image.astype(np.float32)
    # Lowest score first, so the most confident instance ends on top where instances overlap; colours follow the
    # rank (`instance`, or the score order where results lack it).
    order = instance_order([row for row, _ in detections])
    ordered = [(rank, *detections[i]) for rank, i in reversed(order)]
    for rank, _, mask in ordered:
        color = np.array(_color(rank), dtype=np.float32)
        canvas[mask] = canvas[mask] * (1 - ALPHA) + color * ALPHA
    picture = Image.fromarray(np.rint(canvas).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    line = max(1, round(min(h, w) / 300))
    for rank, row, _ in ordered:
        color = _color(rank)
        x, y, bw, bh = row["bbox"]
        draw.rectangle([x, y, x + bw, y + bh], outline=color, width=line)
        text = f"{row['label_name']} {row['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text)
        th = bottom - top + 2
        ty = y - th if y - th >= 0 else y  # above the box, or inside it at the top edge
        draw.rectangle([x, ty, x + right - left + 2, ty + th], fill=color)
        draw.text((x + 1 - left, ty + 1 - top), text, fill=(255, 255, 255))
    return picture


def _color(rank: int) -> tuple[int, int, int]:
    return PALETTE[rank % len(PALETTE)]


def draw_detections(
    results: Results | str, image_uri: str, *, min_score: float = 0.5, storage_options: dict | None = None
) -> tuple[Image.Image, int]:
    """The overlay of `image_uri` (its own size, upright) with its detections of `score >= min_score`, and how
    many it shows. `QueryError` as for `render`, and for masks whose size is not the image's."""
    results = as_results(results, storage_options)
    image = load_image(results, image_uri)
    pairs = [
        (row, decode_mask(row["mask"])) for row in detections_of(results, image_uri, min_score=min_score)
    ]
    for _, mask in pairs:
        # The file changed since the run; `load_image` catches that earlier where the results store the size.
        if mask.shape != image.shape[:2]:
            raise QueryError(
                f"{image_uri}: the image is {image.shape[1]}x{image.shape[0]} now but its masks are "
                f"{mask.shape[1]}x{mask.shape[0]}"
            )
    return overlay(image, pairs), len(pairs)


def render(
    results: Results | str,
    image_uri: str,
    output_path: str,
    *,
    min_score: float = 0.5,
    storage_options: dict | None = None,
) -> dict:
    """Write a PNG of `image_uri` (its own size, upright) with its detections of `score >= min_score` drawn on it.

    `output_path` is a local path or an fsspec URL (written with the results' storage options). Returns
    `{"image_uri", "output", "width", "height", "instances"}`. `QueryError` for an image the results do not hold,
    one in error, or one that can no longer be read.
    """
    results = as_results(results, storage_options)
    picture, instances = draw_detections(results, image_uri, min_score=min_score)
    write_output(output_path, results.storage_options, lambda f: picture.save(f, format="PNG"))
    return {
        "image_uri": image_uri,
        "output": output_path,
        "width": picture.width,
        "height": picture.height,
        "instances": instances,
    }


def sample_uris(results: Results, n: int) -> list[str]:
    """The `n` ok images with the most detections (ties: by `image_uri`), the most telling ones to look at."""
    ok = f"status = '{STATUS_OK}'"
    (check,) = sql(
        results,
        "SELECT count(*) FILTER (WHERE status IS NULL) AS no_status, "
        f"count(*) FILTER (WHERE {ok}) = count(num_detections) FILTER (WHERE {ok}) AS known FROM images",
    ).to_pylist()
    if check["no_status"]:  # else no image would be ok, and the sample silently empty
        raise missing_column(IMAGES_DIR, "status")
    if check["known"]:
        query = f"SELECT image_uri FROM images WHERE {ok} ORDER BY num_detections DESC, image_uri"
    else:  # `num_detections` is optional: count the detection rows (a scan of detections.image_uri)
        query = (
            "SELECT i.image_uri FROM images i LEFT JOIN "
            "(SELECT image_uri, count(*) AS n FROM detections GROUP BY 1) d USING (image_uri) "
            f"WHERE i.{ok} ORDER BY coalesce(i.num_detections, d.n, 0) DESC, i.image_uri"
        )
    return sql(results, query, limit=n).column("image_uri").to_pylist()


def render_sample(
    results: Results | str,
    n: int,
    output_dir: str,
    *,
    min_score: float = 0.5,
    storage_options: dict | None = None,
    uris: list[str] | None = None,
) -> list[dict]:
    """Render the `n` ok images with the most detections (`sample_uris`), or the given `uris` in their order, into
    `output_dir` as `<rank>-<file name>.png` (rank 000 first). Returns `render`'s dict for each."""
    results = as_results(results, storage_options)
    done = []
    for rank, uri in enumerate(sample_uris(results, n) if uris is None else uris[:n]):
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", re.split(r"[/#]", uri)[-1]) or "image"
        target = posixpath.join(output_dir.rstrip("/"), f"{rank:03d}-{posixpath.splitext(name)[0]}.png")
        done.append(render(results, uri, target, min_score=min_score))
    return done
