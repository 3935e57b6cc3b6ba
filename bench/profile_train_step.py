"""Where a training step's CPU time goes: torch.profiler over a few steps of the demo's model, no Ray.

    python bench/profile_train_step.py --data demo/shapes [--min-size 128] [--rois 128] [--steps 3]

Builds the model the demo trains (ResNet-18 FPN, 64-channel FPN/heads, 256-wide box head; `model/train_loop.py`'s
builder), runs two warm-up steps and `--steps` profiled steps of 4 images with AdamW on 2 torch threads, and prints
images/s and the operators by total CPU time. How the demo's 64 RoIs per image were chosen (BENCHMARKS.md, "How the
demo was chosen").
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from model.data import CocoInstances, collate  # noqa: E402
from model.train_loop import build_for_training  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="demo/shapes", help="a shapes archive (jobs/make_shapes.py)")
    p.add_argument("--min-size", type=int, default=128)
    p.add_argument("--rois", type=int, default=128, help="RoIs sampled per image for the box/mask heads")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = dict(
        weights="none",
        backbone="resnet18",
        min_size=[args.min_size],
        max_size=args.min_size * 5 // 3,
        trainable_backbone_layers=None,
        rois_per_image=args.rois,
        positive_fraction=0.25,
        fpn_channels=64,
        box_head_size=256,
    )
    ds = CocoInstances(
        annotations_url=f"{args.data}/annotations/instances_train.json",
        images_url=f"{args.data}/train",
        storage_options={},
        train=True,
        flip_prob=0.5,
    )
    model = build_for_training(cfg, ds.index.num_classes)
    model.train()
    n = 2 + 2 * args.steps
    batches = [collate([ds[i * 4 + j] for j in range(4)]) for i in range(n)]
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)

    def step(batch) -> None:
        images, targets = batch
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    for b in batches[:2]:
        step(b)
    t = time.perf_counter()
    for b in batches[2 : 2 + args.steps]:
        step(b)
    print(
        f"{4 * args.steps / (time.perf_counter() - t):.2f} images/s ({args.min_size} px, {args.rois} RoIs/image)"
    )
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[2 + args.steps :]:
            step(b)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
