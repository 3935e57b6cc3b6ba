import io

import numpy as np
import pytest
from PIL import Image

from model.decode import DecodeError, decode_image
from tests.support.images import jpeg_bytes, png_bytes

CAP = 10_000_000


def test_rgb_jpeg():
    out = decode_image(jpeg_bytes(30, 40), max_pixels=CAP)
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8 and out.flags.writeable


def test_exif_orientation_applied():
    # Stored 40 wide x 30 high with orientation 6 (rotate 90° CW to view): a viewer shows 30 wide x 40 high.
    img = Image.new("RGB", (40, 30), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 10, 30))  # red band on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(buf.getvalue(), max_pixels=CAP)
    assert out.shape == (40, 30, 3)
    assert out[:8, :, 0].mean() > 200 and out[-8:, :, 0].mean() < 60  # left edge became the top


@pytest.mark.parametrize(
    "mode, arr",
    [
        ("L", np.full((5, 7), 128, np.uint8)),
        ("RGBA", np.dstack([np.full((5, 7, 3), 10, np.uint8), np.full((5, 7), 255, np.uint8)])),
    ],
)
def test_modes_to_rgb(mode, arr):
    out = decode_image(png_bytes(arr, mode=mode), max_pixels=CAP)
    assert out.shape == (5, 7, 3)


def test_sixteen_bit_png_keeps_top_bits():
    arr = np.full((4, 6), 0x8000, dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = decode_image(buf.getvalue(), max_pixels=CAP)
    assert out.shape == (4, 6, 3) and (out == 0x80).all()


def test_palette_with_transparency_composited_on_white():
    img = Image.new("P", (6, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.info["transparency"] = 0
    img.putpixel((0, 0), 1)
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    out = decode_image(buf.getvalue(), max_pixels=CAP)
    assert out[0, 0].tolist() == [255, 0, 0] and out[1, 1].tolist() == [255, 255, 255]


def test_cmyk_jpeg():
    img = Image.new("CMYK", (8, 5), (0, 255, 255, 0))  # red
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    out = decode_image(buf.getvalue(), max_pixels=CAP)
    assert out.shape == (5, 8, 3) and out[..., 0].mean() > 200 and out[..., 1].mean() < 60


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"<html><body>not found</body></html>", "not an image"),
        (jpeg_bytes(60, 80)[:300], "truncated or corrupt image header"),
        (jpeg_bytes(60, 80)[:1000], "truncated or corrupt JPEG data"),
    ],
)
def test_bad_bytes_named_errors(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_image(data, max_pixels=CAP)


def test_pixel_cap_checked_from_header():
    data = jpeg_bytes(100, 100)
    with pytest.raises(DecodeError, match="too many pixels: 100x100"):
        decode_image(data, max_pixels=9_999)
    assert decode_image(data, max_pixels=10_000).shape == (100, 100, 3)
