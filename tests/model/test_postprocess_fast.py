"""The fast mask path (paste, threshold and RLE within each box) equals torchvision's full-image paste exactly."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from model.build import build_maskrcnn
from model.postprocess import (
    MASK_THRESHOLD,
    detections_from_mask_probs,
    forward_to_mask_probs,
    rle_from_crop,
    threshold_masks_in_boxes,
    to_detections,
)


def full_rle(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


def place(crop: np.ndarray, x0: int, y0: int, size: tuple[int, int]) -> np.ndarray:
    full = np.zeros(size, dtype=bool)
    full[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    return full


# --- rle_from_crop against pycocotools' encode of the full mask ------------------------------------------------------


@pytest.mark.parametrize(
    "size, x0, y0, crop",
    [
        ((1, 1), 0, 0, np.ones((1, 1), bool)),  # 1x1 image, foreground: counts [0, 1]
        ((1, 1), 0, 0, np.zeros((1, 1), bool)),  # 1x1 image, background
        ((5, 7), 0, 0, np.ones((5, 7), bool)),  # crop is the whole image, all foreground
        ((5, 7), 0, 0, np.zeros((0, 0), bool)),  # empty crop (box outside the image)
        ((5, 7), 2, 1, np.zeros((3, 4), bool)),  # crop without foreground
        ((6, 9), 0, 0, np.eye(3, dtype=bool)),  # top-left corner: the mask starts with a 1
        ((6, 9), 6, 3, np.eye(3, dtype=bool)),  # bottom-right corner: the mask ends with a 1
        ((6, 9), 0, 3, np.ones((3, 2), bool)),  # left edge, bottom edge
        ((6, 9), 7, 0, np.ones((6, 2), bool)),  # full-height strip at the right edge (columns join up)
        ((6, 9), 3, 0, np.ones((6, 2), bool)),  # full-height strip inside: no zeros between its columns
        ((1, 9), 4, 0, np.array([[1, 0, 1]], bool)),  # one-row image
        ((9, 1), 0, 4, np.array([[1], [0], [1]], bool)),  # one-column image
        ((4, 4), 1, 1, np.array([[0, 0], [0, 1]], bool)),  # foreground only in the crop's last pixel
    ],
)
def test_rle_from_crop_edge_cases(size, x0, y0, crop):
    rle = rle_from_crop(crop, x0, y0, size)
    assert rle["size"] == list(size)
    assert rle["counts"] == full_rle(place(crop, x0, y0, size))


def test_rle_from_crop_random_placements():
    rng = np.random.default_rng(0)
    for _ in range(300):
        size = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        h, w = int(rng.integers(0, size[0] + 1)), int(rng.integers(0, size[1] + 1))
        y0, x0 = int(rng.integers(0, size[0] - h + 1)), int(rng.integers(0, size[1] - w + 1))
        crop = rng.random((h, w)) < rng.choice([0.05, 0.5, 0.95])
        assert rle_from_crop(crop, x0, y0, size)["counts"] == full_rle(place(crop, x0, y0, size))


# --- pasting within the box against torchvision's paste_masks_in_image -----------------------------------------------


def assert_same_as_torchvision_paste(masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> None:
    expected = (paste_masks_in_image(masks, boxes, size)[:, 0] >= MASK_THRESHOLD).numpy()
    crops = threshold_masks_in_boxes(masks, boxes, size)
    assert len(crops) == len(expected)
    for (crop, x0, y0), want in zip(crops, expected):
        assert np.array_equal(place(crop, x0, y0, size), want)
        assert rle_from_crop(crop, x0, y0, size)["counts"] == full_rle(want)


def test_paste_in_box_crafted_boxes():
    size = (37, 53)  # odd sizes
    boxes = torch.tensor(
        [
            [0.0, 0.0, 53.0, 37.0],  # the whole image: the expanded box overflows every border
            [-3.5, -2.2, 10.4, 8.9],  # overflows the top-left corner
            [45.3, 30.1, 60.0, 44.0],  # overflows the bottom-right corner
            [10.0, 10.0, 10.5, 10.5],  # sub-pixel box: one pasted pixel
            [52.0, 36.0, 53.0, 37.0],  # one pixel at the bottom-right corner
            [0.0, 0.0, 0.01, 0.01],  # a speck at the origin
            [20.2, 5.7, 31.9, 29.3],  # inside
        ]
    )
    torch.manual_seed(0)
    masks = torch.rand(len(boxes), 1, 28, 28)
    masks[3] = 0.5  # exactly the threshold: foreground by the >= rule
    assert_same_as_torchvision_paste(masks, boxes, size)
    assert threshold_masks_in_boxes(masks[:0], boxes[:0], size) == []


def test_paste_in_box_random_boxes():
    gen = torch.Generator().manual_seed(1)
    for size in [(1, 1), (2, 3), (31, 17), (64, 48)]:
        h, w = size
        # As the model's boxes: clipped to the image, at least 0.01 px wide; expansion then overflows the borders.
        xy = torch.rand(40, 2, generator=gen) * torch.tensor([w, h]) * 0.99
        wh = torch.rand(40, 2, generator=gen) * torch.tensor([w, h]) + 0.01
        boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w, h]))], dim=1)
        # Smooth-ish masks, as the mask head produces, so thresholding cuts through interpolated values.
        masks = torch.sigmoid(torch.randn(40, 1, 7, 7, generator=gen) * 3)
        masks = torch.nn.functional.interpolate(masks, size=(28, 28), mode="bilinear", align_corners=False)
        assert_same_as_torchvision_paste(masks, boxes, size)


# --- the whole fast path against torchvision's forward + to_detections -----------------------------------------------


def random_images(seed: int, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = []
    for h, w in sizes:
        # Blocky content (not white noise) so the model sees edges and makes varied boxes.
        coarse = torch.rand(3, max(h // 8, 1), max(w // 8, 1), generator=gen)
        img = torch.nn.functional.interpolate(coarse[None], size=(h, w), mode="nearest")[0]
        images.append((img + 0.1 * torch.rand(3, h, w, generator=gen)).clamp(0, 1))
    return images


def assert_same_detections(fast, slow) -> None:
    assert len(fast) == len(slow)
    assert np.array_equal(fast.boxes_xywh, slow.boxes_xywh)
    assert np.array_equal(fast.labels, slow.labels)
    assert np.array_equal(fast.scores, slow.scores)
    assert fast.rles == slow.rles
    assert np.array_equal(fast.areas, slow.areas)


# Random init gives 100 detections per image at any threshold; the mask head over each costs ~0.9 GFLOP at
# torchvision's widths, so the R50/R18 cases keep fewer per image to stay quick on a 2-core machine.
MODELS = [
    # (builder kwargs, image sizes in one batch)
    (
        dict(min_size=96, max_size=160, box_score_thresh=0.05, box_detections_per_img=20),
        [(97, 131), (64, 64), (151, 83)],
    ),
    (
        dict(min_size=80, max_size=128, architecture="maskrcnn_resnet18_fpn", box_detections_per_img=30),
        [(45, 77), (120, 90)],
    ),
    (
        dict(
            min_size=64,
            max_size=96,
            box_score_thresh=0.01,
            architecture="maskrcnn_resnet34_fpn",
            fpn_channels=64,
        ),
        [(33, 47), (3, 5), (70, 71)],
    ),
]


@pytest.mark.parametrize("kwargs, sizes", MODELS)
def test_fast_path_equals_torchvision_forward(kwargs, sizes):
    model = build_maskrcnn(weights="none", **kwargs).eval()
    # Perturb the heads per case, seeded, so the cases are different models, not only different sizes.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(len(sizes) * 7 + len(kwargs))
        for p in model.roi_heads.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    images = random_images(len(sizes), sizes)
    with torch.inference_mode():
        full = model(images)
        raw = forward_to_mask_probs(model, images)
    # Thresholds: none, and the median score itself (one detection sits exactly on it: the >= rule on both sides).
    median = float(torch.cat([o["scores"] for o in full]).median())
    for score in (0.0, median):
        slow = [to_detections(o, score_threshold=score) for o in full]
        fast = [
            detections_from_mask_probs(o, image_size=tuple(img.shape[-2:]), score_threshold=score)
            for o, img in zip(raw, images)
        ]
        assert sum(len(d) for d in slow) > 20, "random init should give many detections to compare"
        for f, s in zip(fast, slow):
            assert_same_detections(f, s)


def test_fast_path_no_detections_and_eval_mode_required():
    model = build_maskrcnn(
        weights="none", min_size=64, max_size=96, architecture="maskrcnn_resnet18_fpn"
    ).eval()
    images = random_images(0, [(50, 60)])
    with torch.inference_mode():
        raw = forward_to_mask_probs(model, images)
        det = detections_from_mask_probs(raw[0], image_size=(50, 60), score_threshold=1.01)
    assert len(det) == 0 and det.rles == [] and det.boxes_xywh.shape == (0, 4) and det.areas.shape == (0,)
    with pytest.raises(ValueError, match="eval mode"):
        forward_to_mask_probs(model.train(), images)
