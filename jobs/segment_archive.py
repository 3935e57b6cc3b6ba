"""Segment an image archive with Mask R-CNN on Ray; results as Parquet.

    python jobs/segment_archive.py --input URL --output URL [--config FILE.yaml] [--set dotted.key=value ...]
    python jobs/segment_archive.py --demo      # offline: generate a shapes archive, segment it on an embedded Ray

On a cluster:  ray job submit --working-dir . -- python jobs/segment_archive.py --input s3://... --output s3://...
Every config key is documented in configs/segment_archive.yaml. Exit status: 0 when the job completed (bad images
are rows with status=error), 1 when it could not run or complete, 2 for a bad configuration.
"""

from __future__ import annotations

import argparse
import os

import _cli  # noqa: F401  (puts the repo root on sys.path)
from _cli import EXIT_FAILED, EXIT_OK, init_ray, load_config_dict, run_main

from pipeline.config import segment_config

DEMO_DIR = "demo"
# The embedded default: a generated archive, random weights (no download possible offline), small sizes for 2 CPUs.
DEMO_DEFAULTS = {
    "input": {"url": f"{DEMO_DIR}/shapes/val"},
    "output": {"url": f"{DEMO_DIR}/results", "mode": "overwrite"},
    "model": {
        "weights": "none",
        "min_size": 256,
        "max_size": 384,
        "score_threshold": 0.05,
        "max_detections": 20,
    },
    "progress_interval_s": 5,
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="fsspec URL: folder/prefix, glob, manifest file or .tar shard(s)")
    p.add_argument("--output", help="fsspec URL of the results folder/prefix")
    p.add_argument("--config", help="YAML file (see configs/segment_archive.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--ray-address", help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded Ray)")
    p.add_argument("--demo", action="store_true", help="generate a synthetic archive and segment it, offline")
    return p


def main() -> int:
    args = get_args_parser().parse_args()
    data = load_config_dict(args.config, args.set, base=DEMO_DEFAULTS if args.demo else None)
    if args.input:
        data.setdefault("input", {})["url"] = args.input
    if args.output:
        data.setdefault("output", {})["url"] = args.output
    cfg = segment_config(data)  # every key checked before any work starts
    if args.demo and cfg.input.url == DEMO_DEFAULTS["input"]["url"]:
        _make_demo_archive(cfg.input.url)

    from pipeline.run import segment

    init_ray(args.ray_address)
    summary = segment(cfg)
    print("\n".join(summary.lines()))
    if args.demo:
        _print_sample(summary.output_url)
    if not summary.complete:
        print(
            f"error: {len(summary.units_incomplete)} unit(s) did not complete "
            f"({', '.join(summary.units_incomplete[:5])}); run the same command again to resume"
        )
        return EXIT_FAILED
    return EXIT_OK


def _make_demo_archive(url: str) -> None:
    from pipeline.shapes import make_shapes

    if not os.path.isdir(url):
        print(f"demo: generating a synthetic shapes archive under {os.path.dirname(url)}/ ...")
        make_shapes(os.path.dirname(url), train=0, val=12, seed=0)


def _print_sample(output_url: str) -> None:
    import pyarrow.dataset as pads

    dets = pads.dataset(f"{output_url}/detections", format="parquet").to_table()
    print(f"\nfirst detections of {dets.num_rows} (mask = COCO RLE, decode with pycocotools.mask.decode):")
    for row in dets.slice(0, 5).to_pylist():
        box = ", ".join(f"{v:.1f}" for v in row["bbox"])
        print(
            f"  {row['image_uri']}  #{row['instance']} {row['label_name']} score={row['score']:.3f} "
            f"bbox=[{box}] area={row['area']} rle={row['mask']['counts'][:24]}..."
        )


if __name__ == "__main__":
    run_main(main)
