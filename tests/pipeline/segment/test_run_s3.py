"""Archive on a real S3 API (moto server on 127.0.0.1), results written back to it, read with pyarrow + pycocotools."""

import io
import tarfile

import pyarrow.dataset as pads
import pytest
import s3fs
from pycocotools import mask as mask_utils

from model.decode import decode_image
from pipeline.errors import JobError
from pipeline.segment.config import segment_config
from pipeline.segment.run import segment
from tests.conftest import TINY_MODEL
from tests.pipeline.segment.test_worker import assert_matches_reference, reference
from tests.support.s3inventory import write_inventory


def upload(fs, bucket, shapes_dir, n=6):
    files = sorted((shapes_dir / "val").glob("*.jpg"))[:n]
    for f in files[:4]:
        fs.pipe_file(f"{bucket}/archive/photos/{f.name}", f.read_bytes())
    fs.pipe_file(f"{bucket}/archive/photos/broken.JPEG", f.read_bytes()[:500])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for f in files[4:]:
            info = tarfile.TarInfo(f"member-{f.name}")
            data = f.read_bytes()
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    fs.pipe_file(f"{bucket}/archive/shards/s-000.tar", buf.getvalue())
    return files


def config(bucket, endpoint, **model):
    storage = {"endpoint_url": endpoint}
    # Explicit keys in the config (moto accepts any): they must never reach the written config or logs.
    secret_storage = {**storage, "key": "AKIDEXAMPLEKEY", "secret": "do-not-leak-this-secret"}
    return segment_config(
        {
            "input": {"url": f"s3://{bucket}/archive", "unit_size": 3, "storage": storage},
            "output": {"url": f"s3://{bucket}/results", "storage": secret_storage},
            "model": {**TINY_MODEL, **model},
        }
    )


def test_s3_archive_to_s3_parquet_matches_direct_model(ray_local, s3, shapes_dir):
    fs, bucket, endpoint = s3
    files = upload(fs, bucket, shapes_dir)
    logged: list[str] = []
    summary = segment(config(bucket, endpoint), log=logged.append)
    assert not any("do-not-leak" in line for line in logged + summary.lines())
    assert summary.complete and summary.images == 7 and summary.errors == 1

    s3fs.S3FileSystem.clear_instance_cache()
    reader = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    images = pads.dataset(f"{bucket}/results/images", filesystem=reader, format="parquet").to_table()
    dets = pads.dataset(f"{bucket}/results/detections", filesystem=reader, format="parquet").to_table()
    uris = sorted(images.column("image_uri").to_pylist())
    expected = sorted(
        [f"s3://{bucket}/archive/photos/{f.name}" for f in files[:4]]
        + [f"s3://{bucket}/archive/photos/broken.JPEG"]
        + [f"s3://{bucket}/archive/shards/s-000.tar#member-{f.name}" for f in files[4:]]
    )
    assert uris == expected
    bad = [r for r in images.to_pylist() if r["status"] == "error"]
    assert len(bad) == 1 and bad[0]["image_uri"].endswith("broken.JPEG")
    assert bad[0]["error"].startswith("truncated or corrupt")

    # The pipeline adds no error of its own: equal to torchvision called directly on the same decoded image.
    for f, uri in [
        (files[0], f"s3://{bucket}/archive/photos/{files[0].name}"),
        (files[5], f"s3://{bucket}/archive/shards/s-000.tar#member-{files[5].name}"),
    ]:
        img = decode_image(f.read_bytes(), max_pixels=10**8)
        rows = [r for r in dets.to_pylist() if r["image_uri"] == uri]
        assert_matches_reference(rows, reference([img])[0], *img.shape[:2])
        for r in rows:  # masks decode with pycocotools from what Parquet stored
            m = mask_utils.decode({"size": r["mask"]["size"], "counts": r["mask"]["counts"].encode()})
            assert m.shape == img.shape[:2] and m.sum() == r["area"]
    assert reader.exists(f"{bucket}/results/_SUCCESS.json")
    config_text = reader.cat_file(f"{bucket}/results/_config.json").decode()
    assert endpoint in config_text and "do-not-leak-this-secret" not in config_text
    assert "AKIDEXAMPLEKEY" not in config_text and '"secret": "***"' in config_text


def test_endpoint_from_aws_environment(ray_local, s3, shapes_dir, monkeypatch):
    fs, bucket, endpoint = s3
    upload(fs, bucket, shapes_dir, n=4)
    monkeypatch.setenv(
        "AWS_ENDPOINT_URL", endpoint
    )  # no storage section at all: the standard variable suffices
    s3fs.S3FileSystem.clear_instance_cache()
    cfg = segment_config(
        {
            "input": {"url": f"s3://{bucket}/archive/photos"},
            "output": {"url": f"s3://{bucket}/env-results"},
            "model": TINY_MODEL,
        }
    )
    summary = segment(cfg, log=lambda _: None)
    assert summary.complete and summary.images == 5


def test_missing_bucket_is_one_line_job_error(ray_local, s3):
    fs, bucket, endpoint = s3
    cfg = config(bucket, endpoint)
    cfg = segment_config(
        {
            "input": {"url": f"s3://no-such-bucket-{bucket}/x", "storage": {"endpoint_url": endpoint}},
            "output": {"url": f"s3://{bucket}/results", "storage": {"endpoint_url": endpoint}},
            "model": TINY_MODEL,
        }
    )
    with pytest.raises(JobError) as err:
        segment(cfg, log=lambda _: None)
    assert f"s3://no-such-bucket-{bucket}/x" in str(err.value) and "\n" not in str(err.value)


def test_s3_inventory_manifest_end_to_end(ray_local, s3, shapes_dir):
    fs, bucket, endpoint = s3
    files = sorted((shapes_dir / "val").glob("*.jpg"))[:3]
    fs.pipe_file(f"{bucket}/photos/a/x 1.jpg", files[0].read_bytes())
    fs.pipe_file(f"{bucket}/photos/b/y+z.jpg", files[1].read_bytes())
    fs.pipe_file(f"{bucket}/photos/c/shard.tar", b"")  # an empty shard: one error row for it
    rows = [
        [bucket, "photos/a/x 1.jpg", "10", "false"],  # written "photos/a/x+1.jpg": a space, form-encoded
        [bucket, "photos/b/y+z.jpg", "10", "false"],  # written "photos/b/y%2Bz.jpg"
        [bucket, "photos/readme.txt", "10", "false"],  # not an image: left out, counted
        [bucket, "photos/c/shard.tar", "0", "false"],
        [bucket, "photos/gone.jpg", "", "true"],  # a delete marker: not an object
        [bucket, "photos/a/", "0", "false"],  # a "folder" object
    ]
    url = write_inventory(fs, bucket, rows)
    logged: list[str] = []
    cfg = segment_config(
        {
            "input": {"url": url, "storage": {"endpoint_url": endpoint}},
            "output": {"url": f"s3://{bucket}/inv-results", "storage": {"endpoint_url": endpoint}},
            "model": TINY_MODEL,
        }
    )
    summary = segment(cfg, log=logged.append)
    assert summary.complete and summary.images == 3 and summary.ok == 2
    assert (
        "planning: skipped 1 inventory keys that are not images or .tar (each input is processed once)"
        in logged
    )
    assert any("2 S3 Inventory file(s) read by Ray tasks" in line for line in logged)
    s3fs.S3FileSystem.clear_instance_cache()
    reader = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    images = pads.dataset(f"{bucket}/inv-results/images", filesystem=reader, format="parquet").to_table()
    assert sorted(images.column("image_uri").to_pylist()) == [
        f"s3://{bucket}/photos/a/x 1.jpg",
        f"s3://{bucket}/photos/b/y+z.jpg",
        f"s3://{bucket}/photos/c/shard.tar",
    ]


def test_live_lease_refuses_a_second_run_and_a_dead_one_is_taken_over(ray_local, s3, shapes_dir):
    import json
    import time

    from pipeline.segment.lease import Lease
    from pipeline.segment.storage import Output

    fs, bucket, endpoint = s3
    upload(fs, bucket, shapes_dir, n=4)
    storage = {"endpoint_url": endpoint}
    data = {
        "input": {"url": f"s3://{bucket}/archive/photos", "storage": storage},
        "output": {"url": f"s3://{bucket}/leased", "storage": storage, "lease_s": 3},
        "model": TINY_MODEL,
    }
    cfg = segment_config(data)
    out = Output(cfg.output.url, storage_options=cfg.output.storage_options())
    # A live run holds the output: it renews its lease every second.
    with Lease(out, "run-A", ttl_s=3).acquire():
        t0 = time.monotonic()
        with pytest.raises(
            JobError, match=r"being written by run run-A \(host .*\), which renewed its lease"
        ):
            segment(cfg, log=lambda _: None)
        assert time.monotonic() - t0 < 10
    assert not fs.exists(f"{bucket}/leased/_lease.json")  # released
    # A run that died holding the lease: never renewed again. The next run waits one lease period, then takes over.
    dead = {"run_id": "run-dead", "host": "h", "pid": 1, "renewed_at": time.time(), "ttl_s": 3}
    fs.pipe_file(f"{bucket}/leased/_lease.json", json.dumps(dead).encode())
    logged: list[str] = []
    summary = segment(cfg, log=logged.append)
    assert summary.complete and summary.images == 5
    assert "took over the lease of run run-dead, which stopped renewing it" in logged
    assert not fs.exists(f"{bucket}/leased/_lease.json")
