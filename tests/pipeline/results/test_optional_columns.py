"""Results written by another tool: only the required columns (`common.REQUIRED`), or one of those missing.

pyarrow reads a column a Parquet file lacks as nulls; render, summary and SQL must still answer (detections ordered
and coloured by descending score without `instance`), and a missing required column is one `QueryError` line
naming it, never a TypeError from deep inside.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.results.common import REQUIRED, QueryError
from pipeline.results.open import open_results
from pipeline.results.render import ALPHA, PALETTE, detections_of, masks, render, render_sample
from pipeline.results.sql import sql
from pipeline.results.summary import format_summary, summary
from pipeline.segment.schema import DETECTIONS_SCHEMA, IMAGES_SCHEMA
from tests.pipeline.results.test_query import box_mask, detection, disc_mask, gradient, image, png

H, W = 120, 160


def write_minimal_results(root: str, *, drop: tuple[str, ...] = ()) -> dict:
    """Sources and a results folder under `root` holding only the required columns, less `drop`
    (`"table.column"`). `b-two.png` has two detections, stored lowest score first; `a-one.png` has one; one input
    is in error. Returns the URIs and masks to expect."""
    os.makedirs(f"{root}/src", exist_ok=True)
    two, one = f"{root}/src/b-two.png", f"{root}/src/a-one.png"
    for path in (two, one):
        with open(path, "wb") as f:
            f.write(png(gradient(H, W)))
    square, disc = box_mask(H, W, 10, 40, 10, 50), disc_mask(H, W, 85, 120, 15)
    dets = [
        detection(two, 0, 2, "circle", 0.6, disc, "run-x"),  # rows out of score order, on purpose
        detection(two, 0, 1, "square", 0.9, square, "run-x"),
        detection(one, 0, 1, "square", 0.7, square, "run-x"),
    ]
    images = [
        image(two, shape=(H, W), n=2),
        image(one, shape=(H, W), n=1),
        image(f"{root}/src/x.jpg", error="not an image: unrecognised format (first bytes b'')"),
    ]
    for table, schema, rows in (("images", IMAGES_SCHEMA, images), ("detections", DETECTIONS_SCHEMA, dets)):
        keep = [n for n in REQUIRED[table] if f"{table}.{n}" not in drop]
        fields = pa.schema([schema.field(n) for n in keep])
        os.makedirs(f"{root}/out/{table}", exist_ok=True)
        rows = [{k: r[k] for k in keep} for r in rows]
        pq.write_table(pa.Table.from_pylist(rows, fields), f"{root}/out/{table}/part-000000.parquet")
    return {"out": f"{root}/out", "two": two, "one": one, "square": square, "disc": disc}


@pytest.fixture(scope="module")
def minimal(tmp_path_factory):
    return write_minimal_results(str(tmp_path_factory.mktemp("minimal")))


def test_files_really_lack_the_optional_columns(minimal):
    names = pq.read_schema(f"{minimal['out']}/detections/part-000000.parquet").names
    assert "instance" not in names and "area" not in names and "model_id" not in names
    names = pq.read_schema(f"{minimal['out']}/images/part-000000.parquet").names
    assert "num_detections" not in names and "height" not in names and "width" not in names


def test_render_orders_and_colours_by_score(minimal, tmp_path):
    results = open_results(minimal["out"])
    rows = detections_of(results, minimal["two"])
    assert [r["score"] for r in rows] == pytest.approx([0.9, 0.6]) and rows[0]["instance"] is None
    assert [r["label_name"] for r, _ in masks(results, minimal["two"], min_score=0.5)] == ["square", "circle"]

    info = render(results, minimal["two"], str(tmp_path / "two.png"), min_score=0.0)
    assert (info["width"], info["height"], info["instances"]) == (W, H, 2)
    from PIL import Image

    out = np.asarray(Image.open(tmp_path / "two.png").convert("RGB")).astype(float)
    source = gradient(H, W).astype(float)
    # Inside each mask, away from the box lines and labels: the source blended with the colour of its score rank.
    for mask, rank in ((minimal["square"], 0), (minimal["disc"], 1)):
        ys, xs = np.nonzero(mask)
        y, x = int(np.median(ys)), int(np.median(xs))
        want = source[y, x] * (1 - ALPHA) + np.array(PALETTE[rank]) * ALPHA
        assert np.abs(out[y, x] - want).max() <= 1

    # Without num_detections, the sample is ranked by the detection rows: b-two (2) before a-one (1).
    done = render_sample(results, 2, str(tmp_path / "sample"), min_score=0.5)
    assert [d["image_uri"] for d in done] == [minimal["two"], minimal["one"]]


def test_summary_and_sql_answer(minimal):
    s = summary(minimal["out"])
    assert (s["images"], s["ok"], s["errors"], s["detections"]) == (3, 2, 1, 3)
    assert s["labels"] == {"square": 2, "circle": 1} and s["run_ids"] == [] and s["model_ids"] == []
    assert "images: 3 (2 ok, 1 error)   detections: 3" in "\n".join(format_summary(s))
    got = sql(minimal["out"], "SELECT count(*) AS n, count(instance) AS known FROM detections")
    assert got.to_pylist() == [{"n": 3, "known": 0}]


@pytest.mark.parametrize(
    "drop, call, column",
    [
        ("detections.score", "summary", "detections.score"),
        ("detections.label_name", "summary", "detections.label_name"),
        ("images.status", "summary", "images.status"),
        ("detections.mask", "render", "detections.mask"),
        ("detections.bbox", "render", "detections.bbox"),
        ("images.status", "render", "images.status"),
    ],
)
def test_missing_required_column_is_one_line(tmp_path, drop, call, column):
    built = write_minimal_results(str(tmp_path), drop=(drop,))
    with pytest.raises(QueryError) as err:
        if call == "summary":
            summary(built["out"])
        else:
            render(built["out"], built["two"], str(tmp_path / "x.png"))
    message = str(err.value)
    assert message.startswith(f"{column} is missing") and "\n" not in message
    assert not (tmp_path / "x.png").exists()
