"""The model's resize, done early and in 8 bits for images far larger than the model looks at (pure functions).

torchvision's `GeneralizedRCNNTransform` takes float `[3, H, W]` images at full resolution and scales them by
`min(min_size / short side, max_size / long side)` with `F.interpolate(bilinear, align_corners=False,
recompute_scale_factor=True)`. For a 100-megapixel photo at the default 800/1333 that means a 1.2 GB float copy (and
a second one for the normalisation) to feed a 1-megapixel input. `shrink_for_model` does the same resize on the
uint8 image instead, on the actor's read threads, so the full-resolution pixels are released as soon as they are
decoded and no full-resolution float tensor ever exists.

What stays the same: the output size (the scale is computed exactly as torchvision computes it) and the
sample positions and weights (the same `F.interpolate` call). What differs: the resized pixels are 8-bit, within
about one grey level of torchvision's float result (uint8 bilinear uses fixed-point weights; measured at most 1.11
of 255 on random pixels), before the model normalises them; the model is then
told not to resize them again (`model.postprocess.forward_to_mask_probs(..., original_sizes=...)`). Boxes and masks
are still reported at the original size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Images over this many pixels are resized before the model when it would shrink them (a 16-MP float copy is
# 192 MB; typical photos, 12 MP and under, keep torchvision's own float resize bit for bit).
SHRINK_ABOVE_PIXELS = 16_000_000


def model_scale(height: int, width: int, *, min_size: int, max_size: int) -> float:
    """The factor torchvision's transform scales an image by (in Python floats, as its eager path computes it)."""
    return min(float(min_size) / min(height, width), float(max_size) / max(height, width))


def shrink_for_model(
    image: np.ndarray, *, min_size: int, max_size: int, above_pixels: int = SHRINK_ABOVE_PIXELS
) -> np.ndarray:
    """uint8 `[H, W, 3]` → the uint8 image the model's transform would produce (same size, same bilinear sampling),
    or `image` itself when it has at most `above_pixels` pixels or the model would not shrink it."""
    height, width = image.shape[:2]
    scale = model_scale(height, width, min_size=min_size, max_size=max_size)
    if height * width <= above_pixels or scale >= 1.0:
        return image
    # A channels-last view of the array, no copy: uint8 bilinear runs on it directly (torch >= 2.1).
    src = torch.from_numpy(image).permute(2, 0, 1)[None]
    out = F.interpolate(
        src, scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False
    )
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())
