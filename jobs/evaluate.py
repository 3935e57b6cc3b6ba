"""COCO box and mask AP of a segment job's results against COCO ground truth, scored by pycocotools.

python jobs/evaluate.py --results URL --annotations GT.json [--predictions-json URL] [--endpoint-url URL]

An image_uri matches the ground-truth image whose file_name ends its path; labels match categories by name.
Prints pycocotools' two 12-number tables (bbox, segm) and, as its last line, `bbox_AP=<x.xxx> segm_AP=<x.xxx>`.
"""

from __future__ import annotations

import argparse
import json

import _cli  # noqa: F401  (puts the repo root on sys.path)
import fsspec
from _cli import EXIT_OK, run_main

from pipeline.config import StorageConfig
from pipeline.errors import JobError, describe_storage_error
from pipeline.results.evaluate import evaluate_results, load_ground_truth
from pipeline.results.open import open_results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="the segment job's --output (local path or s3://...)")
    p.add_argument("--annotations", required=True, help="COCO instances JSON (local path or s3://...)")
    p.add_argument("--predictions-json", help="also write the predictions as a COCO results JSON here")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)")
    args = p.parse_args()
    storage = StorageConfig(endpoint_url=args.endpoint_url)

    gt = load_ground_truth(args.annotations, storage_options=storage.options_for(args.annotations))
    results = open_results(args.results, storage_options=storage.options_for(args.results))
    ev = evaluate_results(results, gt, verbose=True)
    print(
        f"images: {ev.gt_images} in the ground truth, {ev.matched_images} with ok results, "
        f"{ev.error_images} error rows, {ev.missing_images} without results; "
        f"{ev.unmatched_results} results rows not in the ground truth; {len(ev.predictions)} detections scored"
    )
    if ev.skipped_labels:
        print(f"detections left out (label not a ground-truth category): {ev.skipped_labels}")
    for w in ev.warnings:
        print(f"warning: {w}")
    if args.predictions_json:
        try:
            with fsspec.open(args.predictions_json, "w", **storage.options_for(args.predictions_json)) as f:
                json.dump(ev.predictions, f)
        except Exception as e:  # noqa: BLE001
            raise JobError(describe_storage_error(args.predictions_json, e)) from None
        print(f"predictions (COCO results format): {args.predictions_json}")
    print(ev.summary_line())
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
