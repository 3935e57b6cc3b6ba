"""Segment an image archive with Mask R-CNN on Ray; results as Parquet.

    python jobs/segment_archive.py --input URL --output URL [--config FILE.yaml] [--set dotted.key=value ...]
    python jobs/segment_archive.py --demo      # offline, from nothing to pictures on an embedded Ray (~5 min, 2 CPUs):
                                               # generate shapes, train, segment with the checkpoint, evaluate, report

On a cluster:  ray job submit --working-dir . -- python jobs/segment_archive.py --input s3://... --output s3://...
Every config key is documented in configs/segment_archive.yaml. Exit status: 0 when the job completed (bad images
are rows with status=error), 1 when it could not run or complete, 2 for a bad configuration.
"""

from __future__ import annotations

import argparse
import os

import _cli  # noqa: F401  (puts the repo root on sys.path)
from _cli import (
    EXIT_OK,
    ROOT,
    add_output_args,
    deep_copy,
    init_ray,
    live_progress,
    load_config_dict,
    merge,
    run_main,
    setup_output,
)

from pipeline.errors import JobError
from pipeline.segment.config import segment_config

DEMO_DIR = "demo"
# 700 training images seen 4 times: mask AP 0.45 in ~5 minutes here; 600 seen 4 times reached 0.35 (BENCHMARKS.md).
DEMO_TRAIN_IMAGES, DEMO_VAL_IMAGES = 700, 100
# The generated archive (make_shapes' arguments): the preset's data, images of up to 192x256, 1-6 shapes of four
# classes. Larger, fewer shapes learned no faster per image (BENCHMARKS.md, "How the demo was chosen").
DEMO_DATA = {"seed": 0, "size": [192, 256], "max_shapes": 6, "radius": [0.08, 0.28]}
DEMO_TRAIN_CONFIG = os.path.join(ROOT, "configs", "train_cpu_small.yaml")
# The embedded default: the generated archive's val split, segmented with the checkpoint the demo trains (its sizes
# come from the checkpoint); a low score threshold because the results are scored with COCO AP.
DEMO_DEFAULTS = {
    "input": {"url": f"{DEMO_DIR}/shapes/val"},
    "output": {"url": f"{DEMO_DIR}/results", "mode": "overwrite"},
    "model": {"weights": "none", "score_threshold": 0.05},
    "progress_interval_s": 10,
}
# The CPU preset (14 epochs of SGD at 192 px, ~22 min, mask AP 0.65) compressed into the demo's ~6 minutes on
# 2 cores: 4 epochs of AdamW, whose per-parameter steps learn ~3x the AP of SGD's in so few steps; 128 px and 64 RoIs
# per image (the RoIAlign backward pass, single-threaded on CPU, was a quarter of a step at 128); bfloat16 autocast
# (`train.amp`, 1.35x fp32's images/s on CPUs with AVX-512) and 500 RPN proposals per image instead of 2,000 (1.18x;
# the images hold 1-6 shapes; both: 1.58x). Measured choices: BENCHMARKS.md, "How the demo was chosen".
DEMO_TRAIN_OVERRIDES = {
    "data": {
        "train": {
            "annotations": f"{DEMO_DIR}/shapes/annotations/instances_train.json",
            "images": f"{DEMO_DIR}/shapes/train",
        },
        "val": {
            "annotations": f"{DEMO_DIR}/shapes/annotations/instances_val.json",
            "images": f"{DEMO_DIR}/shapes/val",
        },
    },
    "model": {
        "min_size": [128],
        "max_size": 214,
        "rois_per_image": 64,
        "rpn_proposals_train": 500,
        "rpn_proposals_test": 300,
    },
    "train": {
        "epochs": 4,
        "eval_every": 4,
        "amp": True,
        "optimizer": "adamw",
        "lr": 0.001,
        "weight_decay": 0.05,
        "warmup_iters": 50,
        "lr_steps": [0.75, 0.92],
    },
    "run": {"name": "demo", "storage_path": f"{DEMO_DIR}/runs"},
}


def demo_defaults() -> dict:
    """DEMO_DEFAULTS, segmenting in bfloat16 where this CPU has oneDNN's kernels for it (as the demo trains)."""
    from model.precision import cpu_has_bf16

    defaults = deep_copy(DEMO_DEFAULTS)
    defaults["model"]["precision"] = "bf16" if cpu_has_bf16() else "fp32"
    return defaults


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="fsspec URL: folder/prefix, glob, manifest file or .tar shard(s)")
    p.add_argument("--output", help="fsspec URL of the results folder/prefix")
    p.add_argument("--config", help="YAML file (see configs/segment_archive.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument(
        "--ray-address",
        help="Ray cluster to join: host:port or ray://host:port; `auto` joins the cluster recorded on this machine "
        "by `ray start` (default: an embedded local Ray; under `ray job submit`, $RAY_ADDRESS is used)",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="offline demo: generate a shapes archive, train on it, segment it with the checkpoint, evaluate, render",
    )
    p.add_argument(
        "--train-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --demo: override a key of the demo's training config (configs/train_cpu_small.yaml)",
    )
    p.add_argument(
        "--demo-images",
        nargs=2,
        type=int,
        default=[DEMO_TRAIN_IMAGES, DEMO_VAL_IMAGES],
        metavar=("TRAIN", "VAL"),
        help=f"with --demo: images to generate (default {DEMO_TRAIN_IMAGES} {DEMO_VAL_IMAGES})",
    )
    add_output_args(p)
    return p


def main() -> int:
    args = get_args_parser().parse_args()
    data = load_config_dict(args.config, args.set, base=demo_defaults() if args.demo else None)
    if args.input:
        data.setdefault("input", {})["url"] = args.input
    if args.output:
        data.setdefault("output", {})["url"] = args.output
    cfg = segment_config(data)  # every key checked before any work starts
    if args.demo:
        return _demo(cfg, args)
    setup_output("segment_archive", verbose=args.verbose)

    from pipeline.segment.run import segment

    # Ray starts (or is joined) only when there is work for it: a finished run's re-run never waits for it.
    summary = segment(cfg, connect=lambda: init_ray(args.ray_address), live=live_progress())
    print("\n".join(summary.lines()))
    if not summary.complete:
        raise JobError(
            f"{len(summary.units_incomplete)} unit(s) did not complete "
            f"({', '.join(summary.units_incomplete[:5])}); run the same command again to resume"
        )
    return EXIT_OK


def _demo(cfg, args) -> int:
    from pipeline.demo.run import run_demo
    from pipeline.train.config import train_config

    preset = load_config_dict(DEMO_TRAIN_CONFIG, [])
    merge(preset, deep_copy(DEMO_TRAIN_OVERRIDES))
    train_data = load_config_dict(None, args.train_set, base=preset)  # the user's --train-set wins
    train_cfg = train_config(train_data)  # checked before any work, like the segment config
    setup_output("demo", verbose=args.verbose, log_dir=f"{DEMO_DIR}/logs")
    init_ray(args.ray_address)
    run_demo(
        train_cfg,
        cfg,
        shapes=f"{DEMO_DIR}/shapes",
        renders=f"{DEMO_DIR}/renders",
        report=f"{DEMO_DIR}/report",
        data={**DEMO_DATA, "train": args.demo_images[0], "val": args.demo_images[1]},
        live=live_progress(),
    )
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
