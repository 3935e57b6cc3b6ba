"""The HTML run report: counts, charts, the sample and the error examples of a results folder, escaped, with every
picture on disk. Built on the query tests' results folder (real writer, real images) plus a unit of hostile
inputs; the same report from moto's S3 server. The page in a real browser: tests/jobs/test_report_browser.py."""

from __future__ import annotations

import os
import re
from html.parser import HTMLParser

import pyarrow as pa
import pytest
import s3fs

from pipeline.results.open import open_results
from pipeline.results.report import write_report
from pipeline.results.summary import summary
from pipeline.segment.schema import DETECTIONS_SCHEMA, IMAGES_SCHEMA
from pipeline.segment.storage import Output
from pipeline.segment.writer import parquet_bytes
from tests.pipeline.results.test_query import box_mask, build_results, detection, gradient, image, png

HOSTILE_OK = '"><img src=x onerror=alert(1)>.png'  # a file name: no `/`
HOSTILE_ERROR_URI = "s3://bucket/<script>alert(2)</script>.jpg"
HOSTILE_MESSAGE = "not an image: <b>bold</b> & <script>alert(3)</script>"


def put_local(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def build_report_results(root: str) -> dict:
    """`build_results` (4 ok images, 4 errors of 3 reasons) plus a third unit: an ok image whose name is markup
    (best score 0.95, so first in the sample), an ok image whose file is gone (0.55), and an error row whose URI
    and message are markup. 11 images (6 ok, 5 errors), 6 detections."""
    expected = build_results(f"{root}/src", f"{root}/out", put_local)
    hostile, gone = f"{root}/src/{HOSTILE_OK}", f"{root}/src/gone.png"
    put_local(hostile, png(gradient(60, 80)))
    square = box_mask(60, 80, 10, 40, 10, 50)
    dets = [
        detection(hostile, 0, 1, "square", 0.95, square, "run-3"),
        detection(gone, 0, 1, "<i>label</i>", 0.55, square, "run-3"),
    ]
    images = [
        image(hostile, shape=(60, 80), n=1, run_id="run-3"),
        image(gone, shape=(60, 80), n=1, run_id="run-3"),
        image(HOSTILE_ERROR_URI, error=HOSTILE_MESSAGE, run_id="run-3"),
    ]
    out = Output(f"{root}/out")
    out.write_bytes("images/part-000002.parquet", parquet_bytes(pa.Table.from_pylist(images, IMAGES_SCHEMA)))
    out.write_bytes(
        "detections/part-000002.parquet", parquet_bytes(pa.Table.from_pylist(dets, DETECTIONS_SCHEMA))
    )
    return {**expected["uris"], "hostile": hostile, "gone": gone, "out": f"{root}/out"}


class Page(HTMLParser):
    """Collects what the assertions look at: attributes of every element, text by element id, card captions."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict]] = []
        self.by_id: dict[str, str] = {}
        self.captions: list[str] = []
        self._open: list[tuple[str, str | None]] = []
        self._text: dict[int, list[str]] = {}
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        if tag not in ("img", "br", "meta", "line", "rect", "path"):
            self._open.append((tag, attrs.get("id")))
            self._text[len(self._open)] = []

    def handle_endtag(self, tag):
        if not self._open or self._open[-1][0] != tag:
            return
        depth = len(self._open)
        text = " ".join("".join(self._text.pop(depth)).split())
        _, element_id = self._open.pop()
        if element_id:
            self.by_id[element_id] = text
        if tag == "figcaption":
            self.captions.append(text)
        if self._open:
            self._text[len(self._open)].append(" " + text + " ")

    def handle_data(self, data):
        if self._open:
            self._text[len(self._open)].append(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("report"))
    built = build_report_results(root)
    logged: list[str] = []
    path = write_report(open_results(built["out"]), f"{root}/report", log=logged.append)
    with open(path, encoding="utf-8") as f:
        html = f.read()
    return built, path, html, Page(html), logged


def test_counts_and_ids(report):
    built, path, _, page, _ = report
    assert path.endswith("/report/index.html")
    s = summary(built["out"])
    assert (s["images"], s["ok"], s["errors"], s["detections"]) == (11, 6, 5, 6)
    assert page.by_id["stat-images"] == "11 images" and page.by_id["stat-ok"] == "6 ok"
    assert page.by_id["stat-errors"] == "5 in error" and page.by_id["stat-detections"] == "6 detections"
    assert "run-1" in page.by_id["run-ids"] and "run-3" in page.by_id["run-ids"]
    assert "random-init:test" in page.by_id["model-ids"]
    assert "not named by the model id" in page.by_id["architecture"]  # "test" is no architecture
    # Per label (the markup label escaped), and the histogram's bars with their counts as tooltips.
    assert "square: 3" in page.by_id["labels"] and "<i>label</i>: 1" in page.by_id["labels"]
    assert "score [0.9, 1.0]: 2" in page.by_id["scores"] and "score [0.5, 0.6): 1" in page.by_id["scores"]


def test_error_reasons_with_examples(report):
    built, _, html, page, _ = report
    text = page.by_id["errors"]
    for reason, n in (("not an image", 3), ("read failed", 1), ("truncated or corrupt JPEG data", 1)):
        assert f"{reason}: {n}" in text  # the bar's tooltip
    assert HOSTILE_ERROR_URI in text and HOSTILE_MESSAGE in text  # shown as text...
    assert "read failed: " in text and "z.jpg: not found" in text


def test_untrusted_text_is_escaped(report):
    _, _, html, page, _ = report
    assert "<script>alert" not in html and "<b>bold</b>" not in html and "<i>label</i>" not in html
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert html.count("<script") == 1  # the page's own
    # The markup file name is one attribute value and one caption, never an element of its own.
    assert not [a for t, a in page.elements if t == "img" and a.get("src") == "x"]
    assert any(t == "img" and a.get("alt", "").endswith(HOSTILE_OK) for t, a in page.elements)


def test_every_picture_is_a_local_file(report):
    _, path, html, page, _ = report
    folder = os.path.dirname(path)
    sources = [a["src"] for t, a in page.elements if t == "img"]
    assert len(sources) == 4  # 5 images qualify; gone.png has a card without a picture
    for src in sources:
        assert src.startswith("data:") or os.path.isfile(os.path.join(folder, src)), src
    # Nothing from the network: no link, script or picture elsewhere.
    refs = [v for _, a in page.elements for k, v in a.items() if k in ("src", "href") and v]
    assert not [r for r in refs if re.match(r"^[a-z]+://|^//", r)]


def test_sample_is_the_most_confident_images(report):
    built, _, html, page, logged = report
    order = ["hostile", "a", "b", "c", "gone"]  # best score 0.95, 0.9, 0.75, 0.6, 0.55; d has none
    assert [c.split(" best ")[0] for c in page.captions] == [built[k] for k in order]
    assert page.captions[0].endswith("best 0.950 · 1 detection ≥ 0.5")
    assert "of 5 with a detection of score ≥ 0.5" in page.by_id["sample"]
    assert "no picture: cannot read the image" in page.by_id["sample"] and "gone.png: not found" in html
    assert any("gone.png" in line for line in logged)


def test_sample_size_threshold_and_empty_results(tmp_path):
    built = build_report_results(str(tmp_path))
    write_report(built["out"], str(tmp_path / "r2"), log=lambda _: None)  # 4 pictures, then the same folder:
    path = write_report(built["out"], str(tmp_path / "r2"), sample=2, min_score=0.8, log=lambda _: None)
    page = Page(open(path, encoding="utf-8").read())
    assert len(page.captions) == 2 and "of 2 with a detection of score ≥ 0.8" in page.by_id["sample"]
    assert sorted(os.listdir(tmp_path / "r2" / "images")) == ["000.jpg", "001.jpg"]

    # A run with errors only: no charts to draw, no sample, still a page.
    out = Output(str(tmp_path / "errors-only"))
    rows = [image("/nowhere/e.jpg", error="empty file (0 bytes)")]
    out.write_bytes("images/part-000000.parquet", parquet_bytes(pa.Table.from_pylist(rows, IMAGES_SCHEMA)))
    path = write_report(str(tmp_path / "errors-only"), str(tmp_path / "r3"), log=lambda _: None)
    page = Page(open(path, encoding="utf-8").read())
    assert page.by_id["stat-images"] == "1 images" and "No detections." in page.by_id["labels"]
    assert "No ok image has a detection" in page.by_id["sample"] and "incomplete" in open(path).read()


@pytest.mark.parametrize(
    "model_id, shown",
    [
        ("torchvision:MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1", "maskrcnn_resnet50_fpn_v2"),
        ("torchvision:MaskRCNN_ResNet50_FPN_Weights.COCO_V1", "maskrcnn_resnet50_fpn"),
        ("checkpoint:maskrcnn_resnet18_fpn:0123456789abcdef", "maskrcnn_resnet18_fpn"),
    ],
)
def test_the_page_names_the_architecture_of_the_model_ids(tmp_path, model_id, shown):
    out = Output(str(tmp_path / "out"))
    rows = [{**image("/nowhere/e.jpg", error="empty file (0 bytes)"), "model_id": model_id}]
    out.write_bytes("images/part-000000.parquet", parquet_bytes(pa.Table.from_pylist(rows, IMAGES_SCHEMA)))
    path = write_report(str(tmp_path / "out"), str(tmp_path / "r"), log=lambda _: None)
    assert Page(open(path, encoding="utf-8").read()).by_id["architecture"] == shown


def test_report_of_s3_results_is_written_locally(s3, tmp_path):
    fs, bucket, moto_server = s3
    opts = {"client_kwargs": {"endpoint_url": moto_server}}
    build_results(f"s3://{bucket}/src", f"s3://{bucket}/out", fs.pipe_file, storage_options=opts)
    s3fs.S3FileSystem.clear_instance_cache()
    path = write_report(f"s3://{bucket}/out", str(tmp_path / "rep"), storage_options=opts, log=lambda _: None)
    page = Page(open(path, encoding="utf-8").read())
    assert page.by_id["stat-images"] == "8 images"
    sources = [a["src"] for t, a in page.elements if t == "img"]
    assert len(sources) == 3 and all(os.path.isfile(tmp_path / "rep" / s) for s in sources)
    assert [c.split(" best ")[0] for c in page.captions] == [
        f"s3://{bucket}/src/a.png",
        f"s3://{bucket}/src/b.jpg",
        f"s3://{bucket}/src/shards/s-000.tar#c.png",
    ]
