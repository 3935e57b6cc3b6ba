"""`pipeline.results.evaluate` / `jobs/evaluate.py`: COCO AP of a results folder, against pycocotools called directly.

Results folders are written here with the real output schemas (the segment job's own output is scored in
tests/pipeline/test_train.py and by the demo); ground truth is the generated shapes set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils

from pipeline.errors import JobError
from pipeline.results.evaluate import evaluate_results, match_images
from pipeline.results.open import open_results
from pipeline.segment.schema import DETECTIONS_SCHEMA, IMAGES_SCHEMA
from tests.model.test_coco_eval import _direct, _perfect

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(scope="module")
def gt(shapes_dir):
    with open(shapes_dir / "annotations" / "instances_val.json") as f:
        return json.load(f)


def perfect_predictions(gt: dict) -> list[dict]:
    return _perfect(gt)  # every GT instance as a detection of score 1


def perturbed_predictions(gt: dict, seed: int = 0) -> list[dict]:
    """Shifted masks and boxes, random scores, some instances dropped, some false positives: AP well below 1."""
    rng = np.random.default_rng(seed)
    out = []
    for p in perfect_predictions(gt):
        if rng.random() < 0.2:
            continue
        dx, dy = (int(v) for v in rng.integers(-4, 5, size=2))
        rle = {"size": p["segmentation"]["size"], "counts": p["segmentation"]["counts"].encode()}
        m = np.roll(mask_utils.decode(rle), (dy, dx), axis=(0, 1))
        enc = mask_utils.encode(np.asfortranarray(m))
        x, y, w, h = p["bbox"]
        out.append(
            {
                **p,
                "category_id": p["category_id"] if rng.random() > 0.1 else 1 + p["category_id"] % 4,
                "bbox": [x + dx, y + dy, w * float(rng.uniform(0.8, 1.2)), h],
                "score": float(rng.uniform(0.05, 1.0)),
                "segmentation": {"size": enc["size"], "counts": enc["counts"].decode()},
            }
        )
    return out


def write_results(fs_root: str, gt: dict, predictions: list[dict], *, image_prefix: str, fs=None) -> None:
    """A results folder as the segment job writes it, from COCO-style predictions."""
    names = {c["id"]: c["name"] for c in gt["categories"]}
    files = {img["id"]: img for img in gt["images"]}
    images = pa.table(
        {
            "image_uri": [f"{image_prefix}/{img['file_name']}" for img in gt["images"]],
            "status": ["ok"] * len(gt["images"]),
            "height": [img["height"] for img in gt["images"]],
            "width": [img["width"] for img in gt["images"]],
        }
    )
    images = pa.table(
        {
            f.name: images[f.name] if f.name in images.column_names else pa.nulls(len(images), f.type)
            for f in IMAGES_SCHEMA
        }
    ).cast(IMAGES_SCHEMA)
    rows = {
        "image_uri": [f"{image_prefix}/{files[p['image_id']]['file_name']}" for p in predictions],
        "instance": list(range(len(predictions))),
        "label": [p["category_id"] for p in predictions],
        "label_name": [names[p["category_id"]] for p in predictions],
        "score": [p["score"] for p in predictions],
        "bbox": [p["bbox"] for p in predictions],
        "area": [
            int(mask_utils.area({**p["segmentation"], "counts": p["segmentation"]["counts"].encode()}))
            for p in predictions
        ],
        "mask": [p["segmentation"] for p in predictions],
        "model_id": ["test"] * len(predictions),
        "run_id": ["test"] * len(predictions),
    }
    detections = pa.table(rows).cast(DETECTIONS_SCHEMA)
    for name, table in (("images", images), ("detections", detections)):
        path = f"{fs_root}/{name}/part-u000000.parquet"
        if fs is None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            pq.write_table(table, path)
        else:
            with fs.open(path, "wb") as f:
                pq.write_table(table, f)


def direct_stats(gt: dict, predictions: list[dict]) -> dict[str, list[float]]:
    """pycocotools called directly, without our evaluate()."""
    return {iou_type: _direct(gt, predictions, iou_type) for iou_type in ("bbox", "segm")}


def test_perfect_predictions_score_one(gt, tmp_path):
    write_results(str(tmp_path / "res"), gt, perfect_predictions(gt), image_prefix="/data/shapes/val")
    ev = evaluate_results(open_results(str(tmp_path / "res")), gt, verbose=False)
    assert ev.stats["bbox"][0] == pytest.approx(1.0) and ev.stats["segm"][0] == pytest.approx(1.0)
    assert ev.summary_line() == "bbox_AP=1.000 segm_AP=1.000"
    assert (ev.matched_images, ev.missing_images, ev.unmatched_results) == (len(gt["images"]), 0, 0)


def test_perturbed_predictions_score_what_pycocotools_scores(gt, tmp_path):
    preds = perturbed_predictions(gt)
    write_results(str(tmp_path / "res"), gt, preds, image_prefix="/data/val")
    ev = evaluate_results(open_results(str(tmp_path / "res")), gt, verbose=False)
    expected = direct_stats(gt, preds)
    assert 0.05 < expected["segm"][0] < 0.95  # a perturbation that really moves AP
    for iou_type in ("bbox", "segm"):
        assert ev.stats[iou_type] == pytest.approx(expected[iou_type], abs=1e-4)


def test_missing_images_count_as_misses_and_foreign_labels_are_reported(gt, tmp_path):
    keep = {img["id"] for img in gt["images"][: len(gt["images"]) // 2]}
    preds = [p for p in perfect_predictions(gt) if p["image_id"] in keep]
    half = {**gt, "images": [img for img in gt["images"] if img["id"] in keep]}
    write_results(str(tmp_path / "res"), half, preds, image_prefix="s3://bucket/val")
    ev = evaluate_results(open_results(str(tmp_path / "res")), gt, verbose=False)
    assert ev.missing_images == len(gt["images"]) - len(keep)
    assert ev.stats["segm"][0] == pytest.approx(direct_stats(gt, preds)["segm"][0], abs=1e-4)
    assert ev.stats["segm"][0] < 0.9

    renamed = {**gt, "categories": [{**c, "name": f"other-{c['name']}"} for c in gt["categories"]]}
    with pytest.raises(JobError, match="label_name"):
        evaluate_results(open_results(str(tmp_path / "res")), renamed, verbose=False)


def test_match_images_by_longest_file_name_suffix():
    names = {"000001.jpg": 1, "a/x.jpg": 2, "b/x.jpg": 3}
    uris = ["s3://bkt/val/000001.jpg", "/data/a/x.jpg", "/data/b/x.jpg", "s3://b/shard.tar#b/x.jpg", "/y.jpg"]
    assert match_images(uris, names) == {
        "s3://bkt/val/000001.jpg": 1,
        "/data/a/x.jpg": 2,
        "/data/b/x.jpg": 3,
        "s3://b/shard.tar#b/x.jpg": 3,
    }
    assert match_images(["/data/x000001.jpg"], names) == {}  # whole path components only


def test_cli_on_s3_results_prints_the_ap_line_last(gt, s3, tmp_path):
    fs, bucket, endpoint = s3
    preds = perturbed_predictions(gt, seed=1)
    write_results(f"{bucket}/res", gt, preds, image_prefix=f"s3://{bucket}/val", fs=fs)
    fs.pipe(f"{bucket}/gt.json", json.dumps(gt).encode())
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint}
    out_json = tmp_path / "preds.json"
    proc = subprocess.run(
        [
            sys.executable,
            "jobs/evaluate.py",
            "--results",
            f"s3://{bucket}/res",
            "--annotations",
            f"s3://{bucket}/gt.json",
            "--predictions-json",
            str(out_json),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    expected = direct_stats(gt, preds)
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"bbox_AP={expected['bbox'][0]:.3f} segm_AP={expected['segm'][0]:.3f}"
    assert "IoU metric: segm" in proc.stdout
    assert len(json.loads(out_json.read_text())) == len(preds)

    missing = subprocess.run(
        [
            sys.executable,
            "jobs/evaluate.py",
            "--results",
            f"s3://{bucket}/nothing",
            "--annotations",
            f"s3://{bucket}/gt.json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"error: s3://{bucket}/nothing: no results here "
        "(no images/ folder; is this a segment job's --output?)"
    ]
