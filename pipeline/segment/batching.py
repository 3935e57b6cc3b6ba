"""Batching: decoded images grouped into forward passes of like shape (pure; no Ray).

A batch is padded to the largest height and the largest width among its images (then up to a multiple of 32), so
a batch mixing landscape and portrait photos pays for a square: 4:3 images mixed 50/50 cost ~1.36x their pixels,
16:9 ~1.75x. `ShapeBatcher` keeps one open batch per orientation within a small window of images (what the actor
holds anyway while the batch fills) and emits a batch when one is full; rows still reach the unit's writer by
position, so the output does not depend on the grouping. `padded_ratio` measures the waste for a benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

from model.resize import model_scale


class Sized2D(Protocol):
    height: int | None
    width: int | None


T = TypeVar("T", bound=Sized2D)


def orientation(height: int, width: int) -> str:
    return "landscape" if width >= height else "portrait"


class ShapeBatcher:
    """Groups items (anything with `height` and `width`) into batches of `batch_size` of one orientation.

    `add(item)` returns the batches it completes; an open batch whose first item has waited for more than `window`
    later arrivals goes out unfilled (so a rare orientation neither waits for the unit's end nor holds memory long);
    `flush()` at the end returns what is left, fullest first.
    """

    def __init__(self, batch_size: int, *, window: int | None = None):
        self.batch_size = max(1, batch_size)
        self.window = max(self.batch_size, window or 2 * self.batch_size)
        self._open: dict[str, list[T]] = {}
        self._since: dict[str, int] = {}  # arrival number of each open batch's first item
        self._arrivals = 0

    @property
    def waiting(self) -> int:
        return sum(len(b) for b in self._open.values())

    def add(self, item: T) -> list[list[T]]:
        self._arrivals += 1
        key = orientation(item.height, item.width)
        if key not in self._open:
            self._open[key], self._since[key] = [], self._arrivals
        self._open[key].append(item)
        out = []
        for k in list(self._open):
            if len(self._open[k]) >= self.batch_size or self._arrivals - self._since[k] > self.window:
                out.append(self._open.pop(k))
                del self._since[k]
        return out

    def flush(self) -> list[list[T]]:
        out = sorted(self._open.values(), key=len, reverse=True)
        self._open, self._since = {}, {}
        return out


def model_size(height: int, width: int, *, min_size: int, max_size: int) -> tuple[int, int]:
    """The size torchvision's transform resizes an image to (floor of the scaled sides)."""
    scale = model_scale(height, width, min_size=min_size, max_size=max_size)
    return int(height * scale), int(width * scale)


def padded_ratio(
    batches: Iterable[Sequence[tuple[int, int]]], *, min_size: int, max_size: int, divisible: int = 32
) -> float:
    """Pixels the model processes ÷ pixels of the images, over `batches` of `(height, width)`: each batch padded
    to its largest resized height and width, rounded up to `divisible` (torchvision's `batch_images`)."""
    padded = real = 0
    for batch in batches:
        sizes = [model_size(h, w, min_size=min_size, max_size=max_size) for h, w in batch]
        if not sizes:
            continue
        ph = math.ceil(max(h for h, _ in sizes) / divisible) * divisible
        pw = math.ceil(max(w for _, w in sizes) / divisible) * divisible
        padded += len(sizes) * ph * pw
        real += sum(h * w for h, w in sizes)
    return padded / real if real else 1.0
