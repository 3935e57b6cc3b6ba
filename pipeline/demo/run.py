"""The offline demo: from nothing to pictures on one machine, no internet.

[1/5] generate a shapes archive → [2/5] train (Ray Train) → [3/5] segment the val images with the trained checkpoint
(Ray Data actor pool) → [4/5] COCO AP of the results (pycocotools) → [5/5] overlay pictures and an HTML run report.

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

# How the archive was generated: a demo whose data settings changed regenerates it.
PARAMS_FILE = "_params.json"


def _same_archive(shapes: str, params: dict) -> bool:
    try:
        with open(os.path.join(shapes, PARAMS_FILE), encoding="utf-8") as f:
            return json.load(f) == params
    except (OSError, ValueError):
        return False


def ensure_shapes(shapes: str, *, params: dict, log: Callable[[str], None]) -> None:
    """Generate the archive `make_shapes(shapes, **params)` describes, unless it is already there."""
    from pipeline.demo.shapes import make_shapes

    what = f"{shapes}/ ({params['train']} train, {params['val']} val images)"
    if _same_archive(shapes, params):
        log(f"[1/5] data: the shapes archive in {what}")
        return
    log(f"[1/5] data: generating a synthetic shapes archive in {what} ...")
    make_shapes(shapes, **params)
    with open(os.path.join(shapes, PARAMS_FILE), "w", encoding="utf-8") as f:
        json.dump(params, f)  # written last: an interrupted generation is redone


def run_demo(
    train_cfg: TrainConfig,
    segment_cfg: SegmentConfig,
    *,
    shapes: str,
    renders: str,
    report: str,
    data: dict,
    samples: int = 4,
    min_score: float = 0.5,
    log: Callable[[str], None] = print,
    live: bool = False,
) -> dict:
    """Run every step; returns what a test or the caller may check (AP, counts, rendered files, timings).

    `data`: `make_shapes`' keyword arguments (`train`, `val` image counts, `seed`, `size`, ...).

    Prints one screen: a header per step ("[2/5] training ..."), the steps' own short summaries, progress bars
    (`live`) or periodic lines, and last the AP line.
    """
    from pipeline.results.evaluate import evaluate_results, load_ground_truth
    from pipeline.results.open import open_results
    from pipeline.results.render import render_sample
    from pipeline.results.report import top_images, write_report
    from pipeline.segment.run import segment
    from pipeline.train.run import run_training

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ensure_shapes(shapes, params=data, log=log)
    timings["data_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    m, o = train_cfg.model, train_cfg.train
    log(
        f"\n[2/5] training: {m.architecture} from scratch on {data['train']} images, {o.epochs} epoch{'' if o.epochs == 1 else 's'} "
        f"at {max(m.min_size)} px{', mixed precision' if o.amp else ''} (Ray Train, {train_cfg.scaling.num_workers} worker) ..."
    )
    # The AP tables would fill the screen; step 4 prints the AP that matters, of the job's own results.
    trained = run_training(train_cfg, log=log, live=live, tables=False)
    timings["train_s"] = time.perf_counter() - t
    for line in trained.lines()[1:]:
        log(line)
    if not trained.best_checkpoint_url:
        raise JobError("demo: training produced no checkpoint")

    t = time.perf_counter()
    cfg = dataclasses.replace(
        segment_cfg, model=dataclasses.replace(segment_cfg.model, weights=trained.best_checkpoint_url)
    )
    log(f"\n[3/5] segmenting {cfg.input.url} with that checkpoint (the segment job: Ray Data actor pool) ...")
    seg = segment(cfg, log=log, live=live)
    timings["segment_s"] = time.perf_counter() - t
    for line in seg.lines():
        if line.startswith(("images:", "throughput:", "results:")):
            log(line)
    if not seg.complete:
        raise JobError(
            f"demo: {len(seg.units_incomplete)} unit(s) did not complete; run the demo again to resume"
        )

    t = time.perf_counter()
    annotations = f"{shapes}/annotations/instances_val.json"
    results = open_results(seg.output_url)
    log(f"\n[4/5] COCO AP of {seg.output_url} against {annotations} (pycocotools):")
    ev = evaluate_results(results, load_ground_truth(annotations), verbose=False)
    for name, kind in (("mask", "segm"), ("box", "bbox")):
        v = ev.stats[kind]
        log(f"  {name:4} AP {v[0]:.3f}   AP50 {v[1]:.3f}   AP75 {v[2]:.3f}")
    timings["evaluate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    log(
        f"\n[5/5] report: overlays of the images with the most confident detections (score >= {min_score}) ..."
    )
    best, _ = top_images(results, samples, min_score=min_score)  # the report's own choice, by best score
    rendered = render_sample(
        results, samples, renders, min_score=min_score, uris=[b["image_uri"] for b in best]
    )
    page = write_report(results, report, min_score=min_score, log=lambda _line: None)
    timings["report_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    log(f"  {len(rendered)} overlay pictures in {renders}/")
    log(f"  run report (open it in a browser): {page}")
    log(
        f"\ndemo: done in {timings['total_s'] / 60:.1f} min (training {timings['train_s'] / 60:.1f} min). "
        f"Query the results: python jobs/query.py {seg.output_url} summary"
    )
    log(ev.summary_line())
    return {
        "stats": ev.stats,
        "summary_line": ev.summary_line(),
        "images": seg.images,
        "checkpoint": trained.best_checkpoint_url,
        "rendered": rendered,
        "report": page,
        "timings": timings,
    }
