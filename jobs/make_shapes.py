"""Write a synthetic COCO-format shapes dataset (train/val images + instances JSON) to any fsspec URL.

python jobs/make_shapes.py --output URL --train N --val M [--seed S] [--height H --width W]
"""

from __future__ import annotations

import argparse

import _cli  # noqa: F401  (puts the repo root on sys.path)
from _cli import EXIT_OK, run_main

from pipeline.demo.shapes import make_shapes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--train", type=int, default=600)
    p.add_argument("--val", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=192)
    p.add_argument("--width", type=int, default=256)
    args = p.parse_args()
    made = make_shapes(
        args.output, train=args.train, val=args.val, seed=args.seed, size=(args.height, args.width)
    )
    for split, coco in made.items():
        print(
            f"{split}: {len(coco['images'])} images, {len(coco['annotations'])} instances → {args.output}/{split}/"
        )
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
