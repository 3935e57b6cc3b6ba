"""COCO RLE strings from run lengths, many masks at once, without pycocotools: equal to pycocotools' own."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from model.rle import encode_counts, runs_from_changes


def coco(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")


def changes_of(mask: np.ndarray) -> np.ndarray:
    """Fortran-order positions where the mask changes value (pixel -1 counting as 0)."""
    flat = np.concatenate([[0], mask.ravel(order="F").astype(np.int8)])
    return np.flatnonzero(flat[1:] != flat[:-1])


def ours(masks: list[np.ndarray]) -> list[str]:
    changes = [changes_of(m) for m in masks]
    runs = runs_from_changes(np.concatenate(changes), np.array([len(c) for c in changes]), masks[0].size)
    return encode_counts(runs, np.array([len(c) + 1 for c in changes]))


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((1, 1), bool),
        np.ones((1, 1), bool),
        np.zeros((5, 7), bool),  # empty: one run of zeros
        np.ones((5, 7), bool),  # full: a run of 0 zeros, then everything
        np.eye(6, 9, dtype=bool),
        np.pad(np.ones((3, 3), bool), ((0, 3), (6, 0))),  # touching the top and right borders
        np.pad(np.ones((1, 1), bool), ((4, 0), (8, 0))),  # the last pixel only
    ],
)
def test_edge_cases_equal_pycocotools(mask):
    assert ours([mask]) == [coco(mask)]


def test_many_random_masks_at_once_equal_pycocotools():
    rng = np.random.default_rng(0)
    for size in [(1, 9), (9, 1), (37, 53), (480, 640)]:
        masks = [rng.random(size) < p for p in (0.001, 0.05, 0.5, 0.95, 0.999)]
        masks.append(np.zeros(size, bool))
        assert ours(masks) == [coco(m) for m in masks]


def test_long_runs_and_large_negative_differences():
    """Runs over 2^20 (five groups and more) and a short run after a long one (a large negative difference)."""
    h, w = 4096, 1024
    mask = np.zeros((h, w), bool)
    mask[:, 500:700] = True  # 819,200 set pixels in one run after 2,048,000 zeros
    mask[10, 900] = True  # then a 1-pixel run
    assert ours([mask]) == [coco(mask)]
