"""The read stage decodes on its threads exactly what the model's own decoder gives, with the same reasons."""

import numpy as np

from model.decode import DecodeError, decode_image
from pipeline.segment.read import decoded_inputs
from pipeline.segment.sources import InputRef
from pipeline.segment.units import Kind
from tests.conftest import plan_units
from tests.support.images import jpeg_bytes, png_bytes

MAX_PIXELS = 50_000


def test_decoded_on_read_threads_equals_the_decoder_called_directly(tmp_path):
    good = jpeg_bytes(60, 80, seed=3)
    files = {
        "a.jpg": good,
        "b.png": png_bytes(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)),
        "empty.jpg": b"",
        "html.png": b"<html></html>",
        "trunc.jpg": good[: len(good) // 2],
        "big.png": png_bytes(np.zeros((300, 300, 3), np.uint8)),  # over MAX_PIXELS
        "c.jpg": jpeg_bytes(33, 47, seed=4),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    refs = [InputRef(Kind.FILES, str(tmp_path / n), n) for n in files]
    [unit] = plan_units(refs, plan_url=str(tmp_path / "plan"), unit_size=100)
    got = list(decoded_inputs(unit, max_pixels=MAX_PIXELS, min_size=64, max_size=128, threads=4))
    assert [d.image_uri for d in got] == list(files) and [d.index for d in got] == list(range(len(files)))
    for d, data in zip(got, files.values()):
        assert d.columns["bytes"] == len(data)
        try:
            want = decode_image(data, max_pixels=MAX_PIXELS)
        except DecodeError as e:
            assert d.error == e.reason and d.image is None
            continue
        assert d.error is None and np.array_equal(d.image, want) and (d.height, d.width) == want.shape[:2]
