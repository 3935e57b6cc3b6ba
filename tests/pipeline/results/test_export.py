"""`pipeline.results.export` / `jobs/query.py RESULTS export`: the COCO instances file for labelling tools.

Results folders are built with the job's writer and schemas from masks of known shapes (several classes, masks that
overlap, tar members of two shards, an error row, an image without detections), so every expected value is exact.
The export is checked by pycocotools itself (`COCO()` loads it) and by a round trip: scored as ground truth against the
same results by `pipeline.results.evaluate` (what `jobs/evaluate.py` runs), it gives AP 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.results import export
from pipeline.results.common import QueryError
from pipeline.results.evaluate import evaluate_results
from pipeline.results.export import CATEGORY_IDS_LABEL, CATEGORY_IDS_SORTED, export_coco, file_name
from pipeline.results.open import open_results
from pipeline.segment.schema import DETECTIONS_SCHEMA, IMAGES_SCHEMA
from pipeline.segment.storage import Output
from pipeline.segment.writer import parquet_bytes
from tests.pipeline.results.test_optional_columns import write_minimal_results
from tests.pipeline.results.test_query import box_mask, detection, disc_mask, image
from tests.support.results import write_units

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
LABELS = {"square": 1, "circle": 2, "triangle": 7}  # the model's indices: not 1..K, so the rule shows


def triangle_mask(h, w, y0, x0, size) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return (y >= y0) & (y < y0 + size) & (x >= x0) & (x - x0 <= y - y0)


def build(out_url: str, src: str, storage_options: dict | None = None) -> dict:
    """Two units of results under `out_url` for inputs under `src` (never read: the export reads no image).

    `photos/a.png` (120×160): a square, a disc over half of it and a second square over both; `photos/sub/b.jpg`
    (80×60): a disc and a triangle crossing it; tar members `s-000.tar#c.png` (64×64: a triangle, a square inside it)
    and `s-001.tar#dir/d.png` (no detection), `s-001.tar#e.png` (50×40: a disc); `photos/broken.jpg` in error.
    """
    ua, ub = f"{src}/photos/a.png", f"{src}/photos/sub/b.jpg"
    uc, ud, ue = (
        f"{src}/shards/s-000.tar#c.png",
        f"{src}/shards/s-001.tar#dir/d.png",
        f"{src}/shards/s-001.tar#e.png",
    )
    dets_1 = [
        detection(ua, 0, 1, "square", 0.9, box_mask(120, 160, 10, 60, 10, 70), "run-1"),
        detection(ua, 1, 2, "circle", 0.8, disc_mask(120, 160, 35, 70, 25), "run-1"),
        detection(ua, 2, 1, "square", 0.3, box_mask(120, 160, 30, 90, 40, 100), "run-1"),
        detection(ub, 0, 2, "circle", 0.7, disc_mask(80, 60, 40, 30, 18), "run-1"),
        detection(ub, 1, 7, "triangle", 0.55, triangle_mask(80, 60, 20, 10, 40), "run-1"),
    ]
    dets_2 = [
        detection(uc, 0, 7, "triangle", 0.95, triangle_mask(64, 64, 5, 5, 50), "run-2"),
        detection(uc, 1, 1, "square", 0.2, box_mask(64, 64, 30, 50, 10, 25), "run-2"),
        detection(ue, 0, 2, "circle", 0.6, disc_mask(50, 40, 25, 20, 12), "run-2"),
    ]
    images_1 = [
        image(ua, shape=(120, 160), n=3),
        image(ub, shape=(80, 60), n=2),
        image(
            f"{src}/photos/broken.jpg",
            error="truncated or corrupt JPEG data: OSError: image file is truncated",
        ),
    ]
    images_2 = [
        image(uc, shape=(64, 64), n=2, run_id="run-2"),
        image(ud, shape=(40, 50), n=0, run_id="run-2"),
        image(ue, shape=(50, 40), n=1, run_id="run-2"),
    ]
    units = {"000000": (images_1, dets_1), "000001": (images_2, dets_2)}
    write_units(out_url, units, storage_options=storage_options)
    return {"uris": {"a": ua, "b": ub, "c": uc, "d": ud, "e": ue}, "detections": dets_1 + dets_2}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    expected = build(str(root / "out"), str(root / "src"))
    return open_results(str(root / "out")), expected, str(root)


def load(path: str) -> COCO:
    return COCO(path)  # pycocotools' own loader: the validity check


def check_against_results(coco: COCO, detections: list[dict], uris: dict[str, str]) -> None:
    """Every annotation is one detection of the results, field for field, and every detection is there."""
    by_image = {img["id"]: img for img in coco.dataset["images"]}
    cats = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    got = sorted(
        (
            uris[by_image[a["image_id"]]["file_name"]],
            cats[a["category_id"]],
            a["area"],
            a["bbox"],
            a["segmentation"]["counts"],
            a["score"],
        )
        for a in coco.dataset["annotations"]
    )
    want = sorted(
        (d["image_uri"], d["label_name"], d["area"], d["bbox"], d["mask"]["counts"], d["score"])
        for d in detections
    )
    assert [g[:5] for g in got] == [w[:5] for w in want]
    # Scores are float32 in the results: written as the shortest decimal that reads back as the same float32.
    assert [np.float32(g[5]) for g in got] == [np.float32(w[5]) for w in want]
    for a in coco.dataset["annotations"]:
        rle = {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
        img = by_image[a["image_id"]]
        assert int(mask_utils.area(rle)) == a["area"] and rle["size"] == [img["height"], img["width"]]
        assert a["iscrowd"] == 0 and coco.annToMask(a).shape == (img["height"], img["width"])


def test_coco_file_loads_in_pycocotools_with_every_count_and_area(local, tmp_path):
    results, expected, _ = local
    out = str(tmp_path / "coco.json")
    pool = pa.default_memory_pool().backend_name
    done = export_coco(results, out)
    assert pa.default_memory_pool().backend_name == pool  # the export's own pool is given back
    coco = load(out)
    u = expected["uris"]
    assert (done.images, done.annotations, done.categories) == (5, 8, 3)
    assert (done.error_images, done.below_min_score, done.category_ids) == (1, 0, CATEGORY_IDS_LABEL)
    assert len(coco.getImgIds()) == 5 and len(coco.getAnnIds()) == 8 and len(coco.getCatIds()) == 3
    assert coco.dataset["categories"] == [
        {"id": i, "name": n} for n, i in sorted(LABELS.items(), key=lambda c: c[1])
    ]
    # Image ids in image_uri order; a plain file by its whole image_uri, a tar member by its member path.
    names = [(img["id"], img["file_name"], img["width"], img["height"]) for img in coco.dataset["images"]]
    assert names == [(1, u["a"], 160, 120), (2, u["b"], 60, 80), (3, "c.png", 64, 64), (4, "dir/d.png", 50, 40),
                     (5, "e.png", 40, 50)]  # fmt: skip
    uris = {u["a"]: u["a"], u["b"]: u["b"], "c.png": u["c"], "dir/d.png": u["d"], "e.png": u["e"]}
    check_against_results(coco, expected["detections"], uris)
    assert [a["id"] for a in coco.dataset["annotations"]] == list(range(1, 9))
    assert len(coco.getAnnIds(imgIds=[4])) == 0 and len(coco.getAnnIds(imgIds=[1])) == 3
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary file left


def test_round_trip_through_evaluate_gives_ap_one(local, tmp_path):
    """The export as ground truth for the same results: every detection matches its own annotation."""
    results, _, _ = local
    for root in (None, f"{local[2]}/src"):
        out = str(tmp_path / "gt.json")
        export_coco(results, out, images_root=root)
        with open(out) as f:
            gt = json.load(f)
        ev = evaluate_results(results, gt, verbose=False)
        assert ev.summary_line() == "bbox_AP=1.000 segm_AP=1.000", root
        assert (ev.matched_images, ev.missing_images, ev.unmatched_results) == (5, 0, 1)  # 1: the error row
        assert len(ev.predictions) == 8 and not ev.skipped_labels


def test_images_root_strips_a_folder_prefix(local, tmp_path):
    results, expected, root = local
    u = expected["uris"]
    for given in (f"{root}/src", f"{root}/src/", f"{root}/./src"):  # a folder, normalised
        export_coco(results, str(tmp_path / "coco.json"), images_root=given)
        names = [img["file_name"] for img in load(str(tmp_path / "coco.json")).dataset["images"]]
        assert names == ["photos/a.png", "photos/sub/b.jpg", "c.png", "dir/d.png", "e.png"]
    assert file_name(u["a"], f"{root}/src/photos/") == "a.png"
    assert file_name("s3://b/x/s.tar#./cat/1.jpg", "s3://b/elsewhere/") == "cat/1.jpg"  # members: their path
    # A folder, not a string prefix: `.../src/pho` does not hold `.../src/photos/a.png`.
    with pytest.raises(QueryError, match=r"--images-root .*/src/pho/: .*/photos/a\.png is not under it"):
        export_coco(results, str(tmp_path / "bad.json"), images_root=f"{root}/src/pho")
    assert not os.path.exists(tmp_path / "bad.json") and not [
        p for p in os.listdir(tmp_path) if p.startswith(".")
    ]


def test_where_selects_images_and_min_score_detections(local, tmp_path):
    results, expected, _ = local
    u = expected["uris"]
    out = str(tmp_path / "coco.json")

    done = export_coco(results, out, where="image_uri LIKE '%/photos/%'", min_score=0.5)
    coco = load(out)
    assert [img["file_name"] for img in coco.dataset["images"]] == [u["a"], u["b"]]
    assert sorted(a["score"] for a in coco.dataset["annotations"]) == [0.55, 0.7, 0.8, 0.9]
    assert (done.annotations, done.below_min_score) == (4, 1)
    # Categories stay those of the whole results (stable ids across exports), even with no triangle exported.
    export_coco(results, out, where="image_uri LIKE '%/photos/a.png'")
    coco = load(out)
    assert len(coco.dataset["categories"]) == 3 and len(coco.dataset["annotations"]) == 3

    # --where may ask the detections table; error rows are never exported, whatever it says.
    export_coco(
        results, out, where="image_uri IN (SELECT image_uri FROM detections WHERE label_name = 'triangle')"
    )
    assert [img["file_name"] for img in load(out).dataset["images"]] == [u["b"], "c.png"]
    done = export_coco(results, out, where="status = 'error' OR width < 50")
    assert [img["file_name"] for img in load(out).dataset["images"]] == ["e.png"] and done.error_images == 1

    # Nothing selected, or everything below the score: still a valid file.
    done = export_coco(results, out, where="false")
    coco = load(out)
    assert (done.images, done.annotations, len(coco.dataset["images"]), len(coco.dataset["annotations"])) == (
        0,
        0,
        0,
        0,
    )
    done = export_coco(results, out, min_score=1.0)
    assert (done.images, done.annotations, done.below_min_score) == (5, 0, 8) and len(
        load(out).getAnnIds()
    ) == 0


def test_bad_where_is_one_line_and_writes_nothing(local, tmp_path):
    results, _, _ = local
    with pytest.raises(QueryError, match=r"^--where: .*no_such_column") as e:
        export_coco(results, str(tmp_path / "x.json"), where="no_such_column = 1")
    assert "\n" not in str(e.value) and not os.listdir(tmp_path)


def write_images(out: str, uris: list[str]) -> None:
    """A results folder of 20×20 images at `uris`, a square detected in each."""
    m = box_mask(20, 20, 2, 8, 2, 8)
    images = [image(u, shape=(20, 20), n=1) for u in uris]
    dets = [detection(u, 0, 1, "square", 0.9, m, "r") for u in uris]
    Output(out).write_bytes(
        "images/part-0.parquet", parquet_bytes(pa.Table.from_pylist(images, IMAGES_SCHEMA))
    )
    Output(out).write_bytes(
        "detections/part-0.parquet", parquet_bytes(pa.Table.from_pylist(dets, DETECTIONS_SCHEMA))
    )


def test_images_that_would_share_a_file_name_are_an_error(tmp_path):
    src = str(tmp_path / "src")
    out = str(tmp_path / "two-members")
    write_images(out, [f"{src}/s-000.tar#x/1.png", f"{src}/s-001.tar#x/1.png", f"{src}/s-001.tar#x/2.png"])
    with pytest.raises(QueryError, match=r"^file_name 'x/1.png' would name two images"):
        export_coco(out, str(tmp_path / "x.json"))
    export_coco(out, str(tmp_path / "x.json"), where="image_uri LIKE '%s-000.tar%'")
    assert load(str(tmp_path / "x.json")).dataset["images"][0]["file_name"] == "x/1.png"

    out = str(tmp_path / "member-and-file")  # a member and a plain file of the same path under the root
    write_images(out, [f"{src}/x/1.png", f"{src}/s-000.tar#x/1.png"])
    export_coco(out, str(tmp_path / "x.json"))  # without a root, the file is named by its whole path
    with pytest.raises(QueryError, match=r"^file_name 'x/1.png' would name two images"):
        export_coco(out, str(tmp_path / "x.json"), images_root=src)

    out = str(tmp_path / "twice")
    write_images(out, [f"{src}/a.png", f"{src}/b.png", f"{src}/a.png"])
    with pytest.raises(QueryError, match=r"^images: .*/a.png is in the results twice"):
        export_coco(out, str(tmp_path / "x.json"))


def test_image_ids_survive_hash_collisions(local, tmp_path, monkeypatch):
    """Every URI of one hash: each lookup falls back to comparing URIs, and the file is the same as without."""
    results, _, _ = local
    export_coco(results, str(tmp_path / "plain.json"))
    monkeypatch.setattr(
        export, "hash", lambda _: 7, raising=False
    )  # the module's `hash`, shadowing the builtin
    export_coco(results, str(tmp_path / "collided.json"))
    plain, collided = (json.loads((tmp_path / name).read_text()) for name in ("plain.json", "collided.json"))
    assert [plain[k] for k in ("images", "annotations")] == [collided[k] for k in ("images", "annotations")]
    out, src = str(tmp_path / "twice"), str(tmp_path / "src")
    write_images(out, [f"{src}/a.png", f"{src}/b.png", f"{src}/a.png"])  # not next to each other by hash
    with pytest.raises(QueryError, match=r"^images: .*/a.png is in the results twice"):
        export_coco(out, str(tmp_path / "x.json"))


def test_json_strings_escape_what_json_needs():
    """RLE counts hold backslashes (ASCII 48..111); anything else JSON escapes takes the exact way."""
    for values in (["ab\\c", "\\\\", "plain", ""], ['a"b', "tab\there", "new\nline", "\\"]):
        text = export._json_strings(pa.array(values)).to_pylist()
        assert [json.loads(t) for t in text] == values


def test_results_from_another_tool(tmp_path):
    """Only the required columns: no label (ids by sorted name), no area or size (both read from the masks)."""
    minimal = write_minimal_results(str(tmp_path / "minimal"))
    out = str(tmp_path / "coco.json")
    done = export_coco(minimal["out"], out)
    coco = load(out)
    assert done.category_ids == CATEGORY_IDS_SORTED
    assert coco.dataset["categories"] == [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]
    assert [(i["width"], i["height"]) for i in coco.dataset["images"]] == [(160, 120), (160, 120)]
    areas = sorted(a["area"] for a in coco.dataset["annotations"])
    assert areas == sorted(
        [int(minimal["disc"].sum()), int(minimal["square"].sum()), int(minimal["square"].sum())]
    )

    broken = write_minimal_results(str(tmp_path / "broken"), drop=("detections.label_name",))
    with pytest.raises(QueryError, match=r"detections\.label_name is missing"):
        export_coco(broken["out"], out)


def test_streams_to_s3_and_leaves_nothing_on_failure(s3, tmp_path):
    fs, bucket, endpoint = s3
    opts = {"client_kwargs": {"endpoint_url": endpoint}}
    expected = build(f"s3://{bucket}/out", f"s3://{bucket}/src", storage_options=opts)
    url = f"s3://{bucket}/exports/coco.json"

    done = export_coco(f"s3://{bucket}/out", url, images_root=f"s3://{bucket}/src", storage_options=opts)
    assert (done.images, done.annotations) == (5, 8)
    local_copy = tmp_path / "coco.json"
    local_copy.write_bytes(fs.cat_file(url))
    coco = load(str(local_copy))
    names = {"photos/a.png": "a", "photos/sub/b.jpg": "b", "c.png": "c", "dir/d.png": "d", "e.png": "e"}
    check_against_results(coco, expected["detections"], {k: expected["uris"][v] for k, v in names.items()})
    with open(local_copy) as f:
        ev = evaluate_results(
            open_results(f"s3://{bucket}/out", storage_options=opts), json.load(f), verbose=False
        )
    assert ev.summary_line() == "bbox_AP=1.000 segm_AP=1.000"

    # A failure after the upload began (an image outside the root): no object, no multipart upload left open.
    bad = f"s3://{bucket}/exports/bad.json"
    with pytest.raises(QueryError, match="is not under it"):
        export_coco(
            f"s3://{bucket}/out", bad, images_root=f"s3://{bucket}/src/photos/sub", storage_options=opts
        )
    fs.invalidate_cache()
    assert not fs.exists(bad) and fs.ls(f"{bucket}/exports") == [f"{bucket}/exports/coco.json"]
    assert not fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")

    with pytest.raises(QueryError, match=r"^output: s3://no-such-bucket-x/coco.json: bucket does not exist"):
        export_coco(f"s3://{bucket}/out", "s3://no-such-bucket-x/coco.json", storage_options=opts)


def query_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", "query.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_export_and_its_one_line_errors(local, tmp_path):
    _, _, root = local
    out = str(tmp_path / "labels" / "coco.json")
    r = query_cli(f"{root}/out", "export", "--format", "coco", "--output", out, "--min-score", "0.5",
                  "--images-root", f"{root}/src", "--where", "width > 50")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == (
        f"3 images, 5 annotations, 3 categories (ids: label index) written to {out} (coco)"
    ), r.stdout
    assert [i["file_name"] for i in load(out).dataset["images"]] == [
        "photos/a.png",
        "photos/sub/b.jpg",
        "c.png",
    ]

    r = query_cli(f"{root}/out", "export", "--output", out, "--where", "widht > 10")
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: --where: Binder Error:"), (
        r.stderr
    )
    assert 'Candidate bindings: "width"' in r.stderr or "width" in r.stderr

    r = query_cli(f"{root}/out", "export", "--output", out, "--min-score", "1.5")
    assert r.returncode == 2 and "--min-score S needs 0 <= S <= 1" in r.stderr
