"""The COCO export (`jobs/query.py RESULTS export`) at 10^5 and 10^6 detections: peak RSS (flat) and detections/s.

    python bench/export.py [--detections 100000 1000000] [--per-image 15] [--unit-size 2048] [--repeats 3]
                           [--labelling-tool PYTHON]

For each size, a results folder is written the way the segment job writes one: one Parquet file pair per work unit of
`--unit-size` images, encoded by the job's `parquet_bytes`, with the output schemas; 20 COCO labels, scores in
[0.5, 1), masks drawn from a pool of real COCO RLEs of ellipses in 640x480 images (with their own box and area).
Each is exported by `pipeline.results.export.export_coco` (what the CLI runs) `--repeats` times, each in a fresh
Python process, so that each run's peak RSS (VmHWM: imports included, ~130 MiB of it) is its own; the medians are
reported. The figures: peak RSS per size and the ratio largest / smallest (target: within 1.10; what the export holds
grows with the images, ~80 bytes each, not with the detections; the allocators' retention adds some run-to-run
noise), and detections/s of the export alone (target >= 20,000/s). The smallest export is also loaded by
pycocotools' `COCO()`, its counts and summed area checked.

`--labelling-tool PYTHON`: also load the smallest export with Datumaro (the dataset library CVAT imports COCO through),
run by PYTHON, the interpreter of a separate virtual environment (Datumaro is heavy: it stays out of the project's
environment and of CI):

    python3 -m venv /tmp/datumaro-venv && /tmp/datumaro-venv/bin/pip install datumaro
    python bench/export.py --detections 20000 --labelling-tool /tmp/datumaro-venv/bin/python

The last line is `peak_rss_ratio=<x> detections_per_s=<y>` (the rate of the largest size).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

IMAGES_ROOT = (
    "s3://archive/photos"  # images are s3://archive/photos/<unit>/img_<k>.jpg; file_name <unit>/img_<k>.jpg
)
HEIGHT, WIDTH = 480, 640
NUM_LABELS = 20

# Run by the --labelling-tool interpreter. Datumaro wants COCO's layout: `annotations/instances_<subset>.json` beside an
# `images/` folder (the images themselves are not needed to read the annotations).
DATUMARO_CHECK = """
import json, os, sys, datumaro as dm
src, expected = sys.argv[1], json.loads(sys.argv[2])
os.makedirs(os.path.join(os.path.dirname(os.path.dirname(src)), "images", "default"), exist_ok=True)
ds = dm.Dataset.import_from(src, "coco_instances")
masks = [a for item in ds for a in item.annotations if a.type == dm.AnnotationType.mask]
got = {
    "images": len(ds),
    "annotations": len(masks),
    "categories": len(ds.categories()[dm.AnnotationType.label]),
    "area": int(sum(int(a.get_area()) for a in masks)),
}
print(json.dumps({"datumaro": dm.__version__, **got}))
sys.exit(0 if got == expected else 1)
"""


def mask_pool(n: int, rng) -> tuple[list[str], list[list[float]], list[int]]:
    """`n` real COCO RLEs of random ellipses in a 640x480 image: (counts, bbox, area) of each."""
    import numpy as np
    from pycocotools import mask as mask_utils

    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    counts, boxes, areas = [], [], []
    for _ in range(n):
        cy, cx, ry, rx = rng.uniform(0, HEIGHT), rng.uniform(0, WIDTH), rng.uniform(3, 60), rng.uniform(3, 60)
        rle = mask_utils.encode(
            np.asfortranarray((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8))
        )
        counts.append(rle["counts"].decode("ascii"))
        boxes.append([float(v) for v in mask_utils.toBbox(rle)])
        areas.append(int(mask_utils.area(rle)))
    return counts, boxes, areas


def table_of(columns: dict, schema):
    """A table of `schema` from these columns; the schema's other columns are null (as in older results)."""
    import pyarrow as pa

    n = len(next(iter(columns.values())))
    return pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in schema}).cast(schema)


def write_results(root: str, *, detections: int, per_image: float, unit_size: int, seed: int) -> None:
    """A results folder of exactly `detections` rows (a Poisson number per image), one file pair per unit."""
    import numpy as np
    import pyarrow as pa

    from model.labels import COCO_CATEGORIES
    from pipeline.segment.schema import DETECTIONS_SCHEMA, IMAGES_SCHEMA
    from pipeline.segment.storage import Output
    from pipeline.segment.writer import parquet_bytes

    rng = np.random.default_rng(seed)
    counts, boxes, areas = mask_pool(200, rng)
    counts, boxes, areas = (
        pa.array(counts),
        pa.array(boxes, pa.list_(pa.float32())),
        pa.array(areas, pa.int64()),
    )
    names = [name for name in COCO_CATEGORIES[1:] if name != "N/A"][:NUM_LABELS]
    label_ids = np.array([COCO_CATEGORIES.index(name) for name in names], dtype=np.int32)
    out, written, unit = Output(root), 0, 0
    while written < detections:
        unit_id = f"{unit:08d}"
        uris = [f"{IMAGES_ROOT}/{unit_id}/img_{k:04d}.jpg" for k in range(unit_size)]
        per = rng.poisson(per_image, unit_size)
        per = np.clip(detections - written - (np.cumsum(per) - per), 0, per)  # stop at exactly `detections`
        n = int(per.sum())
        which, masks = pa.array(rng.integers(0, NUM_LABELS, n)), pa.array(rng.integers(0, len(counts), n))
        dets = {
            "image_uri": pa.array(uris).take(pa.array(np.repeat(np.arange(unit_size), per))),
            "instance": np.concatenate([np.arange(k) for k in per]).astype(np.int32),
            "label": pa.array(label_ids).take(which),
            "label_name": pa.array(names).take(which),
            "score": np.sort(rng.uniform(0.5, 1.0, n).astype(np.float32))[::-1].copy(),
            "bbox": boxes.take(masks),
            "area": areas.take(masks),
            "mask": pa.StructArray.from_arrays(
                [pa.array([[HEIGHT, WIDTH]] * n, pa.list_(pa.int32())), counts.take(masks)],
                fields=list(DETECTIONS_SCHEMA.field("mask").type),
            ),
        }
        images = {
            "image_uri": uris,
            "status": ["ok"] * unit_size,
            "height": [HEIGHT] * unit_size,
            "width": [WIDTH] * unit_size,
            "num_detections": per.astype(np.int32),
        }
        out.write_bytes(f"images/part-{unit_id}.parquet", parquet_bytes(table_of(images, IMAGES_SCHEMA)))
        out.write_bytes(
            f"detections/part-{unit_id}.parquet", parquet_bytes(table_of(dets, DETECTIONS_SCHEMA))
        )
        written, unit = written + n, unit + 1


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM). Not `ru_maxrss`: Linux carries the parent's peak into a child it execs."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 1024


def export_in_this_process(results: str, out: str) -> dict:
    """The child's side: export `results` to `out`; its time and memory."""
    from pipeline.results.export import export_coco
    from pipeline.results.open import open_results

    r = open_results(results)
    before = peak_rss_mib()  # the imports and the opened folder
    start = time.perf_counter()
    done = export_coco(r, out, images_root=IMAGES_ROOT)
    seconds = time.perf_counter() - start
    return {
        "images": done.images,
        "annotations": done.annotations,
        "categories": done.categories,
        "seconds": seconds,
        "rss_before_mib": before,
        "peak_rss_mib": peak_rss_mib(),
        "bytes": os.path.getsize(out),
    }


def export_in_child(results: str, out: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", results, out]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"export failed:\n{proc.stderr}")
    return json.loads(proc.stdout.splitlines()[-1])


def check_with_pycocotools(path: str, results: str) -> dict:
    """Load the export with pycocotools; assert its counts and summed area equal the results'. Returns them."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    from pipeline.results.sql import sql

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints its progress
        coco = COCO(path)
    want = sql(
        results,
        "SELECT (SELECT count(*) FROM images WHERE status = 'ok') AS images, count(*) AS annotations, "
        "count(DISTINCT label_name) AS categories, sum(area)::BIGINT AS area FROM detections",
    ).to_pylist()[0]
    got = {
        "images": len(coco.getImgIds()),
        "annotations": len(coco.getAnnIds()),
        "categories": len(coco.getCatIds()),
        "area": sum(a["area"] for a in coco.dataset["annotations"]),
    }
    assert got == want, (got, want)
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detections", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--per-image", type=float, default=15.0, help="mean detections per image (Poisson)")
    p.add_argument("--unit-size", type=int, default=2048, help="images per work unit, i.e. per Parquet file")
    p.add_argument("--repeats", type=int, default=3, help="exports per size; the medians are reported")
    p.add_argument(
        "--labelling-tool", metavar="PYTHON", help="an interpreter with datumaro installed (docstring)"
    )
    p.add_argument("--child", nargs=2, metavar=("RESULTS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(export_in_this_process(*args.child)))
        return

    sizes = sorted(args.detections)
    measured = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as work:
        for n in sizes:
            results = os.path.join(work, f"results-{n}")
            start = time.perf_counter()
            write_results(results, detections=n, per_image=args.per_image, unit_size=args.unit_size, seed=0)
            made = time.perf_counter() - start
            out = os.path.join(work, f"export-{n}", "annotations", "instances_default.json")
            runs = [export_in_child(results, out) for _ in range(args.repeats)]
            got = {
                k: statistics.median(r[k] for r in runs)
                for k in ("seconds", "peak_rss_mib", "rss_before_mib")
            }
            got.update({k: runs[0][k] for k in ("images", "annotations", "bytes")})
            assert got["annotations"] == n, (got, n)
            measured.append(got)
            peaks = ", ".join(f"{r['peak_rss_mib']:.1f}" for r in runs)
            print(
                f"{n:>9} detections {got['images']:>7} images (written in {made:.1f}s): export {got['seconds']:6.2f}s"
                f" = {n / got['seconds']:>9,.0f} detections/s, {got['bytes'] / 2**20:6.1f} MiB of JSON; peak RSS "
                f"{got['peak_rss_mib']:6.1f} MiB (runs: {peaks}; {got['rss_before_mib']:.1f} before the export)",
                flush=True,
            )
            if n != sizes[0]:
                os.remove(out)  # only the smallest export is checked further

        smallest = os.path.join(work, f"export-{sizes[0]}", "annotations", "instances_default.json")
        expected = check_with_pycocotools(smallest, os.path.join(work, f"results-{sizes[0]}"))
        print(f"pycocotools COCO() loads the {sizes[0]}-detection export: {expected} as in the results")
        if args.labelling_tool:
            cmd = [args.labelling_tool, "-c", DATUMARO_CHECK, smallest, json.dumps(expected)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=work)
            if proc.returncode != 0:
                sys.exit(
                    f"datumaro did not load the export as expected ({expected}):\n{proc.stdout}{proc.stderr}"
                )
            print(f"datumaro loads it, the same counts and summed mask area: {proc.stdout.strip()}")

    peaks = [got["peak_rss_mib"] for got in measured]
    print(
        f"peak RSS {' / '.join(f'{v:.1f}' for v in peaks)} MiB for {' / '.join(map(str, sizes))} detections"
    )
    print(
        f"peak_rss_ratio={max(peaks) / min(peaks):.3f} detections_per_s={sizes[-1] / measured[-1]['seconds']:.0f}"
    )


if __name__ == "__main__":
    main()
