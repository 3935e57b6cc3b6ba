import numpy as np
import torch
from pycocotools import mask as mask_utils

from model.postprocess import encode_binary_masks, to_detections, xyxy_to_xywh


def test_xyxy_to_xywh():
    out = xyxy_to_xywh(np.array([[10, 20, 30, 60]], dtype=np.float32))
    assert out.tolist() == [[10, 20, 20, 40]]
    assert xyxy_to_xywh(np.zeros((0, 4))).shape == (0, 4)


def test_rle_round_trip_full_image():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 17, 23)) > 0.5
    rles = encode_binary_masks(masks)
    assert [r["size"] for r in rles] == [[17, 23]] * 3
    for m, r in zip(masks, rles):
        assert isinstance(r["counts"], str)
        decoded = mask_utils.decode({"size": r["size"], "counts": r["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), m)


def test_to_detections_filters_by_score_and_thresholds_at_half():
    h, w = 8, 10
    soft = torch.zeros(3, 1, h, w)
    soft[0, 0, :4, :5] = 0.5  # exactly 0.5 is foreground (>= rule)
    soft[0, 0, 4:, 5:] = 0.49
    soft[1, 0] = 0.9
    output = {
        "boxes": torch.tensor([[0.0, 0.0, 5.0, 4.0], [1.0, 1.0, 9.0, 7.0], [2.0, 2.0, 3.0, 3.0]]),
        "labels": torch.tensor([1, 2, 3]),
        "scores": torch.tensor([0.9, 0.6, 0.1]),
        "masks": soft,
    }
    det = to_detections(output, score_threshold=0.5)
    assert len(det) == 2
    assert det.labels.tolist() == [1, 2]
    assert det.areas.tolist() == [20, 80]
    assert det.boxes_xywh[0].tolist() == [0, 0, 5, 4]
    decoded = mask_utils.decode({"size": det.rles[0]["size"], "counts": det.rles[0]["counts"].encode()})
    assert decoded[:4, :5].all() and not decoded[4:, 5:].any()


def test_to_detections_empty():
    output = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
        "masks": torch.zeros(0, 1, 5, 6),
    }
    det = to_detections(output, score_threshold=0.5)
    assert len(det) == 0 and det.rles == [] and det.areas.shape == (0,)
