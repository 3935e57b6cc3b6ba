"""Inference speed of the architectures side by side in one run (default: maskrcnn_resnet50_fpn vs _v2): same
images, same size, same threads, same detections per image, on this machine's CPU.

    python bench/models.py [--images 8] [--height 480 --width 640] [--min-size 800] [--threads 2] [--repeats 3]
                           [--detections 100] [--architectures maskrcnn_resnet50_fpn,maskrcnn_resnet50_fpn_v2]

Each architecture is the segment job's model (`resolve_spec("none", architecture=...)` → the actor's `Segmenter`),
random weights: speed does not depend on the weights' values, only on how many boxes reach the mask head, which is
pinned here (score threshold 0, `--detections` kept per image, the job's default 100), so every architecture pastes
and encodes the same number of masks. Timed: `Segmenter.predict` on decoded images (model, masks pasted and
thresholded within their boxes, RLE), one image per call as the job runs on CPUs; decode and storage are not
architecture-dependent and are left out. The architectures take turns, `--repeats` rounds after one untimed warm-up
image each; the best round counts.

Accuracy is not measured here (random weights): torchvision's COCO figures are in ANCHORS.md; what each reaches on
the shapes data in one training budget comes from `jobs/train.py` runs of each `model.architecture` (BENCHMARKS.md).

The last line is `<arch>_vs_<first>=<x>` per further architecture: images/s ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._common import photo_like  # noqa: E402

DEFAULT_ARCHITECTURES = "maskrcnn_resnet50_fpn,maskrcnn_resnet50_fpn_v2"


def segmenter(architecture: str, *, min_size: int, detections: int, threads: int):
    from model.build import resolve_spec
    from pipeline.segment.infer import Segmenter

    spec = resolve_spec("none", architecture=architecture, min_size=min_size, max_size=min_size * 5 // 3)
    return Segmenter(spec=spec, score_threshold=0.0, max_detections=detections, threads=threads)


def timed_round(seg, images: list) -> tuple[float, float]:
    """(images/s, mean detections per image) of one pass over `images`, one image per `predict` call."""
    start = time.perf_counter()
    found = sum(len(seg.predict([image])[0]) for image in images)
    return len(images) / (time.perf_counter() - start), found / len(images)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--min-size", type=int, default=800, help="the model's short side (max side: 5/3 of it)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--detections", type=int, default=100, help="detections kept per image (all reach the mask head)"
    )
    p.add_argument(
        "--architectures", default=DEFAULT_ARCHITECTURES, help="comma-separated names; the first is the base"
    )
    args = p.parse_args()

    import numpy as np
    import torch

    names = [n.strip() for n in args.architectures.split(",") if n.strip()]
    rng = np.random.default_rng(0)
    images = [np.array(photo_like(rng, args.height, args.width)) for _ in range(args.images)]
    segs = {
        n: segmenter(n, min_size=args.min_size, detections=args.detections, threads=args.threads)
        for n in names
    }
    print(
        f"{args.images} photo-like images {args.width}x{args.height}, model short side {args.min_size}, "
        f"{args.threads} torch threads, {args.detections} detections kept per image, random weights; "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    for seg in segs.values():
        seg.predict(images[:1])  # warm-up: first-call allocations and kernel selection
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeats):
        for name, seg in segs.items():  # interleaved, so a machine that slows down slows every architecture
            rate, found = timed_round(seg, images)
            if name not in best or rate > best[name][0]:
                best[name] = (rate, found)
    for name, seg in segs.items():
        rate, found = best[name]
        params = sum(t.numel() for t in seg.model.parameters()) / 1e6
        print(
            f"{name}: {rate:.3f} images/s ({1000 / rate:.0f} ms/image), {found:.0f} detections/image, "
            f"{params:.1f} M parameters"
        )
    base = names[0]
    print(" ".join(f"{n}_vs_{base}={best[n][0] / best[base][0]:.2f}" for n in names[1:]))


if __name__ == "__main__":
    main()
