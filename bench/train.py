"""Ray Train loop (1 worker) vs a plain single-process PyTorch loop: same model, data, batch and threads, one run.

    python bench/train.py [--train-images 48] [--batch-size 4] [--threads 2] [--min-size 192] [--model-from FILE]

Both sides train the same model from the same random init on the same generated shapes images, one epoch, timing
the epoch's wall clock (data loading included, evaluation excluded) over the same number of iterations. The model is
`maskrcnn_resnet50_fpn` at torchvision's widths, or the `model:` section of a training config (`--model-from
configs/train_cpu_small.yaml`: the CPU preset's ResNet-18 FPN with narrow heads).
The last line is `ray_train_vs_plain=<Ray Train step time ÷ plain step time>` (target <= 1.10).

    python bench/train.py --loader [--train-images 96] [--batch-size 8]

measures the training data loader alone, built as `model.train_loop` builds it (COCO dataset with its transforms,
aspect-ratio grouped batches, pinned memory where a GPU is, persistent workers), on COCO-sized shapes images
(~480×640): images/s it delivers with 0, 1 and 2 worker processes. A GPU step at batch 8 takes tens of milliseconds;
this is how many images/s the loader can feed it per CPU core. Last line: `loader_img_s_w<k>=<x>` for each.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._common import local_ray, train_step  # noqa: E402


def plain_loop(cfg: dict, threads: int) -> tuple[float, int]:
    """What a user writes without Ray: returns (seconds per step, steps)."""
    import torch

    from model.data import CocoInstances, GroupedBatchSampler, aspect_ratio_group_ids, collate
    from model.train_loop import build_for_training

    torch.set_num_threads(threads)
    torch.manual_seed(cfg["seed"])
    ds = CocoInstances(annotations_url=cfg["train_annotations"], images_url=cfg["train_images"], train=True)
    model = build_for_training(cfg, ds.index.num_classes)
    model.train()
    opt = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg["lr"],
        momentum=cfg["momentum"],
        weight_decay=cfg["weight_decay"],
    )
    batches = GroupedBatchSampler(
        torch.utils.data.RandomSampler(ds),
        group_ids=aspect_ratio_group_ids(ds.aspect_ratios()),
        batch_size=cfg["batch_size"],
    )
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=0)
    start, steps = time.perf_counter(), 0
    for images, targets in loader:
        train_step(model, opt, images, targets)
        steps += 1
    return (time.perf_counter() - start) / steps, steps


def loader_rates(train_images: int, batch_size: int) -> dict[int, float]:
    """images/s of the training data loader alone, with 0, 1 and 2 worker processes (see the module docstring)."""
    import torch

    from model.data import CocoInstances, GroupedBatchSampler, aspect_ratio_group_ids, collate
    from pipeline.demo.shapes import make_shapes

    work = tempfile.mkdtemp(prefix="bench-loader-")
    make_shapes(work, train=train_images, val=1, seed=3, size=(480, 640))
    ds = CocoInstances(
        annotations_url=f"{work}/annotations/instances_train.json", images_url=f"{work}/train", train=True
    )
    rates = {}
    for workers in (0, 1, 2):
        batches = GroupedBatchSampler(
            torch.utils.data.RandomSampler(ds),
            group_ids=aspect_ratio_group_ids(ds.aspect_ratios()),
            batch_size=batch_size,
        )
        loader = torch.utils.data.DataLoader(
            ds,
            batch_sampler=batches,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
        )
        it = iter(loader)
        next(it)  # workers started, first batch out: not timed
        start, n = time.perf_counter(), 0
        for images, _ in it:
            n += len(images)
        rates[workers] = n / (time.perf_counter() - start)
        print(f"loader, {workers} worker(s), batch {batch_size}: {rates[workers]:.1f} images/s")
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loader", action="store_true", help="measure the training data loader alone")
    p.add_argument("--train-images", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-size", type=int, default=192)
    p.add_argument("--model-from", help="use the model section (architecture, RoIs) of this training config")
    args = p.parse_args()
    if args.loader:
        rates = loader_rates(max(args.train_images, 96), max(args.batch_size, 8))
        print(" ".join(f"loader_img_s_w{k}={v:.1f}" for k, v in rates.items()))
        return

    from pipeline.demo.shapes import make_shapes
    from pipeline.train.config import train_config
    from pipeline.train.run import loop_config, run_training

    model = {"weights": "none", "min_size": [args.min_size], "max_size": args.min_size * 2}
    if args.model_from:
        import yaml

        with open(args.model_from) as f:
            section = yaml.safe_load(f).get("model", {})
        keep = (
            "architecture",
            "backbone",
            "fpn_channels",
            "box_head_size",
            "rois_per_image",
            "positive_fraction",
        )
        model.update({k: v for k, v in section.items() if k in keep})

    work = tempfile.mkdtemp(prefix="bench-train-")
    make_shapes(work, train=args.train_images, val=4, seed=3, size=(192, 256))
    split = lambda s: {"annotations": f"{work}/annotations/instances_{s}.json", "images": f"{work}/{s}"}  # noqa: E731
    cfg = train_config(
        {
            "data": {"train": split("train"), "val": split("val"), "loader_workers": 0, "flip_prob": 0.0},
            "model": model,
            "train": {
                "epochs": 1,
                "batch_size": args.batch_size,
                "lr": 0.005,
                "warmup_iters": 5,
                "log_interval": 1000,
                "threads_per_worker": args.threads,
            },
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            "run": {"name": "bench", "storage_path": f"{work}/runs"},
        }
    )
    print(
        f"data: {args.train_images} shapes images ~192x256, min_size {args.min_size}, batch {args.batch_size}, "
        f"{args.threads} torch threads, from scratch: {cfg.model.architecture}, fpn_channels {cfg.model.fpn_channels}, "
        f"box_head_size {cfg.model.box_head_size}, {cfg.model.rois_per_image} RoIs/image; machine: {os.cpu_count()} CPUs"
    )
    plain_step, steps = plain_loop(loop_config(cfg), args.threads)
    print(f"plain loop: {plain_step:.3f} s/step over {steps} steps")

    with local_ray(args.threads):
        summary = run_training(cfg)
    ray_step = args.batch_size / summary.metrics["images_per_s"]
    print(
        f"Ray Train loop (1 worker, DDP-prepared model, report + checkpoint per epoch): {ray_step:.3f} s/step"
    )
    print(f"ray_train_vs_plain={ray_step / plain_step:.3f}")


if __name__ == "__main__":
    main()
