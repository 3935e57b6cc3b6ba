"""DuckDB over a large results folder: per-label counts, a score filter and a by-image lookup on 1,000,000 rows.

    python bench/query.py [--rows 1000000] [--per-image 15] [--unit-size 64] [--repeats 3] [--layouts]

Generates a results folder the way the segment job writes one: `images/` and `detections/` with one Parquet file per
work unit of `--unit-size` images (as `pipeline.segment.writer.UnitWriter` encodes them: zstd, row groups of up to
`ROW_GROUP_ROWS` rows), rows in image order and score-descending within an image. Detections follow `pipeline.segment.schema.DETECTIONS_SCHEMA`: 20 COCO
labels, scores uniform in [0.5, 1) (the job's default threshold is 0.5), boxes and areas, and short real COCO RLE
strings of 640x480 masks (drawn from a pool, so `mask` compresses better than real data; no query here reads it).
Each query runs through `pipeline.results.sql.sql` (what `jobs/query.py sql` does: bind the two tables, then query);
the time is the median of `--repeats` runs after one untimed run.

`--layouts` also writes the same rows in other layouts (fewer, larger files; sorted by label or score; row-group
size) into side folders and times the same queries there: the measurements behind a proposal for `parquet_bytes`.

The last line is `per_label_counts_s=<x> score_filter_s=<y>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QUERIES = {
    "per_label_counts": "SELECT label_name, count(*) AS n FROM detections GROUP BY 1 ORDER BY n DESC",
    "score_filter": "SELECT count(*) FROM detections WHERE score > 0.9",
    "by_image": "SELECT instance, label_name, score, bbox, mask FROM detections WHERE image_uri = '{uri}'",
}
NUM_LABELS = 20
HEIGHT, WIDTH = 480, 640


def rle_pool(n: int, seed: int) -> list[str]:
    """Real COCO RLE strings of random ellipses in a 640x480 image (what short masks look like)."""
    import numpy as np
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    pool = []
    for _ in range(n):
        cy, cx = rng.uniform(0, HEIGHT), rng.uniform(0, WIDTH)
        ry, rx = rng.uniform(3, 60), rng.uniform(3, 60)
        mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)
        pool.append(mask_utils.encode(np.asfortranarray(mask))["counts"].decode("ascii"))
    return pool


def detections_table(image_uris: list[str], per_image, rng, pool: list[str]):
    """A `DETECTIONS_SCHEMA` table for these images: `per_image[i]` rows for image i, score-descending."""
    import numpy as np
    import pyarrow as pa

    from model.labels import COCO_CATEGORIES
    from pipeline.segment.schema import DETECTIONS_SCHEMA

    names = [n for n in COCO_CATEGORIES[1:] if n != "N/A"][:NUM_LABELS]
    label_ids = np.array([COCO_CATEGORIES.index(n) for n in names], dtype=np.int32)
    n = int(per_image.sum())
    parents = np.repeat(np.arange(len(image_uris)), per_image)
    instance = (
        np.concatenate([np.arange(k) for k in per_image]).astype(np.int32) if n else np.zeros(0, np.int32)
    )
    score = rng.uniform(0.5, 1.0, n).astype(np.float32)
    # Score-descending within each image, as the job writes them: sort by (image, -score).
    order = np.lexsort((-score, parents))
    score = score[order]
    which = rng.integers(0, NUM_LABELS, n)
    xy = rng.uniform(0, [WIDTH - 10, HEIGHT - 10], (n, 2))
    wh = rng.uniform(2, 120, (n, 2))
    bbox = np.concatenate([xy, np.minimum(wh, [WIDTH, HEIGHT] - xy)], axis=1).astype(np.float32)
    counts = [pool[k] for k in rng.integers(0, len(pool), n)]
    mask = pa.StructArray.from_arrays(
        [pa.array([[HEIGHT, WIDTH]] * n, pa.list_(pa.int32())), pa.array(counts, pa.string())],
        fields=list(DETECTIONS_SCHEMA.field("mask").type),
    )
    columns = {
        "image_uri": pa.array(image_uris, pa.string()).take(pa.array(parents)),
        "instance": instance,
        "label": label_ids[which],
        "label_name": pa.array(names, pa.string()).take(pa.array(which)),
        "score": score,
        "bbox": pa.FixedSizeListArray.from_arrays(bbox.reshape(-1), 4).cast(pa.list_(pa.float32())),
        "area": (wh[:, 0] * wh[:, 1] * 0.7).astype(np.int64),
        "mask": mask,
        "model_id": pa.array(["random-init:maskrcnn_resnet50_fpn:seed0"] * n, pa.string()),
        "run_id": pa.array(["20261121T000000-bench0"] * n, pa.string()),
    }
    return pa.table(columns).cast(DETECTIONS_SCHEMA)


def images_table(image_uris: list[str], per_image, unit_id: str):
    import pyarrow as pa

    from pipeline.segment.schema import IMAGES_SCHEMA

    n = len(image_uris)
    return pa.table(
        {
            "image_uri": image_uris,
            "status": ["ok"] * n,
            "error": [None] * n,
            "height": [HEIGHT] * n,
            "width": [WIDTH] * n,
            "num_detections": per_image.astype("int32"),
            "bytes": [150_000] * n,
            "source_version": [f'etag="{i:032x}"' for i in range(n)],
            "decode_ms": [5.0] * n,
            "infer_ms": [2500.0] * n,
            "unit_id": [unit_id] * n,
            "model_id": ["random-init:maskrcnn_resnet50_fpn:seed0"] * n,
            "run_id": ["20261121T000000-bench0"] * n,
        },
        schema=IMAGES_SCHEMA,
    )


def write_results(root: str, *, rows: int, per_image: float, unit_size: int, seed: int) -> tuple[int, str]:
    """Write a results folder of about `rows` detections as the job does (one file pair per unit).

    Returns (detection rows written, one image_uri to look up)."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.segment.schema import DETECTIONS_DIR, IMAGES_DIR
    from pipeline.segment.writer import ROW_GROUP_ROWS

    rng = np.random.default_rng(seed)
    pool = rle_pool(500, seed)
    os.makedirs(os.path.join(root, IMAGES_DIR))
    os.makedirs(os.path.join(root, DETECTIONS_DIR))
    written, unit, probe = 0, 0, ""
    while written < rows:
        unit_id = f"{unit:08d}"
        uris = [f"s3://archive/photos/{unit_id}/img_{k:04d}.jpg" for k in range(unit_size)]
        counts = rng.poisson(per_image, unit_size)
        # The last unit stops at exactly `rows`: each image keeps what still fits after the ones before it.
        before = np.cumsum(counts) - counts
        counts = np.clip(rows - written - before, 0, counts)
        dets = detections_table(uris, counts, rng, pool)
        for folder, table in ((IMAGES_DIR, images_table(uris, counts, unit_id)), (DETECTIONS_DIR, dets)):
            path = os.path.join(root, folder, f"part-{unit_id}.parquet")
            pq.write_table(table, path, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        if unit == 0:
            probe = uris[0]
        written += dets.num_rows
        unit += 1
    return written, probe


def time_queries(root: str, probe: str, repeats: int) -> dict[str, list[float]]:
    """Seconds per run of each query through `pipeline.results.sql.sql`, after one untimed run."""
    from pipeline.results.open import open_results
    from pipeline.results.sql import sql

    results = open_results(root)
    times: dict[str, list[float]] = {}
    for name, query in QUERIES.items():
        query = query.format(uri=probe)
        sql(results, query)  # untimed: the OS page cache and Python imports warm, as for any second query
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            sql(results, query)
            runs.append(time.perf_counter() - start)
        times[name] = runs
    return times


def check_answers(root: str, rows: int) -> None:
    from pipeline.results.sql import sql

    per_label = sql(root, QUERIES["per_label_counts"])
    assert per_label.num_rows == NUM_LABELS and sum(per_label.column("n").to_pylist()) == rows, per_label


def relayout(src: str, dst: str, *, files: int, sort_by: str | None, row_group: int | None) -> None:
    """The same rows in another layout: `files` files per table, optionally sorted, optionally smaller row groups."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from pipeline.segment.schema import DETECTIONS_DIR, IMAGES_DIR

    for folder in (IMAGES_DIR, DETECTIONS_DIR):
        table = ds.dataset(os.path.join(src, folder), format="parquet").to_table()
        if sort_by and folder == DETECTIONS_DIR:
            table = table.sort_by(sort_by)
        os.makedirs(os.path.join(dst, folder))
        step = -(-table.num_rows // files)
        for k in range(files):
            part = table.slice(k * step, step)
            kwargs = {"row_group_size": row_group} if row_group else {}
            pq.write_table(
                part, os.path.join(dst, folder, f"part-{k:06d}.parquet"), compression="zstd", **kwargs
            )


def folder_mib(path: str) -> float:
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(path) for n in ns) / 2**20


def report(label: str, root: str, times: dict[str, list[float]]) -> None:
    files = len(os.listdir(os.path.join(root, "detections")))
    cells = "  ".join(f"{name} {statistics.median(t):.3f}s (best {min(t):.3f})" for name, t in times.items())
    print(f"{label:<44} {files:5d} files {folder_mib(os.path.join(root, 'detections')):7.1f} MiB  {cells}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--per-image", type=float, default=15.0, help="mean detections per image (Poisson)")
    p.add_argument("--unit-size", type=int, default=2048, help="images per work unit, i.e. per Parquet file")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layouts", action="store_true", help="also time other file layouts (see the docstring)")
    args = p.parse_args()

    # ~300 MB with --layouts: removed at the end.
    with tempfile.TemporaryDirectory(prefix="bench-query-") as work:
        root = os.path.join(work, "results")
        start = time.perf_counter()
        rows, probe = write_results(
            root, rows=args.rows, per_image=args.per_image, unit_size=args.unit_size, seed=0
        )
        print(
            f"wrote {rows} detection rows as the job does ({args.unit_size} images per file, ~{args.per_image:g} "
            f"detections per image) in {time.perf_counter() - start:.1f}s; machine: {os.cpu_count()} CPUs"
        )
        check_answers(root, rows)
        times = time_queries(root, probe, args.repeats)
        report("as written by the job (one file per unit)", root, times)

        if args.layouts:
            unit_files = len(os.listdir(os.path.join(root, "detections")))
            by_score = [("score", "descending")]
            layouts = [
                ("compacted: 8 files", dict(files=8, sort_by=None, row_group=None)),
                ("compacted: 8 files, row groups of 64k rows", dict(files=8, sort_by=None, row_group=65536)),
                (
                    "compacted: 8 files, sorted by label_name",
                    dict(files=8, sort_by="label_name", row_group=65536),
                ),
                (
                    "compacted: 8 files, sorted by score desc",
                    dict(files=8, sort_by=by_score, row_group=65536),
                ),
                (
                    "unit files, rows sorted by score desc",
                    dict(files=unit_files, sort_by=by_score, row_group=None),
                ),
            ]
            for k, (label, kw) in enumerate(layouts):
                dst = os.path.join(work, f"layout-{k}")
                relayout(root, dst, **kw)
                report(label, dst, time_queries(dst, probe, args.repeats))

        label_s = statistics.median(times["per_label_counts"])
        score_s = statistics.median(times["score_filter"])
        print(f"per_label_counts_s={label_s:.3f} score_filter_s={score_s:.3f}")


if __name__ == "__main__":
    main()
