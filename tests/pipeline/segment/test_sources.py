"""Input sources: a results `images` table is a manifest (every URI form the job writes), and each input's identity
at read time (`source_version`) is recorded and survives a resume across the column's introduction."""

from __future__ import annotations

import io
import os
import re

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import s3fs

from pipeline.results.open import open_results
from pipeline.segment.config import segment_config
from pipeline.segment.run import segment
from pipeline.segment.schema import IMAGES_SCHEMA
from pipeline.segment.sources import iter_inputs
from pipeline.segment.units import Kind
from tests.conftest import TINY_MODEL
from tests.support.images import tar_bytes


def _images(output_url: str, opts: dict) -> dict[str, dict]:
    rows = open_results(output_url, storage_options=opts).table("images").to_pylist()
    return {r["image_uri"]: r for r in rows}


def test_a_results_images_table_segments_as_a_manifest(ray_local, s3, shapes_dir, tmp_path):
    """s3:// keys, absolute local paths and `.tar` members (read from their shard) round-trip: the SQL subset of a
    first run's `images`, written as Parquet, is the input of a second run, which names every input as the first
    did and records the same identities."""
    fs, bucket, endpoint = s3
    jpgs = sorted((shapes_dir / "val").glob("*.jpg"))
    for f in jpgs[:2]:
        fs.pipe_file(f"{bucket}/in/{f.name}", f.read_bytes())
    local = tmp_path / "local"
    local.mkdir()
    (local / jpgs[2].name).write_bytes(jpgs[2].read_bytes())
    (local / "s.tar").write_bytes(tar_bytes({f"x/{f.name}": f.read_bytes() for f in jpgs[3:5]}))
    listing = [f"s3://{bucket}/in/{f.name}" for f in jpgs[:2]] + [str(local / jpgs[2].name), str(local / "s.tar")]
    # On S3, so that its s3:// entries are read with the job's endpoint (a manifest's entries use its own options).
    fs.pipe_file(f"{bucket}/first.txt", "\n".join(listing).encode())
    storage = {"endpoint_url": endpoint}
    opts = {"client_kwargs": {"endpoint_url": endpoint}}

    def run(input_url: str, output: str):
        cfg = {
            "input": {"url": input_url, "unit_size": 2, "storage": storage},
            "output": {"url": f"s3://{bucket}/{output}", "storage": storage},
            "model": TINY_MODEL,
        }
        summary = segment(segment_config(cfg), log=lambda _: None)
        assert summary.complete
        return _images(f"s3://{bucket}/{output}", opts)

    first = run(f"s3://{bucket}/first.txt", "out1")
    members = [f"{local}/s.tar#x/{f.name}" for f in jpgs[3:5]]
    assert sorted(first) == sorted(listing[:3] + members)
    assert all(r["status"] == "ok" for r in first.values())

    # What a user does: SQL over the results, written as Parquet (here the members and one of each other form).
    from pipeline.results.sql import sql

    subset = sql(
        open_results(f"s3://{bucket}/out1", storage_options=opts),
        "SELECT image_uri FROM images WHERE image_uri LIKE '%.tar#%' OR image_uri LIKE 's3://%' "
        "OR image_uri LIKE '/%' ORDER BY image_uri",
    )
    buf = io.BytesIO()
    pq.write_table(subset, buf)
    fs.pipe_file(f"{bucket}/redo.parquet", buf.getvalue())
    second = run(f"s3://{bucket}/redo.parquet", "out2")
    assert sorted(second) == sorted(first)
    assert all(r["status"] == "ok" for r in second.values())
    for uri, row in second.items():  # the same bytes read, the same identity recorded
        assert row["source_version"] == first[uri]["source_version"] and row["bytes"] == first[uri]["bytes"]
    assert re.fullmatch(r'etag="?[0-9a-f]{32}"?', first[listing[0]]["source_version"])
    local_version = first[listing[2]]["source_version"]
    assert re.fullmatch(r"size=\d+ mtime=\d{4}-\d\d-\d\dT[0-9:.]+Z", local_version), local_version
    assert first[members[0]]["source_version"] == first[members[1]]["source_version"]  # the shard's


def test_relative_paths_in_an_image_uri_column_resolve_as_the_job_resolved_them(tmp_path, monkeypatch):
    """The job names inputs of a relative `--input` relative to its working directory; a manifest's `image_uri`
    column is that naming, wherever the manifest file lies (other columns stay relative to the manifest)."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    (tmp_path / "lists").mkdir()
    monkeypatch.chdir(tmp_path)
    names = [r.image_uri for r in iter_inputs("photos")]
    assert names == ["photos/a.jpg"]
    pq.write_table(pa.table({"image_uri": names}), tmp_path / "lists" / "redo.parquet")
    [ref] = iter_inputs(str(tmp_path / "lists" / "redo.parquet"))
    assert (ref.kind, ref.image_uri, ref.read_url) == (Kind.FILES, "photos/a.jpg", str(tmp_path / "photos/a.jpg"))
    pq.write_table(pa.table({"path": ["../photos/a.jpg"]}), tmp_path / "lists" / "rel.parquet")
    [ref] = iter_inputs(str(tmp_path / "lists" / "rel.parquet"))
    assert ref.read_url == str(tmp_path / "photos" / "a.jpg")


def test_an_output_begun_before_source_version_resumes_and_reads_as_one_table(ray_local, shapes_dir, tmp_path):
    """Files written before the column existed lack it; a resumed run adds files with it. Every reader the docs
    name reads them as one table, the column null in the older files."""
    src = tmp_path / "in"
    src.mkdir()
    for f in sorted((shapes_dir / "val").glob("*.jpg"))[:4]:
        (src / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out"
    cfg = segment_config(
        {"input": {"url": str(src), "unit_size": 2}, "output": {"url": str(out)}, "model": TINY_MODEL}
    )
    assert segment(cfg, log=lambda _: None).complete
    # Make unit 0 as an older version wrote it (no column), and unit 1 not yet done (no record, no files).
    old = out / "images" / "part-00000000.parquet"
    pq.write_table(pq.read_table(old).drop_columns(["source_version"]), old)
    for name in ("images/part-00000001.parquet", "detections/part-00000001.parquet", "_committed/00000001.json"):
        os.remove(out / name)
    for name in os.listdir(out / "_stats"):
        os.remove(out / "_stats" / name)
    os.remove(out / "_SUCCESS.json")
    logged: list[str] = []
    summary = segment(cfg, log=logged.append)
    assert summary.complete and summary.units_committed == 1 and summary.units_skipped == 1

    def check(rows: list[dict]) -> None:
        versions = {os.path.basename(r["image_uri"]): r["source_version"] for r in rows}
        assert len(versions) == 4
        assert sorted(pd.isna(v) for v in versions.values()) == [False, False, True, True]  # pandas: NaN

    check(open_results(str(out)).table("images").to_pylist())  # jobs/query.py, pipeline.results
    glob = str(out / "images" / "*.parquet")
    check(duckdb.sql(f"SELECT * FROM read_parquet('{glob}', union_by_name = true)").to_arrow_table().to_pylist())
    check(pd.read_parquet(out / "images", schema=IMAGES_SCHEMA).to_dict("records"))
    check(pads.dataset(out / "images", schema=IMAGES_SCHEMA).to_table().to_pylist())
    import ray

    check(ray.data.read_parquet(str(out / "images"), schema=IMAGES_SCHEMA).take_all())
    s3fs.S3FileSystem.clear_instance_cache()
