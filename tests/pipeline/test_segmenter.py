"""The actor class, called without Ray: same detections as the torchvision model called directly."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from pycocotools import mask as mask_utils

from model.build import load_model, resolve_spec
from model.decode import decode_image
from pipeline.schema import RESULT_SCHEMA, split_results
from pipeline.segmenter import ImageError, Segmenter
from pipeline.sources import READ_SCHEMA
from tests.conftest import TINY_MODEL

SCORE = 0.05


def make_segmenter(**kw):
    spec = resolve_spec("none", min_size=TINY_MODEL["min_size"], max_size=TINY_MODEL["max_size"])
    return Segmenter(spec=spec, score_threshold=SCORE, max_detections=10, threads=2, run_id="r1", **kw)


def read_rows(items):
    rows = [
        dict(unit_id="000000", unit_index=i, unit_total=len(items), image_uri=uri, data=data, read_error=err)
        for i, (uri, data, err) in enumerate(items)
    ]
    return pa.Table.from_pylist(rows, schema=READ_SCHEMA)


def reference(images):
    """What a user gets calling torchvision's model directly: same weights, same sizes, same thresholds."""
    spec = resolve_spec("none", min_size=TINY_MODEL["min_size"], max_size=TINY_MODEL["max_size"])
    model = load_model(spec, box_score_thresh=SCORE, box_detections_per_img=10)
    with torch.inference_mode():
        return model([torch.from_numpy(img).permute(2, 0, 1).float() / 255 for img in images])


def assert_matches_reference(det_rows, ref, height, width):
    keep = ref["scores"] >= SCORE
    assert len(det_rows) == int(keep.sum()) > 0
    for k, row in enumerate(det_rows):
        x1, y1, x2, y2 = ref["boxes"][k].tolist()
        np.testing.assert_allclose(row["bbox"], [x1, y1, x2 - x1, y2 - y1], rtol=1e-5, atol=1e-3)
        assert row["label"] == int(ref["labels"][k])
        assert row["score"] == pytest.approx(float(ref["scores"][k]), rel=1e-5)
        mask = mask_utils.decode({"size": row["mask"]["size"], "counts": row["mask"]["counts"].encode()})
        expected = (ref["masks"][k, 0] >= 0.5).numpy()
        assert mask.shape == (height, width) and np.array_equal(mask.astype(bool), expected)
        assert row["area"] == int(expected.sum())


def test_detections_equal_direct_model_call(shapes_dir):
    files = sorted((shapes_dir / "val").glob("*.jpg"))[:3]
    datas = [f.read_bytes() for f in files]
    seg = make_segmenter(batch_size=2)
    out = seg(read_rows([(str(f), d, None) for f, d in zip(files, datas)]))
    assert out.schema.equals(RESULT_SCHEMA)
    images, dets = split_results(out)
    assert images.column("status").to_pylist() == ["ok"] * 3
    decoded = [decode_image(d, max_pixels=10**8) for d in datas]
    refs = reference(decoded)
    for f, img, ref in zip(files, decoded, refs):
        rows = [r for r in dets.to_pylist() if r["image_uri"] == str(f)]
        assert_matches_reference(rows, ref, *img.shape[:2])
        assert [r["instance"] for r in rows] == list(range(len(rows)))


def test_bad_inputs_become_error_rows_and_batch_goes_on(shapes_dir):
    good = sorted((shapes_dir / "val").glob("*.jpg"))[0].read_bytes()
    seg = make_segmenter(max_pixels=200_000)
    out = seg(
        read_rows(
            [
                ("good.jpg", good, None),
                ("empty.jpg", b"", None),
                ("html.png", b"<html></html>", None),
                ("missing.jpg", None, "read failed: missing.jpg: not found"),
                ("trunc.jpg", good[: len(good) // 2], None),
            ]
        )
    )
    rows = out.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "error", "error", "error"]
    assert rows[0]["num_detections"] > 0 and rows[0]["error"] is None
    assert rows[1]["error"].startswith("empty file")
    assert rows[2]["error"].startswith("not an image")
    assert rows[3]["error"].startswith("read failed")
    assert rows[4]["error"].startswith("truncated or corrupt")
    assert all(r["num_detections"] == 0 and r["detections"] == [] for r in rows[1:])


def test_pixel_cap_and_raise_policy(shapes_dir):
    good = sorted((shapes_dir / "val").glob("*.jpg"))[0].read_bytes()
    small_cap = make_segmenter(max_pixels=100)
    row = small_cap(read_rows([("big.jpg", good, None)])).to_pylist()[0]
    assert row["status"] == "error" and row["error"].startswith("too many pixels")
    strict = make_segmenter(on_image_error="raise")
    with pytest.raises(ImageError, match="bad.jpg: not an image"):
        strict(read_rows([("bad.jpg", b"garbage!", None)]))


def test_empty_batch_and_no_detections(shapes_dir):
    seg = make_segmenter()
    assert seg(read_rows([])).num_rows == 0
    flat = np.full((64, 64, 3), 127, np.uint8)
    seg.score_threshold = 1.01  # nothing can pass: the zero-detection path
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(flat).save(buf, format="PNG")
    row = seg(read_rows([("flat.png", buf.getvalue(), None)])).to_pylist()[0]
    assert row["status"] == "ok" and row["num_detections"] == 0 and row["height"] == 64


def test_extreme_strip_is_an_error_row_with_a_reason_and_the_batch_goes_on():
    from pipeline.segmenter import too_thin
    from tests.conftest import png_bytes

    seg = make_segmenter()
    strip = png_bytes(np.full((1, 500, 3), 128, dtype=np.uint8))  # 500 wide, 1 high
    normal = png_bytes(np.full((48, 64, 3), 90, dtype=np.uint8))
    out = seg(read_rows([("strip.png", strip, None), ("normal.png", normal, None)])).to_pylist()
    assert out[0]["status"] == "error" and out[0]["error"].startswith("image too thin to segment: 500x1")
    assert (out[0]["height"], out[0]["width"]) == (1, 500)
    assert out[1]["status"] == "ok"
    assert too_thin(1, 500, 800, 1333) is None  # at torchvision's sizes the same strip is fine (2 px high)
    assert too_thin(1, 2000, 800, 1333) is not None
