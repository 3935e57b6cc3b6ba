"""Questions asked of a results folder: a summary, SQL, decoded masks, and overlays drawn on the images.

Everything takes a `Results` (from `pipeline.results.open_results`) or a results URL (local or `s3://`).

- `summary(results)` → a dict (counts, error reasons, labels, score distribution, run and model ids);
  `format_summary` turns it into the lines `jobs/query.py summary` prints.
- `sql(results, query)` → a `pyarrow.Table`. DuckDB runs the query in-process with the two datasets bound as the
  tables `images` and `detections`. They are registered as pyarrow datasets read through fsspec, so results on S3
  need neither DuckDB's httpfs extension (downloaded at run time, impossible offline) nor an AWS SDK of DuckDB's
  own; DuckDB still pushes column projections and filters down into the Parquet scan.
- `masks(results, image_uri)` → `[(detection row, bool [H, W] array), ...]` for NumPy users.
- `render(results, image_uri, path)` → a PNG of the image at its own size with each instance's mask filled in its
  own colour, its box and `label score`; `render_sample` does it for the N ok images with the most detections.

Images are re-read from their `image_uri` (a local path, an fsspec URL, or `<shard>.tar#<member>`) and decoded by
`model.decode.decode_image`, the decoder the segment job used, so EXIF orientation and sizes match the stored
coordinates. Relative local paths are relative to the directory the segment job ran in.

Results written by another tool may lack columns: pyarrow reads a column a Parquet file lacks as nulls. Only
`REQUIRED` columns are needed; a null there is a `QueryError` naming the column. Every other column has a fallback:
without `instance`, detections are ordered (and coloured) by descending score, which is what `instance` means;
without `num_detections`, images are ranked by their rows in `detections`; without `height`/`width`, a render checks
the masks' own size against the image instead.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
from collections.abc import Callable
from typing import Any, BinaryIO

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from model.decode import DecodeError, decode_image
from pipeline.errors import JobError, describe_storage_error
from pipeline.results.open import Results, decode_mask, open_results
from pipeline.segment.plan import TAR_MEMBER_SEP
from pipeline.segment.schema import DETECTIONS_DIR, IMAGES_DIR, STATUS_OK

TOP_ERRORS = 5
SCORE_BINS = 10  # histogram bins of width 0.1 over [0, 1]
FORMATS = ("csv", "parquet")
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
# The columns these queries cannot do without (README, "Output"); the rest are optional, see the module docstring.
REQUIRED = {
    IMAGES_DIR: ("image_uri", "status"),
    DETECTIONS_DIR: ("image_uri", "label_name", "score", "bbox", "mask"),
}


class QueryError(JobError):
    """A query that cannot be answered (bad SQL, unknown image, unreadable image): one line for the user."""


def missing_column(table: str, column: str, where: str = "") -> QueryError:
    """The one-line error for a required column that is absent (read as null) or null."""
    return QueryError(
        f"{table}.{column} is missing{where}: a required column of the results (README, Output); "
        "were they written by another tool?"
    )


def _require(rows: list[dict], table: str, where: str = "") -> None:
    for column in REQUIRED[table]:
        if any(row.get(column) is None for row in rows):
            raise missing_column(table, column, where)


def _results(results: Results | str, storage_options: dict | None) -> Results:
    return results if isinstance(results, Results) else open_results(results, storage_options=storage_options)


def _options_for(url: str, storage_options: dict | None) -> dict:
    """The storage options apply to remote URLs only; a local path takes none."""
    return dict(storage_options or {}) if "://" in url and not url.startswith("file://") else {}


# --- SQL --------------------------------------------------------------------------------------------------------------


def connect(results: Results) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with `images` and `detections` bound to the results' Parquet datasets.

    The caller closes it (`with connect(r) as con: ...`). Registration is lazy: nothing is read until a query runs,
    and then only the columns and row groups the query needs.
    """
    con = duckdb.connect()
    con.register(IMAGES_DIR, results.dataset(IMAGES_DIR))
    con.register(DETECTIONS_DIR, results.dataset(DETECTIONS_DIR))
    return con


def sql(
    results: Results | str, query: str, *, limit: int | None = None, storage_options: dict | None = None
) -> pa.Table:
    """Run DuckDB SQL over the tables `images` and `detections`; the result as a `pyarrow.Table`.

    `limit` caps the rows of any query (applied around it, so the query itself need not say LIMIT). A statement
    without a result (e.g. `SET threads = 2`) yields an empty table. Bad SQL raises `QueryError` (one line).
    """
    results = _results(results, storage_options)
    with connect(results) as con:
        try:
            rel = con.sql(query)
            if rel is None:
                return pa.table({})
            if limit is not None:
                rel = rel.limit(limit)
            return rel.to_arrow_table()
        except duckdb.Error as e:
            raise QueryError(f"SQL: {_one_line(str(e))}") from None


def _one_line(message: str) -> str:
    # DuckDB's messages point at the error with a `LINE 1: ...` excerpt and a row of carets: useless on one line.
    lines = [ln.strip() for ln in message.splitlines()]
    kept = [ln for ln in lines if ln and not ln.startswith("LINE ") and set(ln) != {"^"}]
    return "; ".join(kept)


def write_table(table: pa.Table, url: str, *, fmt: str, storage_options: dict | None = None) -> None:
    """Write `table` to `url` (local path or fsspec URL) as `csv` or `parquet`.

    CSV has no nested types: list and struct columns (`bbox`, `mask`) are written as JSON text.
    """
    if fmt not in FORMATS:
        raise QueryError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "parquet":
        _write_output(url, storage_options, lambda f: pq.write_table(table, f, compression="zstd"))
    else:
        _write_output(url, storage_options, lambda f: write_csv(table, f))


def _write_output(url: str, storage_options: dict | None, write: Callable[[BinaryIO], None]) -> None:
    """Open `url` (local path or fsspec URL; parent folders created) as a binary file and hand it to `write`.
    Storage failures become one `QueryError` line naming the URL."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **_options_for(url, storage_options))
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "wb") as f:
            write(f)
    except QueryError:
        raise
    except Exception as e:  # noqa: BLE001  (storage failures become one line)
        raise QueryError(f"output: {describe_storage_error(url, e)}") from None


def write_csv(table: pa.Table, f: BinaryIO) -> None:
    """CSV with a header row to a binary file object; list and struct cells as JSON text."""
    for i, field in enumerate(table.schema):
        if pa.types.is_nested(field.type):
            text = [None if v is None else json.dumps(v) for v in table.column(i).to_pylist()]
            table = table.set_column(i, field.name, pa.array(text, pa.string()))
    pacsv.write_csv(table, f)


# --- summary ----------------------------------------------------------------------------------------------------------


def summary(results: Results | str, *, storage_options: dict | None = None) -> dict[str, Any]:
    """Counts over the whole results folder, computed by DuckDB scans (memory does not grow with the archive).

    Keys: `url`, `complete` (whether `_SUCCESS.json` exists), `images`, `ok`, `errors`, `error_reasons` (the top 5
    kinds, i.e. the text before the first `:` as in the segment job's own summary, with counts), `detections`,
    `labels` (label_name → count, most frequent first), `score` (`min`, `q1`, `median`, `q3`, `max`, or None
    without detections), `score_histogram` (10 counts for the bins [0, 0.1), ..., [0.9, 1.0]), `run_ids`, `model_ids`.
    """
    results = _results(results, storage_options)
    with connect(results) as con:
        # One scan of each table for the grouped counts, one more for the quantiles.
        img_groups = con.sql(
            "SELECT status, split_part(error, ':', 1) AS reason, model_id, run_id, count(*) AS n "
            "FROM images GROUP BY ALL"
        ).fetchall()
        # Scores are float32: 0.9 is stored as 0.89999998. Rounded to float32's 6 decimals first, a score shown
        # as 0.9 falls in [0.9, 1.0] as a reader expects, not in [0.8, 0.9).
        det_groups = con.sql(
            f"SELECT label_name, floor(round(score::DOUBLE, 6) * {SCORE_BINS})::INTEGER "
            "AS bin, model_id, run_id, count(*) AS n FROM detections GROUP BY ALL"
        ).fetchall()
        stats = con.sql(
            "SELECT min(score), quantile_cont(score, [0.25, 0.5, 0.75]), max(score) FROM detections"
        ).fetchall()[0]

    reasons: dict[str, int] = {}
    labels: dict[str, int] = {}
    histogram = [0] * SCORE_BINS
    ok = errors = 0
    run_ids, model_ids = set(), set()
    for status, reason, model_id, run_id, n in img_groups:
        if status is None:  # else every row would count as an error of reason "unknown"
            raise missing_column(IMAGES_DIR, "status")
        if status == STATUS_OK:
            ok += n
        else:
            errors += n
            key = reason if reason is not None else "unknown"
            reasons[key] = reasons.get(key, 0) + n
        run_ids.add(run_id)
        model_ids.add(model_id)
    for label_name, bin_, model_id, run_id, n in det_groups:
        if label_name is None or bin_ is None:
            raise missing_column(DETECTIONS_DIR, "label_name" if label_name is None else "score")
        labels[label_name] = labels.get(label_name, 0) + n
        # Clamped here, not by SQL's least(), which ignores a null (a missing score would land in the top bin).
        # 1.0 belongs to the last bin; a negative score cannot come from the model, kept countable anyway.
        histogram[min(max(0, bin_), SCORE_BINS - 1)] += n
        run_ids.add(run_id)
        model_ids.add(model_id)
    lo, quartiles, hi = stats
    values = [] if lo is None else [round(float(v), 6) for v in (lo, *quartiles, hi)]
    score = dict(zip(("min", "q1", "median", "q3", "max"), values)) or None
    return {
        "url": results.url,
        "complete": results.success is not None,
        "images": ok + errors,
        "ok": ok,
        "errors": errors,
        "error_reasons": dict(_most_common(reasons)[:TOP_ERRORS]),
        "detections": sum(labels.values()),
        "labels": dict(_most_common(labels)),
        "score": score,
        "score_histogram": histogram,
        "run_ids": sorted(v for v in run_ids if v is not None),
        "model_ids": sorted(v for v in model_ids if v is not None),
    }


def _most_common(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))


def format_summary(s: dict[str, Any]) -> list[str]:
    """The lines `jobs/query.py summary` prints for a `summary()` dict."""
    out = [f"results: {s['url']}" + ("" if s["complete"] else "   (incomplete: no _SUCCESS.json yet)")]
    out.append(f"images: {s['images']} ({s['ok']} ok, {s['errors']} error)   detections: {s['detections']}")
    if s["error_reasons"]:
        out.append("top error reasons: " + ", ".join(f"{k}={v}" for k, v in s["error_reasons"].items()))
    if s["labels"]:
        out.append("detections per label:")
        width = max(len(str(k)) for k in s["labels"])
        out += [f"  {str(k):<{width}}  {v}" for k, v in s["labels"].items()]
    if s["score"]:
        q = s["score"]
        out.append(
            f"score: min {q['min']:.3f}  q1 {q['q1']:.3f}  median {q['median']:.3f}  q3 {q['q3']:.3f}  "
            f"max {q['max']:.3f}"
        )
        peak = max(s["score_histogram"]) or 1
        for i, n in enumerate(s["score_histogram"]):
            close = "]" if i == SCORE_BINS - 1 else ")"  # the last bin holds 1.0 itself
            bin_name = f"[{i / SCORE_BINS:.1f}, {(i + 1) / SCORE_BINS:.1f}{close}"
            out.append(f"  {bin_name} {n:>8}  {'#' * round(40 * n / peak)}")
    out.append(f"run: {', '.join(s['run_ids']) or '-'}   model: {', '.join(s['model_ids']) or '-'}")
    return out


# --- masks and images -------------------------------------------------------------------------------------------------


def image_row(results: Results, image_uri: str) -> dict:
    """The `images` row of `image_uri`; `QueryError` if the results hold no such input."""
    rows = results.table(IMAGES_DIR, filter=ds.field("image_uri") == image_uri).to_pylist()
    if not rows:
        raise QueryError(
            f"{image_uri}: not in the results at {results.url} (image_uri is as the job wrote it)"
        )
    _require(rows[:1], IMAGES_DIR, f" for {image_uri}")
    return rows[0]


def detections_of(results: Results, image_uri: str, *, min_score: float = 0.0) -> list[dict]:
    """Detection rows of one image with `score >= min_score`, in instance order (descending score).

    Rows without `instance` (results from another tool) are ordered by descending score instead; a required column
    that is missing is a `QueryError` naming it.
    """
    # All rows of the image, then the score filter: a missing `score` must be reported, not filtered away as null.
    rows = results.table(DETECTIONS_DIR, filter=ds.field("image_uri") == image_uri).to_pylist()
    _require(rows, DETECTIONS_DIR, f" for {image_uri}")
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
    results = _results(results, storage_options)
    image_row(results, image_uri)
    return [(row, decode_mask(row["mask"])) for row in detections_of(results, image_uri, min_score=min_score)]


def read_image_bytes(image_uri: str, *, storage_options: dict | None = None) -> bytes:
    """The encoded bytes behind an `image_uri`: a local path, an fsspec URL, or `<shard>.tar#<member>`."""
    # The shard's own name ends in `.tar`; the first `.tar#` splits it from the member (which may hold `#`).
    m = re.search(re.escape(".tar" + TAR_MEMBER_SEP), image_uri, flags=re.IGNORECASE)
    location = image_uri[: m.end() - len(TAR_MEMBER_SEP)] if m else image_uri
    opts = _options_for(location, storage_options)
    try:
        with fsspec.open(location, "rb", **opts) as f:
            if not m:
                return f.read()
            member = image_uri[m.end() :]
            with tarfile.open(fileobj=f, mode="r:") as tf:
                extracted = tf.extractfile(member)
                if extracted is None:
                    raise FileNotFoundError(f"{member} is not a file in the shard")
                return extracted.read()
    except KeyError:  # tarfile: no such member
        raise QueryError(f"{image_uri}: the shard holds no member {image_uri[m.end() :]!r}") from None
    except Exception as e:  # noqa: BLE001  (storage failures become one line)
        hint = " (relative paths are relative to where the segment job ran)" if "://" not in location else ""
        raise QueryError(f"cannot read the image: {describe_storage_error(image_uri, e)}{hint}") from None


def load_image(results: Results | str, image_uri: str, *, storage_options: dict | None = None) -> np.ndarray:
    """The upright RGB uint8 image `[H, W, 3]` the segment job saw, checked against its stored size."""
    results = _results(results, storage_options)
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
    results = _results(results, storage_options)
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
    results = _results(results, storage_options)
    picture, instances = draw_detections(results, image_uri, min_score=min_score)
    _write_output(output_path, results.storage_options, lambda f: picture.save(f, format="PNG"))
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
    results = _results(results, storage_options)
    done = []
    for rank, uri in enumerate(sample_uris(results, n) if uris is None else uris[:n]):
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", re.split(r"[/#]", uri)[-1]) or "image"
        target = posixpath.join(output_dir.rstrip("/"), f"{rank:03d}-{posixpath.splitext(name)[0]}.png")
        done.append(render(results, uri, target, min_score=min_score))
    return done
