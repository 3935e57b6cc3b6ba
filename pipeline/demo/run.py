"""The offline demo: from nothing to pictures on one machine, no internet.

generate a shapes archive → train (Ray Train) → segment the val images with the trained checkpoint (Ray Data actor
pool) → COCO AP of the results (pycocotools) → summary → overlay pictures.

Requires a connected Ray (`jobs/segment_archive.py --demo` starts an embedded one). Each step is the real job's
code path, called with validated configs; nothing here is demo-only logic but the order and the folder names.
Re-running is cheap: the archive is kept when it already has the expected size, the training run resumes (a finished
run returns at once with its best checkpoint), and the segment output is replaced.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

from pipeline.errors import JobError
from pipeline.segment.config import SegmentConfig
from pipeline.train.config import TrainConfig


def _has_split(shapes: str, split: str, n: int) -> bool:
    path = os.path.join(shapes, "annotations", f"instances_{split}.json")
    try:
        with open(path, encoding="utf-8") as f:
            return len(json.load(f)["images"]) == n
    except (OSError, ValueError, KeyError):
        return False


def ensure_shapes(shapes: str, *, train: int, val: int, seed: int, log: Callable[[str], None]) -> None:
    from pipeline.demo.shapes import make_shapes

    if _has_split(shapes, "train", train) and _has_split(shapes, "val", val):
        log(f"demo: using the shapes archive in {shapes}/ ({train} train, {val} val images)")
        return
    log(f"demo: generating a synthetic shapes archive in {shapes}/ ({train} train, {val} val images) ...")
    make_shapes(shapes, train=train, val=val, seed=seed)


def run_demo(
    train_cfg: TrainConfig,
    segment_cfg: SegmentConfig,
    *,
    shapes: str,
    renders: str,
    train_images: int,
    val_images: int,
    samples: int = 4,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every step; returns what a test or the caller may check (AP, counts, rendered files, timings)."""
    from pipeline.results.evaluate import evaluate_results, load_ground_truth
    from pipeline.results.open import open_results
    from pipeline.results.query import format_summary, render_sample, summary
    from pipeline.segment.run import segment
    from pipeline.train.run import run_training

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ensure_shapes(shapes, train=train_images, val=val_images, seed=0, log=log)
    timings["data_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    log(
        f"\ndemo: training {train_cfg.model.backbone} Mask R-CNN from scratch for {train_cfg.train.epochs} epochs "
        f"on {train_images} images with Ray Train ({train_cfg.scaling.num_workers} worker) ..."
    )
    trained = run_training(train_cfg)
    timings["train_s"] = time.perf_counter() - t
    for line in trained.lines():
        log(line)
    if not trained.best_checkpoint_url:
        raise JobError("demo: training produced no checkpoint")

    t = time.perf_counter()
    cfg = dataclasses.replace(
        segment_cfg, model=dataclasses.replace(segment_cfg.model, weights=trained.best_checkpoint_url)
    )
    log(f"\ndemo: segmenting {cfg.input.url} with that checkpoint through the Ray Data actor pool ...")
    seg = segment(cfg, log=log)
    timings["segment_s"] = time.perf_counter() - t
    for line in seg.lines():
        log(line)
    if not seg.complete:
        raise JobError(
            f"demo: {len(seg.units_incomplete)} unit(s) did not complete; run the demo again to resume"
        )

    t = time.perf_counter()
    annotations = f"{shapes}/annotations/instances_val.json"
    results = open_results(seg.output_url)
    log(f"\ndemo: COCO AP of {seg.output_url} against {annotations} (pycocotools):")
    ev = evaluate_results(results, load_ground_truth(annotations), verbose=True)
    timings["evaluate_s"] = time.perf_counter() - t

    log("")
    for line in format_summary(summary(results)):
        log(line)
    rendered = render_sample(results, samples, renders, min_score=0.5)
    timings["total_s"] = time.perf_counter() - t0
    log(f"\ndemo: {len(rendered)} overlay pictures (masks, boxes, label score >= 0.5) in {renders}/:")
    for r in rendered:
        log(f"  {r['output']}")
    log(
        f"demo: done in {timings['total_s'] / 60:.1f} min (training {timings['train_s'] / 60:.1f} min). "
        f"Query the results: python jobs/query.py {seg.output_url} summary"
    )
    log(ev.summary_line())
    return {
        "stats": ev.stats,
        "summary_line": ev.summary_line(),
        "images": seg.images,
        "checkpoint": trained.best_checkpoint_url,
        "rendered": rendered,
        "timings": timings,
    }
