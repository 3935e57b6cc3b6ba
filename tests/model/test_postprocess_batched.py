"""The batched mask route (paste, threshold and run boundaries for many masks at once, as on a GPU), on CPU tensors:
the same masks as torchvision's paste, and RLE strings equal to pycocotools' on those masks."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from model.build import build_maskrcnn
from model.paste_batched import chunk_plan, crop_sizes, detections_batched, masks_to_rle, padded_elements
from model.postprocess import (
    MASK_THRESHOLD,
    detections_from_mask_probs,
    forward_to_mask_probs,
    threshold_masks_in_boxes,
)


def torchvision_masks(masks, boxes, size) -> np.ndarray:
    """torchvision's thresholded paste, through the exact in-box route (equal to `paste_masks_in_image`, see
    test_postprocess_fast.py, which itself fails on some boxes that miss the image)."""
    out = np.zeros((len(masks), *size), dtype=bool)
    for k, (crop, x0, y0) in enumerate(threshold_masks_in_boxes(masks, boxes, size)):
        out[k, y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    return out


def check(masks, boxes, size, chunk_elements=1 << 25) -> int:
    """Our strings decode to torchvision's thresholded masks except at pixels that differ in the last bit of their
    probability (returned, expected 0), and equal pycocotools' encoding of what they decode to."""
    sizes = torch.tensor([size] * len(masks), dtype=torch.int64).reshape(-1, 2)
    strings, areas = masks_to_rle(masks, boxes, sizes, chunk_elements=chunk_elements)
    expected = torchvision_masks(masks, boxes, size)
    flipped = 0
    for s, area, want in zip(strings, areas, expected):
        got = mask_utils.decode({"size": list(size), "counts": s.encode()}).astype(bool)
        assert mask_utils.encode(np.asfortranarray(got.astype(np.uint8)))["counts"].decode() == s
        assert got.sum() == area
        flipped += int((got != want).sum())
    return flipped


def test_crafted_boxes_edge_cases():
    size = (37, 53)
    boxes = torch.tensor(
        [
            [10.0, 8.0, 30.0, 20.0],  # inside
            [-5.0, -5.0, 6.0, 7.0],  # over the top-left corner
            [45.0, 30.0, 70.0, 50.0],  # over the bottom-right corner
            [0.0, 0.0, 53.0, 37.0],  # the whole image: crops as tall as the image (columns join)
            [12.0, -10.0, 14.0, 60.0],  # taller than the image
            [20.0, 20.0, 20.4, 20.4],  # under one pixel
            [100.0, 100.0, 120.0, 130.0],  # outside the image: an empty mask
            [3.0, 3.0, 3.0, 3.0],  # zero-size box
        ]
    )
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(len(boxes), 1, 28, 28, generator=g)
    masks[1] = 0.0  # nothing above the threshold
    masks[3] = 1.0  # everything
    assert check(masks, boxes, size) == 0
    inside = [0, 1, 2, 3, 4, 5]  # the boxes torchvision's own paste accepts
    want = (paste_masks_in_image(masks[inside], boxes[inside], size)[:, 0] >= MASK_THRESHOLD).numpy()
    assert np.array_equal(torchvision_masks(masks[inside], boxes[inside], size), want)


@pytest.mark.parametrize("chunk_elements", [1 << 25, 5000])  # one chunk, and many small ones
def test_random_masks_and_boxes(chunk_elements):
    g = torch.Generator().manual_seed(0)
    flipped = 0
    for size in [(1, 1), (1, 40), (40, 1), (97, 61), (480, 640)]:
        h, w = size
        n = 250
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w + 20.0, h + 20.0]) - 10
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 1.2
        boxes = torch.cat([xy, xy + wh], dim=1)
        masks = torch.rand(n, 1, 28, 28, generator=g)
        flipped += check(masks, boxes, size, chunk_elements)
    # The paste sums its four weighted samples in another order than F.interpolate: a pixel could flip at exactly
    # 0.5. None did in these 1,250 masks; a change here is a change in the arithmetic, worth a look.
    assert flipped == 0


def test_no_masks():
    strings, areas = masks_to_rle(
        torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.int64)
    )
    assert strings == [] and len(areas) == 0


def test_model_outputs_give_the_same_detections_as_the_exact_route():
    torch.manual_seed(0)
    model = build_maskrcnn(
        num_classes=5, weights="none", min_size=128, max_size=192, box_score_thresh=0.0
    ).eval()
    images = [torch.rand(3, 90, 120), torch.rand(3, 64, 50), torch.rand(3, 130, 100)]
    with torch.inference_mode():
        outputs = forward_to_mask_probs(model, images)
    sizes = [(int(i.shape[1]), int(i.shape[2])) for i in images]
    batched = detections_batched(outputs, image_sizes=sizes, score_threshold=0.05)
    for out, size, got in zip(outputs, sizes, batched):
        want = detections_from_mask_probs(out, image_size=size, score_threshold=0.05)
        assert len(want) == len(got) > 0
        np.testing.assert_array_equal(got.boxes_xywh, want.boxes_xywh)
        np.testing.assert_array_equal(got.labels, want.labels)
        np.testing.assert_array_equal(got.scores, want.scores)
        assert [r["counts"] for r in got.rles] == [r["counts"] for r in want.rles]
        assert all(r["size"] == list(size) for r in got.rles)
        np.testing.assert_array_equal(got.areas, want.areas)


def test_chunk_plan_covers_every_mask_once_within_the_limit():
    rng = np.random.default_rng(0)
    hw = np.concatenate([rng.integers(0, 60, (300, 2)), [[500, 400], [0, 0], [1, 700]]])
    for limit in (1, 5000, 1 << 16, 1 << 30):
        plan = chunk_plan(hw, limit)
        assert sorted(np.concatenate(plan).tolist()) == list(range(len(hw)))
        for which in plan:
            # A chunk over the limit is one crop that is over it alone.
            assert len(which) == 1 or padded_elements(hw, [which]) <= limit
    assert [c.tolist() for c in chunk_plan(hw, 1 << 30)] == [list(range(len(hw)))]  # one chunk: own order
    assert chunk_plan(np.zeros((0, 2), np.int64), 1 << 20) == []


def test_one_large_crop_among_small_ones():
    """A batch of three 480x640 images, each with 150 small boxes and one box over the whole image at score rank 3:
    chunks by crop size give the in-box route's detections in score order, and pad far fewer elements than chunks
    in score order, where each large crop pads the small ones of its chunk to its size."""
    g = torch.Generator().manual_seed(2)
    size, n, chunk_elements = (480, 640), 151, 1 << 22  # a chunk holds 13 whole-image crops
    outputs = []
    for _ in range(3):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([600.0, 440.0])
        boxes = torch.cat([xy, xy + 8 + 32 * torch.rand(n, 2, generator=g)], dim=1)
        boxes[3] = torch.tensor([2.0, 3.0, 637.0, 478.0])
        outputs.append(
            {
                "boxes": boxes,
                "labels": torch.randint(1, 5, (n,), generator=g),
                "scores": torch.linspace(0.99, 0.1, n),
                "masks": torch.rand(n, 1, 28, 28, generator=g),
            }
        )
    batched = detections_batched(
        outputs, image_sizes=[size] * 3, score_threshold=0.05, chunk_elements=chunk_elements
    )
    for out, got in zip(outputs, batched):
        want = detections_from_mask_probs(out, image_size=size, score_threshold=0.05)
        assert len(got) == len(want) == n
        assert [r["counts"] for r in got.rles] == [r["counts"] for r in want.rles]
        np.testing.assert_array_equal(got.areas, want.areas)
        np.testing.assert_array_equal(got.scores, want.scores)

    boxes = torch.cat([o["boxes"] for o in outputs])
    hw = crop_sizes(boxes, torch.tensor([size] * len(boxes), dtype=torch.int64))
    by_size = chunk_plan(hw, chunk_elements)
    in_score_order = chunk_plan(hw, chunk_elements, by_size=False)
    assert len(by_size) > 1  # the sorted route ran above, not the one-chunk shortcut
    assert padded_elements(hw, by_size) * 5 < padded_elements(hw, in_score_order)
