import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from model.coco_eval import evaluate, predictions_to_coco, summary_line
from model.data import CocoInstances


@pytest.fixture(scope="module")
def gt(shapes_dir):
    return json.loads((shapes_dir / "annotations" / "instances_val.json").read_text())


def _perfect(gt: dict) -> list[dict]:
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": list(a["bbox"]),
            "score": 1.0,
            "segmentation": dict(a["segmentation"]),
        }
        for a in gt["annotations"]
    ]


def test_perfect_predictions_score_one(gt, capsys):
    stats = evaluate(gt, _perfect(gt))
    assert stats["bbox"][0] == pytest.approx(1.0) and stats["segm"][0] == pytest.approx(1.0)
    assert len(stats["bbox"]) == len(stats["segm"]) == 12
    assert summary_line(stats) == "bbox_AP=1.000 segm_AP=1.000"
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in capsys.readouterr().out


def test_perfect_outputs_through_dataset_and_predictions_to_coco(shapes_dir):
    """Targets → torchvision-style outputs → COCO results: exercises labels → category ids and mask encoding."""
    ds = CocoInstances(
        annotations_url=str(shapes_dir / "annotations" / "instances_val.json"),
        images_url=str(shapes_dir / "val"),
        train=False,
    )
    predictions = []
    for i in range(len(ds)):
        _, target = ds[i]
        output = {
            "boxes": target["boxes"],
            "labels": target["labels"],
            "scores": torch.ones(len(target["labels"])),
            "masks": target["masks"][:, None].float() * 0.8,  # soft masks above the 0.5 threshold
        }
        predictions += predictions_to_coco(
            int(target["image_id"]), output, label_to_cat=ds.index.label_to_cat
        )
    stats = evaluate(ds.index.dataset, predictions, verbose=False)
    assert stats["bbox"][0] == pytest.approx(1.0) and stats["segm"][0] == pytest.approx(1.0)


def _perturbed(gt: dict) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for k, a in enumerate(gt["annotations"]):
        if k % 3 == 0:
            continue  # a miss
        x, y, w, h = a["bbox"]
        dx, dy = (float(v) for v in rng.integers(-4, 5, size=2))
        img = next(i for i in gt["images"] if i["id"] == a["image_id"])
        mask = mask_utils.decode(
            {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
        )
        shifted = np.roll(mask, (int(dy), int(dx)), axis=(0, 1))
        rle = mask_utils.encode(np.asfortranarray(shifted))
        out.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"]
                if k % 5
                else (a["category_id"] % 4) + 1,  # some wrong classes
                "bbox": [x + dx, y + dy, w, h],
                "score": float(rng.uniform(0.1, 1.0)),
                "segmentation": {"size": [img["height"], img["width"]], "counts": rle["counts"].decode()},
            }
        )
    # a false positive on an image
    out.append({**out[0], "bbox": [0.0, 0.0, 5.0, 5.0], "score": 0.99})
    return out


def _direct(gt: dict, results: list[dict], iou_type: str) -> list[float]:
    """pycocotools called the usual way (as torchvision's references do: one result list per IoU type)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        drop = "segmentation" if iou_type == "bbox" else "bbox"
        dt = coco.loadRes([{k: v for k, v in r.items() if k != drop} for r in copy.deepcopy(results)])
        e = COCOeval(coco, dt, iouType=iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return [float(s) for s in e.stats]


def test_perturbed_predictions_match_pycocotools_directly(gt):
    predictions = _perturbed(gt)
    before = copy.deepcopy(predictions)
    stats = evaluate(gt, predictions, verbose=False)
    assert predictions == before  # inputs are not mutated (loadRes writes into its input)
    for iou_type in ("bbox", "segm"):
        assert stats[iou_type] == _direct(gt, predictions, iou_type)
        assert 0.0 < stats[iou_type][0] < 1.0


def test_images_without_predictions_count_as_misses(gt):
    first_image = gt["images"][0]["id"]
    only_first = [p for p in _perfect(gt) if p["image_id"] == first_image]
    stats = evaluate(gt, only_first, iou_types=("bbox",), verbose=False)
    assert set(stats) == {"bbox"}
    assert stats["bbox"][8] < 0.5  # AR@100 over all GT images, not just the predicted one


def test_zero_predictions_give_zeros(gt, capsys):
    stats = evaluate(gt, [], verbose=False)
    assert capsys.readouterr().out == ""
    for iou_type in ("bbox", "segm"):
        assert stats[iou_type][0] == 0.0
        assert set(stats[iou_type]) <= {0.0, -1.0}  # -1: pycocotools' "no GT in this area range"
    assert summary_line(stats) == "bbox_AP=0.000 segm_AP=0.000"


def test_errors_name_the_problem(gt):
    with pytest.raises(ValueError, match="not in the ground truth: \\[9999\\]"):
        evaluate(gt, [{**_perfect(gt)[0], "image_id": 9999}], verbose=False)
    with pytest.raises(ValueError, match="iou_types"):
        evaluate(gt, [], iou_types=("keypoints",), verbose=False)


def test_predictions_to_coco_round_trip():
    h, w = 10, 12
    soft = torch.zeros(2, 1, h, w)
    soft[0, 0, 2:6, 3:9] = 0.7
    soft[0, 0, 0, 0] = 0.5  # exactly 0.5 is foreground
    soft[1, 0, 5:, :4] = 0.49  # below the threshold: an empty mask
    output = {
        "boxes": torch.tensor([[3.0, 2.0, 9.0, 6.0], [0.5, 5.0, 4.0, 10.0]]),
        "labels": torch.tensor([1, 3]),
        "scores": torch.tensor([0.9, 0.25]),
        "masks": soft,
    }
    results = predictions_to_coco(17, output, label_to_cat={1: 3, 2: 7, 3: 42})
    assert [r["category_id"] for r in results] == [3, 42]
    assert [r["image_id"] for r in results] == [17, 17]
    assert results[0]["bbox"] == [3.0, 2.0, 6.0, 4.0] and results[1]["bbox"] == [0.5, 5.0, 3.5, 5.0]
    assert [r["score"] for r in results] == pytest.approx([0.9, 0.25])
    json.dumps(results)  # plain JSON types throughout
    for r, m in zip(results, soft[:, 0]):
        assert r["segmentation"]["size"] == [h, w] and isinstance(r["segmentation"]["counts"], str)
        decoded = mask_utils.decode({"size": [h, w], "counts": r["segmentation"]["counts"].encode()})
        assert np.array_equal(decoded, (m >= 0.5).numpy().astype(np.uint8))
    with pytest.raises(ValueError, match="labels \\[5\\]"):
        predictions_to_coco(1, {**output, "labels": torch.tensor([1, 5])}, label_to_cat={1: 3})
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
    }
    assert predictions_to_coco(1, {**empty, "masks": torch.zeros(0, 1, h, w)}, label_to_cat={}) == []
