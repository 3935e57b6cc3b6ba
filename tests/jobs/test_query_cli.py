"""`jobs/query.py` as a user runs it (a subprocess: exit status and output), on what the real segment job wrote
locally and on a results folder stored on moto's S3 server."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from model.decode import decode_image
from pipeline.results.open import open_results
from pipeline.results.render import masks
from pipeline.results.sql import sql
from pipeline.segment.config import segment_config
from pipeline.segment.run import segment
from tests.conftest import TINY_MODEL
from tests.pipeline.results.test_optional_columns import write_minimal_results
from tests.pipeline.results.test_query import build_results

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "jobs", "query.py")


def query(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def segmented(ray_local, shapes_dir, tmp_path_factory):
    """The real segment job on 3 shapes images and one corrupt file (tiny random-weight model)."""
    root = tmp_path_factory.mktemp("segmented")
    files = sorted((shapes_dir / "val").glob("*.jpg"))[:3]
    broken = root / "broken.jpg"
    broken.write_bytes(files[0].read_bytes()[:300])
    manifest = root / "list.txt"
    manifest.write_text("\n".join(str(f) for f in [*files, broken]) + "\n")
    out = str(root / "out")
    cfg = segment_config({"input": {"url": str(manifest)}, "output": {"url": out}, "model": TINY_MODEL})
    run = segment(cfg, log=lambda _: None)
    assert run.complete and run.images == 4 and run.errors == 1
    return out, run


def test_summary_of_segment_job_output(segmented):
    out, run = segmented
    r = query(out, "summary", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    counts = [s["images"], s["ok"], s["errors"], s["detections"]]
    assert counts == [run.images, run.ok, run.errors, run.detections]
    assert s["labels"] == dict(run.labels) and s["error_reasons"] == dict(run.error_reasons)
    assert s["run_ids"] == [run.run_id] and s["model_ids"] == [run.model_id] and s["complete"]
    r = query(out, "summary")
    assert r.returncode == 0 and f"images: 4 (3 ok, 1 error)   detections: {run.detections}" in r.stdout


def test_sql_on_segment_job_output(segmented, tmp_path):
    out, run = segmented
    dets = open_results(out).table("detections")
    per_label = "SELECT label_name, count(*) AS n FROM detections GROUP BY 1 ORDER BY 1"
    r = query(out, "sql", per_label, "--format", "csv")
    assert r.returncode == 0, r.stderr
    got = {row["label_name"]: int(row["n"]) for row in csv.DictReader(io.StringIO(r.stdout))}
    names = dets.column("label_name").to_pylist()
    assert got == {n: names.count(n) for n in set(names)} and sum(got.values()) == run.detections > 0

    r = query(
        out, "sql", "SELECT image_uri, status, num_detections FROM images ORDER BY image_uri", "--limit", "2"
    )
    assert r.returncode == 0 and "num_detections" in r.stdout
    assert "(2 rows; more exist" in r.stdout.strip().splitlines()[-1]

    target = tmp_path / "dets.parquet"  # the format follows the name
    r = query(out, "sql", "SELECT * FROM detections WHERE score >= 0.1", "--output", str(target))
    assert r.returncode == 0, r.stderr
    assert pq.read_table(target).equals(sql(out, "SELECT * FROM detections WHERE score >= 0.1"))


def test_render_on_segment_job_output(segmented, tmp_path):
    out, _ = segmented
    results = open_results(out)
    r = query(out, "render", "--sample", "2", "--output", str(tmp_path / "sample"), "--min-score", "0")
    assert r.returncode == 0, r.stderr
    images = {row["image_uri"]: row for row in results.table("images").to_pylist()}
    written = sorted((tmp_path / "sample").glob("*.png"))
    assert [p.name[:4] for p in written] == ["000-", "001-"] and len(r.stdout.strip().splitlines()) == 2
    for line, path in zip(r.stdout.strip().splitlines(), written):
        uri = line.split()[-1]
        assert Image.open(path).size == (images[uri]["width"], images[uri]["height"])

    uri = r.stdout.strip().splitlines()[0].split()[-1]  # the image with the most detections
    target = tmp_path / "one.png"
    r = query(out, "render", uri, "--output", str(target), "--min-score", "0")
    assert r.returncode == 0, r.stderr
    rendered = np.asarray(Image.open(target).convert("RGB"))
    with open(uri, "rb") as f:
        source = decode_image(f.read(), max_pixels=10**8)
    assert rendered.shape == source.shape
    drawn = masks(results, uri)
    union = np.any([m for _, m in drawn], axis=0)
    assert union.any() and np.any(rendered != source, axis=-1)[union].mean() > 0.9


def test_errors_are_one_line(segmented, tmp_path):
    out, _ = segmented
    r = query(out, "sql", "SELEC count(*) FROM detections")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: SQL: Parser Error")
    r = query(out, "render", "no/such/image.jpg", "--output", str(tmp_path / "x.png"))
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: no/such/image.jpg: not in the results at {out} (image_uri is as the job wrote it)"
    )
    (tmp_path / "empty").mkdir()
    r = query(str(tmp_path / "empty"), "summary")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"error: {tmp_path / 'empty'}: no results here")
    r = query(out, "render", "--output", str(tmp_path / "x.png"))  # neither IMAGE_URI nor --sample
    assert r.returncode == 2 and "give either IMAGE_URI or --sample N" in r.stderr


def test_cli_on_s3_results(s3, tmp_path):
    fs, bucket, moto_server = s3
    opts = {"client_kwargs": {"endpoint_url": moto_server}}
    expected = build_results(f"s3://{bucket}/src", f"s3://{bucket}/out", fs.pipe_file, storage_options=opts)
    url = f"s3://{bucket}/out"
    results = open_results(url, storage_options=opts)

    r = query(
        url, "sql", "SELECT count(*) AS n FROM detections", "--format", "csv", "--endpoint-url", moto_server
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ['"n"', str(results.table("detections").num_rows)]

    # The endpoint from the standard variable, and the picture written back to S3.
    a = expected["uris"]["a"]
    r = query(
        url, "render", a, "--output", f"s3://{bucket}/renders/a.png", env={"AWS_ENDPOINT_URL": moto_server}
    )
    assert r.returncode == 0, r.stderr
    rendered = np.asarray(Image.open(io.BytesIO(fs.cat_file(f"{bucket}/renders/a.png"))).convert("RGB"))
    source = expected["sources"][a]
    assert rendered.shape == source.shape
    assert np.any(rendered != source, axis=-1)[expected["masks"][a][0]].all()

    r = query(f"s3://{bucket}/nothing", "summary", "--endpoint-url", moto_server)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: s3://{bucket}/nothing: no results here (no images/ folder; is this a segment job's --output?)"
    ]


def test_cli_on_results_from_another_tool(tmp_path):
    """Results with only the required columns (no `instance`, no `num_detections`, no sizes): every command works."""
    built = write_minimal_results(str(tmp_path / "minimal"))
    out = built["out"]
    r = query(out, "render", built["two"], "--output", str(tmp_path / "two.png"), "--min-score", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1:3] == ["160x120", "2"]
    r = query(out, "summary")
    assert r.returncode == 0 and "images: 3 (2 ok, 1 error)   detections: 3" in r.stdout, r.stderr
    r = query(out, "sql", "SELECT count(*) AS n FROM detections WHERE instance IS NULL", "--format", "csv")
    assert r.returncode == 0 and r.stdout.splitlines() == ['"n"', "3"], r.stderr
    r = query(out, "report", "--output", str(tmp_path / "report"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "report" / "index.html")
    assert len(list((tmp_path / "report" / "images").glob("*.jpg"))) == 2


@pytest.mark.parametrize(
    "drop, command",
    [
        ("detections.score", ["summary"]),
        ("detections.score", ["report", "--output", "REPORT"]),
        ("detections.mask", ["render", "TWO", "--output", "OUT"]),
        ("images.status", ["render", "--sample", "1", "--output", "OUT"]),
    ],
)
def test_cli_missing_required_column_is_one_error_line(tmp_path, drop, command):
    built = write_minimal_results(str(tmp_path / "r"), drop=(drop,))
    args = [
        {"TWO": built["two"], "OUT": str(tmp_path / "o.png"), "REPORT": str(tmp_path / "rep")}.get(a, a)
        for a in command
    ]
    r = query(built["out"], *args)
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {drop} is missing"), r.stderr


def test_report_cli_arguments(tmp_path):
    built = write_minimal_results(str(tmp_path / "r"))
    r = query(built["out"], "report", "--output", "s3://bucket/report")
    assert r.returncode == 2 and "report: --output is a local folder" in r.stderr
    r = query(built["out"], "report", "--output", str(tmp_path / "rep"), "--sample", "-1")
    assert r.returncode == 2 and "--sample N needs N >= 0" in r.stderr
    r = query(built["out"], "report", "--output", str(tmp_path / "rep"), "--min-score", "nan")
    assert r.returncode == 2 and "--min-score S needs 0 <= S <= 1" in r.stderr
