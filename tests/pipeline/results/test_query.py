"""Querying results: SQL, summary, masks and overlays over results folders built with the real schemas and writer.

The folders are written with `pipeline.segment.storage.Output` and the output schemas from masks of known shapes encoded by
pycocotools, so every expected value is exact; the same folder is built locally and on moto's S3 server. (The CLI
tests also query what the real segment job wrote.)
"""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import s3fs
from PIL import Image
from pycocotools import mask as mask_utils

from model.decode import decode_image
from pipeline.errors import JobError
from pipeline.results.common import QueryError
from pipeline.results.open import open_results
from pipeline.results.render import masks, render, render_sample
from pipeline.results.sql import sql, write_table
from pipeline.results.summary import format_summary, summary
from pipeline.segment.schema import DETECTIONS_SCHEMA, IMAGES_SCHEMA
from pipeline.segment.storage import Output
from pipeline.segment.writer import parquet_bytes
from tests.support.results import write_units

MODEL_ID = "random-init:test"


def gradient(h: int, w: int) -> np.ndarray:
    """A picture with structure but a constant blue channel (100), far from every palette colour's blue."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 3) % 256, (y * 3) % 256, np.full_like(x, 100)], axis=-1).astype(np.uint8)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_rotated(upright: np.ndarray) -> bytes:
    """A JPEG stored sideways with EXIF orientation 6: viewers (and decode_image) show `upright`'s shape."""
    stored = Image.fromarray(np.rot90(upright, k=1).copy())  # orientation 6 = rotate 90° clockwise to view
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def box_mask(h, w, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def disc_mask(h, w, cy, cx, r) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


def detection(uri, instance, label, name, score, mask, run_id) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "image_uri": uri,
        "instance": instance,
        "label": label,
        "label_name": name,
        "score": score,
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "area": int(mask.sum()),
        "mask": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "model_id": MODEL_ID,
        "run_id": run_id,
    }


def image(uri, *, shape=None, error=None, n=0, run_id="run-1") -> dict:
    return {
        "image_uri": uri,
        "status": "error" if error else "ok",
        "error": error,
        "height": None if shape is None else shape[0],
        "width": None if shape is None else shape[1],
        "num_detections": n,
        "bytes": 1000,
        "decode_ms": 1.0,
        "infer_ms": 2.0,
        "unit_id": "000000",
        "model_id": MODEL_ID,
        "run_id": run_id,
    }


def build_results(src: str, out_url: str, put, storage_options: dict | None = None) -> dict:
    """Write sources under `src` with `put(url, bytes)` and a results folder at `out_url`; return what to expect.

    Two units (two Parquet parts each) and two run ids. Sources: `a.png` (120×160, a square at 0.9 and a disc at
    0.4), `b.jpg` (stored sideways, EXIF-rotated to 80×60, a square at 0.75), a tar shard with `c.png` (a square at
    0.6) and `d.png` (no detection), and four error rows of three kinds.
    """
    a, b, c, d = gradient(120, 160), gradient(80, 60), gradient(64, 64), gradient(40, 50)
    put(f"{src}/a.png", png(a))
    b_bytes = jpeg_rotated(b)
    put(f"{src}/b.jpg", b_bytes)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        for name, arr in (("c.png", c), ("d.png", d)):
            data = png(arr)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    put(f"{src}/shards/s-000.tar", tar.getvalue())

    ua, ub = f"{src}/a.png", f"{src}/b.jpg"
    uc, ud = f"{src}/shards/s-000.tar#c.png", f"{src}/shards/s-000.tar#d.png"
    square_a, disc_a = box_mask(120, 160, 10, 40, 10, 50), disc_mask(120, 160, 85, 120, 15)
    square_b = box_mask(80, 60, 5, 25, 5, 25)  # in upright coordinates
    square_c = box_mask(64, 64, 30, 60, 30, 60)
    dets_1 = [
        detection(ua, 0, 1, "square", 0.9, square_a, "run-1"),
        detection(ua, 1, 2, "circle", 0.4, disc_a, "run-1"),
        detection(ub, 0, 1, "square", 0.75, square_b, "run-1"),
    ]
    dets_2 = [detection(uc, 0, 3, "triangle", 0.6, square_c, "run-2")]
    images_1 = [
        image(ua, shape=(120, 160), n=2),
        image(ub, shape=(80, 60), n=1),
        image(f"{src}/broken.jpg", error="truncated or corrupt JPEG data: OSError: image file is truncated"),
        image(f"{src}/x.png", error="not an image: unrecognised format (first bytes b'<html>')"),
    ]
    images_2 = [
        image(uc, shape=(64, 64), n=1, run_id="run-2"),
        image(ud, shape=(40, 50), n=0, run_id="run-2"),
        image(f"{src}/y.png", error="not an image: unrecognised format (first bytes b'')", run_id="run-2"),
        image(f"{src}/z.jpg", error=f"read failed: {src}/z.jpg: not found", run_id="run-2"),
    ]
    units = {"000000": (images_1, dets_1), "000001": (images_2, dets_2)}
    out = write_units(out_url, units, storage_options=storage_options, committed=True)
    out.write_json("_config.json", {"config": {"input": {"max_pixels": 10**8}}, "model_id": MODEL_ID})
    out.write_json("_SUCCESS.json", {"complete": True})
    return {
        "uris": {"a": ua, "b": ub, "c": uc, "d": ud},
        "sources": {ua: a, ub: decode_image(b_bytes, max_pixels=10**8), uc: c, ud: d},
        "masks": {ua: [square_a, disc_a], ub: [square_b], uc: [square_c], ud: []},
    }


@pytest.fixture(scope="module")
def local_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("query")

    def put(path, data):
        import os

        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    expected = build_results(str(root / "src"), str(root / "out"), put)
    return open_results(str(root / "out")), expected, str(root)


@pytest.fixture(scope="module")
def s3_results(moto_server):
    """The same folder on moto's S3 server: sources under s3://<bucket>/src, results under s3://<bucket>/out."""
    s3fs.S3FileSystem.clear_instance_cache()
    opts = {"client_kwargs": {"endpoint_url": moto_server}}
    fs = s3fs.S3FileSystem(**opts)
    bucket = "query-results"
    fs.mkdir(bucket)
    expected = build_results(f"s3://{bucket}/src", f"s3://{bucket}/out", fs.pipe_file, storage_options=opts)
    yield open_results(f"s3://{bucket}/out", storage_options=opts), expected, f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(params=["local", "s3"])
def built(request):
    return request.getfixturevalue(f"{request.param}_results")


def read_png(results, url: str) -> np.ndarray:
    fs = s3fs.S3FileSystem(**results.storage_options) if url.startswith("s3://") else None
    data = fs.cat_file(url) if fs else open(url, "rb").read()
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB"))


# --- SQL ------------------------------------------------------------------------------------------------------------


def test_sql_counts_equal_pyarrow_counts(built):
    results, _, _ = built
    dets, images = results.table("detections"), results.table("images")

    got = sql(results, "SELECT label_name, count(*) AS n FROM detections GROUP BY 1")
    assert dict(zip(got["label_name"].to_pylist(), got["n"].to_pylist())) == dict(
        Counter(dets["label_name"].to_pylist())
    )
    got = sql(results, "SELECT status, count(*) AS n FROM images GROUP BY 1")
    assert dict(zip(got["status"].to_pylist(), got["n"].to_pylist())) == dict(
        Counter(images["status"].to_pylist())
    )
    got = sql(results, "SELECT count(*) AS n FROM detections WHERE score >= 0.5")
    assert got["n"].to_pylist() == [pc.sum(pc.greater_equal(dets["score"], 0.5)).as_py()] == [3]
    # A join: counted detections per image equal the images table's own num_detections.
    got = sql(
        results,
        "SELECT i.image_uri, i.num_detections, count(d.instance) AS n FROM images i "
        "LEFT JOIN detections d USING (image_uri) GROUP BY ALL",
    )
    assert got["n"].to_pylist() == got["num_detections"].to_pylist() and got.num_rows == images.num_rows == 8
    # Whole rows come back with the output schema's types, nested columns included.
    got = sql(results, "SELECT * FROM detections ORDER BY score DESC", limit=2)
    assert got.num_rows == 2 and got.schema.field("mask").type == DETECTIONS_SCHEMA.field("mask").type
    assert got["score"].to_pylist() == pytest.approx([0.9, 0.75])


def test_sql_errors_are_one_line(local_results):
    results, _, _ = local_results
    for query in ("SELEC 1", "SELECT nope FROM detections", "SELECT * FROM nosuch"):
        with pytest.raises(QueryError) as err:
            sql(results, query)
        assert str(err.value).startswith("SQL: ") and "\n" not in str(err.value)
    assert sql(results, "SET threads = 1").num_rows == 0  # a statement without a result


def test_write_table_csv_and_parquet(built, tmp_path):
    results, _, base = built
    table = sql(results, "SELECT image_uri, score, bbox, mask FROM detections ORDER BY score DESC")
    target = base if base.startswith("s3://") else str(tmp_path)
    write_table(table, f"{target}/exports/d.parquet", fmt="parquet", storage_options=results.storage_options)
    write_table(table, f"{target}/exports/d.csv", fmt="csv", storage_options=results.storage_options)
    fs = s3fs.S3FileSystem(**results.storage_options) if target.startswith("s3://") else None
    read = (lambda p: fs.cat_file(p)) if fs else (lambda p: open(p, "rb").read())
    assert pq.read_table(io.BytesIO(read(f"{target}/exports/d.parquet"))).equals(table)
    csv = pacsv.read_csv(io.BytesIO(read(f"{target}/exports/d.csv")))
    assert csv.num_rows == 4 and csv["image_uri"].to_pylist() == table["image_uri"].to_pylist()
    assert csv["bbox"][0].as_py() == "[10.0, 10.0, 40.0, 30.0]"  # nested cells as JSON text


# --- summary ----------------------------------------------------------------------------------------------------------


def test_summary_counts_reasons_labels_scores_ids(built):
    results, _, _ = built
    s = summary(results)
    assert (s["images"], s["ok"], s["errors"], s["detections"]) == (8, 4, 4, 4)
    assert s["complete"] is True
    assert list(s["error_reasons"].items()) == [
        ("not an image", 2),
        ("read failed", 1),
        ("truncated or corrupt JPEG data", 1),
    ]
    assert list(s["labels"].items()) == [("square", 2), ("circle", 1), ("triangle", 1)]
    scores = np.array([0.9, 0.4, 0.75, 0.6], np.float32)
    expect = dict(zip(["min", "q1", "median", "q3", "max"], np.quantile(scores, [0, 0.25, 0.5, 0.75, 1])))
    assert s["score"] == pytest.approx(expect, abs=1e-6)
    # 0.9 is stored as float32 0.89999998 and still counts in [0.9, 1.0], where a reader looks for it.
    assert s["score_histogram"] == [0, 0, 0, 0, 1, 0, 1, 1, 0, 1]
    assert s["run_ids"] == ["run-1", "run-2"] and s["model_ids"] == [MODEL_ID]
    text = "\n".join(format_summary(s))
    assert "images: 8 (4 ok, 4 error)   detections: 4" in text
    assert "top error reasons: not an image=2, read failed=1, truncated or corrupt JPEG data=1" in text
    assert "[0.9, 1.0]        1" in text and "run: run-1, run-2" in text


def test_summary_without_detections_and_incomplete(tmp_path):
    out = Output(str(tmp_path / "out"))
    rows = [image("/nowhere/e.jpg", error="empty file (0 bytes)")]
    out.write_bytes("images/part-000000.parquet", parquet_bytes(pa.Table.from_pylist(rows, IMAGES_SCHEMA)))
    s = summary(str(tmp_path / "out"))  # a URL works as well as an opened Results
    assert (s["images"], s["errors"], s["detections"], s["score"], s["complete"]) == (1, 1, 0, None, False)
    assert s["score_histogram"] == [0] * 10 and s["labels"] == {}
    assert "incomplete" in format_summary(s)[0]


def test_no_results_at_url_is_one_line(tmp_path, moto_server):
    (tmp_path / "empty").mkdir()
    for url, opts in (
        (str(tmp_path / "empty"), None),
        (str(tmp_path / "missing"), None),
        ("s3://query-results/nothing-here", {"client_kwargs": {"endpoint_url": moto_server}}),
    ):
        with pytest.raises(JobError) as err:
            open_results(url, storage_options=opts)
        assert "no results here" in str(err.value) and "\n" not in str(err.value)


# --- masks ------------------------------------------------------------------------------------------------------------


def test_masks_equal_the_encoded_ones(built):
    results, expected, _ = built
    for uri, want in expected["masks"].items():
        got = masks(results, uri)
        assert [row["instance"] for row, _ in got] == list(range(len(want)))
        for (row, m), w in zip(got, want):
            assert m.dtype == bool and np.array_equal(m, w) and row["area"] == w.sum()
    a = expected["uris"]["a"]
    assert [row["label_name"] for row, _ in masks(results, a, min_score=0.5)] == ["square"]
    with pytest.raises(QueryError, match="not in the results"):
        masks(results, a + ".nope")


# --- render -----------------------------------------------------------------------------------------------------------


def far_from(shape, boxes, margin=4, text_h=18, text_w=110) -> np.ndarray:
    """True where no drawing can reach: outside every box (plus its line) and its label strip above it."""
    h, w = shape
    far = np.ones((h, w), bool)
    for x, y, bw, bh in boxes:
        x0, y0, x1, y1 = int(x) - margin, int(y) - margin, int(x + bw) + margin + 1, int(y + bh) + margin + 1
        far[max(0, y0) : y1, max(0, x0) : x1] = False
        far[max(0, int(y) - text_h) : int(y) + text_h, max(0, x0) : int(x) + text_w] = False
    return far


def test_render_fills_masks_and_leaves_the_rest(built, tmp_path):
    results, expected, base = built
    a = expected["uris"]["a"]
    source = expected["sources"][a]
    square, disc = expected["masks"][a]
    target = f"{base}/renders/a.png" if base.startswith("s3://") else str(tmp_path / "r" / "a.png")

    info = render(results, a, target, min_score=0.5)  # the disc (0.4) is below the threshold
    out = read_png(results, target)
    assert out.shape == source.shape and (info["width"], info["height"], info["instances"]) == (160, 120, 1)
    changed = np.any(out != source, axis=-1)
    assert changed[square].mean() > 0.99  # every filled pixel is blended with a colour
    far = far_from(source.shape[:2], [[10, 10, 40, 30]])
    assert far.mean() > 0.5 and np.array_equal(out[far], source[far])  # the disc stays untouched
    assert not changed[disc].any()

    render(results, a, target, min_score=0.3)
    out = read_png(results, target)
    assert np.any(out != source, axis=-1)[disc].mean() > 0.99


def test_render_exif_rotated_and_tar_member(built, tmp_path):
    results, expected, base = built
    for key, box in (("b", [5, 5, 20, 20]), ("c", [30, 30, 30, 30])):
        uri = expected["uris"][key]
        source = expected["sources"][uri]
        target = f"{base}/renders/{key}.png" if base.startswith("s3://") else str(tmp_path / f"{key}.png")
        render(results, uri, target)
        out = read_png(results, target)
        # b.jpg is stored 80 wide and 60 high: the render has the upright size, as the stored coordinates do.
        assert out.shape == source.shape
        assert np.any(out != source, axis=-1)[expected["masks"][uri][0]].mean() > 0.99
        far = far_from(source.shape[:2], [box])
        assert np.array_equal(out[far], source[far])


def test_render_sample_most_detections_first(built, tmp_path):
    results, expected, base = built
    target = f"{base}/sample" if base.startswith("s3://") else str(tmp_path / "sample")
    done = render_sample(results, 3, target, min_score=0.0)
    u = expected["uris"]
    # a (2 detections), then b and c (1 each) by image_uri; error rows are never chosen.
    assert [d["image_uri"] for d in done] == [u["a"], u["b"], u["c"]]
    assert [d["output"].rsplit("/", 1)[1] for d in done] == ["000-a.png", "001-b.png", "002-c.png"]
    for d in done:
        assert read_png(results, d["output"]).shape == expected["sources"][d["image_uri"]].shape
    assert len(render_sample(results, 50, target)) == 4  # only the 4 ok images exist


def test_render_errors_name_the_image(local_results, tmp_path):
    results, expected, root = local_results
    with pytest.raises(QueryError, match="not in the results"):
        render(results, "no/such.png", str(tmp_path / "x.png"))
    with pytest.raises(QueryError, match=r"status=error in the results \(not an image"):
        render(results, f"{root}/src/x.png", str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()

    # An ok row whose file is gone, and one whose file changed size since the run.
    out = Output(str(tmp_path / "out"))
    (tmp_path / "small.png").write_bytes(png(gradient(10, 10)))
    rows = [
        image(str(tmp_path / "gone.png"), shape=(10, 10)),
        image(str(tmp_path / "small.png"), shape=(20, 20)),
    ]
    out.write_bytes("images/part-000000.parquet", parquet_bytes(pa.Table.from_pylist(rows, IMAGES_SCHEMA)))
    with pytest.raises(QueryError, match="cannot read the image: .*gone.png: not found") as err:
        render(str(tmp_path / "out"), str(tmp_path / "gone.png"), str(tmp_path / "g.png"))
    assert "\n" not in str(err.value)
    with pytest.raises(QueryError, match="is 10x10 now but was 20x20 when segmented"):
        render(str(tmp_path / "out"), str(tmp_path / "small.png"), str(tmp_path / "s.png"))
    assert masks(str(tmp_path / "out"), str(tmp_path / "gone.png")) == []  # no detections/ folder at all
