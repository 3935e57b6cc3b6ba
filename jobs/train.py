"""Train Mask R-CNN with Ray Train (DDP) on COCO-format data; the last line names the best checkpoint's URL.

    python jobs/train.py [--config FILE.yaml] [--set dotted.key=value ...]
    ray job submit --working-dir . -- python jobs/train.py --config configs/train.yaml --set run.name=exp1

Linear scaling rule: lr = 0.02 x (batch_size x num_workers) / 16 unless `train.lr` is set. Running the same command
again with the same `run.name` resumes from the latest checkpoint. Keys: configs/train.yaml.
"""

from __future__ import annotations

import argparse

import _cli  # noqa: F401  (puts the repo root on sys.path)
from _cli import EXIT_OK, add_output_args, init_ray, live_progress, load_config_dict, run_main, setup_output

from pipeline.train.config import train_config


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file (see configs/train.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument(
        "--ray-address",
        help="Ray cluster to join: host:port or ray://host:port; `auto` joins the cluster recorded on this machine "
        "by `ray start` (default: an embedded local Ray; under `ray job submit`, $RAY_ADDRESS is used)",
    )
    add_output_args(p)
    args = p.parse_args()
    cfg = train_config(load_config_dict(args.config, args.set))  # every key checked before any work starts
    setup_output("train", verbose=args.verbose)

    from pipeline.train.run import run_training

    init_ray(args.ray_address)
    summary = run_training(cfg, live=live_progress())
    print("\n".join(summary.lines()))
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
