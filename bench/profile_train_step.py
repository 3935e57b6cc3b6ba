"""Where a training step's CPU time goes: torch.profiler over a few steps of the demo's model, no Ray.

    python bench/profile_train_step.py --data demo/shapes [--min-size 128] [--rois 128] [--steps 3]
        [--amp] [--rpn-proposals N]
    python bench/profile_train_step.py --data demo/shapes --rois 64 --compare [--steps 8]

Builds the model the demo trains (ResNet-18 FPN, 64-channel FPN/heads, 256-wide box head; `model/train_loop.py`'s
builder), runs two warm-up steps and `--steps` profiled steps of 4 images with AdamW on 2 torch threads, and prints
images/s and the operators by total CPU time. `--amp`: bfloat16 autocast, as `train.amp` on a CPU.
`--compare` times fp32 and bfloat16 at torchvision's 2,000 RPN proposals and at 500, side by side on the same batches
(two rounds, best of each), and prints each one's images/s and its ratio to fp32 at 2,000. How the demo's settings
were chosen (BENCHMARKS.md, "How the demo was chosen").
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench._common import train_step  # noqa: E402
from model.data import CocoInstances, collate  # noqa: E402
from model.train_loop import build_for_training  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="demo/shapes", help="a shapes archive (jobs/make_shapes.py)")
    p.add_argument("--min-size", type=int, default=128)
    p.add_argument("--rois", type=int, default=128, help="RoIs sampled per image for the box/mask heads")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (train.amp on a CPU)")
    p.add_argument("--rpn-proposals", type=int, default=2000, help="RPN proposals per image while training")
    p.add_argument("--compare", action="store_true", help="fp32/bf16 x 2000/500 proposals side by side")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.compare:
        compare(args)
        return
    model, batches = setup(args, args.rpn_proposals, 2 + 2 * args.steps)
    step = make_step(model, amp=args.amp)
    for b in batches[:2]:
        step(b)
    t = time.perf_counter()
    for b in batches[2 : 2 + args.steps]:
        step(b)
    print(
        f"{4 * args.steps / (time.perf_counter() - t):.2f} images/s ({args.min_size} px, {args.rois} RoIs/image, "
        f"{'bf16' if args.amp else 'fp32'}, {args.rpn_proposals} RPN proposals)"
    )
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[2 + args.steps :]:
            step(b)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))


def compare(args) -> None:
    variants = [(False, 2000), (True, 2000), (False, 500), (True, 500)]
    best: dict[tuple, float] = {}
    setups = {n: setup(args, n, 2 + args.steps) for n in (2000, 500)}
    for _ in range(2):  # two rounds, interleaved: a slow moment of the machine does not land on one variant
        for amp, n in variants:
            model, batches = setups[n]
            state = {k: v.clone() for k, v in model.state_dict().items()}
            step = make_step(model, amp=amp)
            for b in batches[:2]:
                step(b)
            t = time.perf_counter()
            for b in batches[2:]:
                step(b)
            rate = 4 * args.steps / (time.perf_counter() - t)
            best[(amp, n)] = max(best.get((amp, n), 0.0), rate)
            model.load_state_dict(state)  # every variant and round starts from the same weights
    base = best[(False, 2000)]
    print(
        f"{args.min_size} px, {args.rois} RoIs/image, batch 4, {args.threads} threads, {args.steps} steps, best of 2"
    )
    for amp, n in variants:
        print(
            f"  {'bf16' if amp else 'fp32'}  {n:>5} RPN proposals  {best[(amp, n)]:6.2f} images/s  "
            f"x{best[(amp, n)] / base:.2f}"
        )


def setup(args, rpn_proposals: int, n: int):
    torch.manual_seed(0)
    cfg = dict(
        weights="none",
        architecture="maskrcnn_resnet18_fpn",
        min_size=[args.min_size],
        max_size=args.min_size * 5 // 3,
        trainable_backbone_layers=None,
        rois_per_image=args.rois,
        positive_fraction=0.25,
        fpn_channels=64,
        box_head_size=256,
        rpn_proposals_train=rpn_proposals,
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
    return model, [collate([ds[i * 4 + j] for j in range(4)]) for i in range(n)]


def make_step(model, *, amp: bool):
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp)

    def step(batch) -> None:
        images, targets = batch
        train_step(model, opt, images, targets, autocast=autocast)

    return step


if __name__ == "__main__":
    main()
