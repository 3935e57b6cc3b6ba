"""Image bytes → RGB uint8 `[H, W, 3]` in the orientation a viewer shows, or a named `DecodeError`.

Rules (pure, no I/O):
- EXIF orientation is applied, so `height`/`width` and all coordinates refer to the upright image.
- Modes: grayscale, palette (with or without transparency), RGBA/LA, CMYK, YCbCr, 16-bit and 32-bit integer and
  float images are converted to RGB 8-bit. Transparent pixels are composited onto white, as most viewers show them.
  16-bit samples keep their top 8 bits (PIL's own `convert` would clip everything above 255 to white).
- Pixel cap: the header's size is checked against `max_pixels` *before* the pixels are decoded, so a
  decompression bomb is refused having cost a header read.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Our own cap (`max_pixels`) is checked first; PIL's bomb guard would otherwise raise for large-but-allowed images.
Image.MAX_IMAGE_PIXELS = None

EXIF_ORIENTATION = 0x0112
# RGB images over this many pixels are converted to an array band by band, `BAND_BYTES` at a time.
BANDED_ABOVE_PIXELS = 4_000_000
BAND_BYTES = 8 << 20


class DecodeError(ValueError):
    """An input that is not a usable image. `reason` is short, stable and goes into the `images.error` column."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(
    data: bytes, *, max_pixels: int, before_pixels: Callable[[int, int], None] | None = None
) -> np.ndarray:
    """Decode `data` to a C-contiguous uint8 array `[H, W, 3]`. Raises `DecodeError` with a reason.

    `before_pixels(width, height)` is called once the header has passed its checks and before any pixel is decoded
    (the actor reserves the decode's memory there); what it raises is raised as is."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError(f"not an image: unrecognised format (first bytes {data[:8]!r})") from None
    except Exception as e:  # PIL raises assorted errors on hostile headers
        raise DecodeError(f"truncated or corrupt image header: {type(e).__name__}: {e}") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise DecodeError(f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise DecodeError(f"too many pixels: {width}x{height} = {width * height} > max_pixels={max_pixels}")
    if before_pixels is not None:
        before_pixels(width, height)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": the pixels are still fine
            img.load()
            # exif_transpose returns a copy even of an upright image: a second full-size image for nothing.
            if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
                img = ImageOps.exif_transpose(img)
        return _to_rgb8(img)
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(
            f"truncated or corrupt {img.format or 'image'} data: {type(e).__name__}: {e}"
        ) from None


def _to_rgb8(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        # 16-bit PNGs arrive as I;16 or as I (int32 holding 0..65535): keep the top 8 bits of the 16-bit range.
        arr8 = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(arr8[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        arr8 = np.nan_to_num(scaled).astype(np.uint8)
        return np.repeat(arr8[..., None], 3, axis=2)
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK (PIL handles Adobe's inverted CMYK JPEGs), YCbCr, LAB, HSV
    width, height = img.size
    if width * height <= BANDED_ABOVE_PIXELS:
        return np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy refuses read-only arrays
    # NumPy's conversion goes through one `tobytes()` of the whole image (3 bytes per pixel more at the peak, beside
    # PIL's 4 and the array's 3): copy band by band instead.
    out = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, BAND_BYTES // (width * 3))
    for y in range(0, height, rows):
        out[y : y + rows] = np.asarray(img.crop((0, y, width, min(height, y + rows))))
    return out
