"""Storage faults on a real S3 API: moto's server behind a fault-injecting proxy.

Transient faults (throttling, 5xx, connections dropped before the answer, bodies cut short) on input reads, listings
and result writes are retried — per request by botocore and s3fs, then by `pipeline.retry` with backoff — and the job
completes with exactly one ok row per input. Permanent ones (a bucket that does not exist, access denied by a bucket
policy, an endpoint where nothing listens) end the CLI with exit status 1 and ONE line `error: ... <url>: <cause>`,
and nothing claims completion: no `_SUCCESS.json`, and every `_committed/` record's files are whole.

The proxy (`tests/support/s3proxy.FaultyS3`) forwards each request to moto unless a rule (`Fault`) picks it; see there for the
kinds of failure and how requests are picked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipeline import retry
from pipeline.errors import JobError
from pipeline.segment.config import segment_config
from pipeline.segment.read import decoded_inputs
from pipeline.segment.run import segment
from pipeline.segment.sources import InputRef, iter_inputs
from pipeline.segment.units import Kind
from tests.conftest import TINY_MODEL, plan_units
from tests.support.images import jpeg_bytes, tar_bytes
from tests.support.s3 import free_port
from tests.support.s3proxy import KINDS, Fault, FaultyS3

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "jobs" / "segment_archive.py"

# --- what is transient -----------------------------------------------------------------------------------------------


def client_error(status: int, code: str):
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
    )


def test_transient_and_permanent_errors_are_told_apart():
    import aiohttp
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError

    def caused(exc: OSError, cause: BaseException) -> OSError:
        exc.__cause__ = cause  # how s3fs raises: an OSError translated from botocore's ClientError
        return exc

    transient = [
        client_error(503, "SlowDown"),
        client_error(500, "InternalError"),
        client_error(502, "502"),
        client_error(429, "TooManyRequests"),
        client_error(400, "RequestTimeout"),
        caused(OSError(121, "We encountered an internal error"), client_error(500, "InternalError")),
        OSError(16, "Please reduce your request rate."),  # s3fs's SlowDown, EBUSY
        ConnectionClosedError(endpoint_url="http://x"),
        aiohttp.ClientPayloadError("Response payload is not completed"),
        TimeoutError("read timed out"),
    ]
    permanent = [
        FileNotFoundError("s3://b/k"),
        PermissionError("Access Denied"),
        caused(PermissionError("Access Denied"), client_error(403, "AccessDenied")),
        caused(FileNotFoundError("The specified bucket does not exist"), client_error(404, "NoSuchBucket")),
        client_error(403, "InvalidAccessKeyId"),
        EndpointConnectionError(
            endpoint_url="http://127.0.0.1:9"
        ),  # nothing listens: botocore retried already
        ValueError("bad argument"),
    ]
    assert [retry.is_transient(e) for e in transient] == [True] * len(transient)
    assert [retry.is_transient(e) for e in permanent] == [False] * len(permanent)


# --- transient faults ------------------------------------------------------------------------------------------------

PHOTOS = [f"p{i:02d}.jpg" for i in range(10)]
MEMBERS = ["m0.jpg", "m1.jpg", "m2.jpg"]


@pytest.fixture(scope="module")
def archive(moto_server) -> str:
    """A bucket on moto (not behind the proxy) holding archive/photos/*.jpg and archive/shards/s0.tar."""
    import s3fs

    bucket = "faults-archive"  # a fixed name: the requests (and so which ones the proxy picks) are the same every run
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_server}, skip_instance_cache=True)
    fs.mkdir(bucket)
    data = {f"{bucket}/archive/photos/{n}": jpeg_bytes(64, 80, seed=i) for i, n in enumerate(PHOTOS)}
    shard = {n: jpeg_bytes(72, 64, seed=100 + i) for i, n in enumerate(MEMBERS)}
    data[f"{bucket}/archive/shards/s0.tar"] = tar_bytes(shard)
    fs.pipe(data)
    return bucket


def test_reads_that_outlast_the_libraries_retries_are_retried_not_error_rows(
    archive, moto_server, tmp_path, monkeypatch
):
    """Bodies cut short 6 times in a row: s3fs gives up after 5. Without `pipeline.retry` that is a `read failed`
    row (a loose file) or a broken-off shard; with it, every input is read whole. Read tasks' code, without Ray."""
    bucket = archive
    refs = [
        InputRef(Kind.FILES, f"s3://{bucket}/archive/photos/{n}", f"s3://{bucket}/archive/photos/{n}")
        for n in PHOTOS[:3]
    ]
    shard = f"s3://{bucket}/archive/shards/s0.tar"
    units = plan_units([*refs, InputRef(Kind.TARS, shard, shard)], plan_url=str(tmp_path / "plan"), unit_size=3)
    faults = [
        Fault("GET", r"/photos/p01\.jpg$", times=6, kinds=("cut",)),
        Fault("GET", r"/s0\.tar$", times=6, kinds=("cut",)),
    ]

    def read_all(proxy: FaultyS3) -> dict[str, dict]:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        opts = {"client_kwargs": {"endpoint_url": proxy.endpoint}}
        return {r.image_uri: r for u in units for r in decoded_inputs(u, input_options=opts, max_pixels=10**8, min_size=16, max_size=64)}

    monkeypatch.setattr(retry, "ATTEMPTS", 0)  # only the libraries' own retries
    with FaultyS3(moto_server, faults) as proxy:
        rows = read_all(proxy)
    assert proxy.injected[0] == proxy.injected[1] == 5  # s3fs's five tries, each cut
    broken = {u: r.error for u, r in rows.items() if r.error}
    assert broken[f"s3://{bucket}/archive/photos/p01.jpg"].startswith(
        f"read failed: s3://{bucket}/archive/photos/p01.jpg: ClientPayloadError, still failing after retries"
    )
    assert broken[f"s3://{bucket}/archive/shards/s0.tar"].startswith("corrupt or unreadable tar shard")

    monkeypatch.undo()
    with FaultyS3(moto_server, faults) as proxy:
        rows = read_all(proxy)
    assert proxy.injected[0] == proxy.injected[1] == 6
    expected = [f"s3://{bucket}/archive/photos/{n}" for n in PHOTOS[:3]]
    expected += [f"s3://{bucket}/archive/shards/s0.tar#{m}" for m in MEMBERS]
    assert sorted(rows) == sorted(expected)  # no shard row: the shard was read to its end
    assert all(r.error is None and r.columns["bytes"] for r in rows.values())
    assert sorted(r.index for r in rows.values() if "#" in r.image_uri) == [0, 1, 2]


def test_job_completes_through_transient_faults(ray_local, archive, moto_server):
    bucket = archive
    faults = [
        # Within the libraries' own retries: 30% of all distinct requests (reads, listings, HEADs, result
        # writes) fail once, by each of the four kinds in turn.
        Fault("*", r"", share=0.3, times=1),
        # Beyond them (botocore stops after 5 attempts at a 500, s3fs after 5 cut bodies): pipeline.retry's turn.
        Fault("GET", r"/photos/p03\.jpg$", times=5, kinds=("internal",)),
        Fault("GET", r"/photos/p07\.jpg$", times=6, kinds=("cut",)),
        Fault("GET", r"/shards/s0\.tar$", times=6, kinds=("cut",)),
        Fault("GET", r"list-type=2&prefix=archive%2Fphotos", times=5, kinds=("internal",)),
        Fault("PUT", r"/results/images/part-00000001\.parquet$", times=5, kinds=("internal",)),
        Fault("PUT", r"/results/_committed/00000002\.json$", times=5, kinds=("internal",)),
    ]
    with FaultyS3(moto_server, faults, seed=3) as proxy:
        storage = {"endpoint_url": proxy.endpoint}
        cfg = segment_config(
            {
                "input": {"url": f"s3://{bucket}/archive/", "unit_size": 4, "storage": storage},
                "output": {"url": f"s3://{bucket}/results", "storage": storage},
                "model": {**TINY_MODEL, "batch_size": 2},
            }
        )
        summary = segment(cfg, log=lambda _: None)
    assert all(proxy.injected[i] for i in range(len(faults))), proxy.injected  # every rule really fired
    assert proxy.total_injected / proxy.requests >= 0.2, (proxy.total_injected, proxy.requests)
    assert set(proxy.kinds) == set(KINDS)
    assert summary.complete and summary.units_total == 4, summary.lines()

    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_server})
    rows = pads.dataset(f"{bucket}/results/images", filesystem=fs, format="parquet").to_table().to_pylist()
    expected = [f"s3://{bucket}/archive/photos/{n}" for n in PHOTOS]
    expected += [f"s3://{bucket}/archive/shards/s0.tar#{m}" for m in MEMBERS]
    assert sorted(r["image_uri"] for r in rows) == sorted(expected)  # each input exactly once
    assert {(r["status"], r["error"]) for r in rows} == {("ok", None)}
    assert summary.images == summary.ok == len(expected)
    assert fs.exists(f"{bucket}/results/_SUCCESS.json")


def test_a_glob_lists_like_a_folder_walk_retried_and_never_silently_short(archive, moto_server, monkeypatch):
    """fsspec's glob walks with `on_error="omit"`: a listing that fails drops its folder's matches without a word,
    and the job would call itself complete with fewer inputs. Globs list through the same retried listing as
    folders: a transient failure is retried, a lasting one fails the listing."""
    import s3fs

    bucket = archive
    pattern = f"s3://{bucket}/archive/*/p0[0-4].jpg"  # 2 levels: archive/ is listed, then photos/ and shards/
    expected = [f"s3://{bucket}/archive/photos/p0{i}.jpg" for i in range(5)]
    photos_listing = r"list-type=2&prefix=archive%2Fphotos%2F&"

    def listed(proxy: FaultyS3) -> list[str]:
        s3fs.S3FileSystem.clear_instance_cache()
        opts = {"client_kwargs": {"endpoint_url": proxy.endpoint}}
        return [r.image_uri for r in iter_inputs(pattern, storage_options=opts)]

    with FaultyS3(moto_server, []) as proxy:
        assert listed(proxy) == expected
    # Beyond botocore's own retries (it stops after 5 attempts at a 500): pipeline.retry's turn.
    with FaultyS3(moto_server, [Fault("GET", photos_listing, times=5, kinds=("internal",))]) as proxy:
        assert listed(proxy) == expected
    assert proxy.injected[0] == 5
    monkeypatch.setattr(retry, "ATTEMPTS", 0)
    with FaultyS3(moto_server, [Fault("GET", photos_listing, times=100, kinds=("internal",))]) as proxy:
        with pytest.raises(OSError):
            listed(proxy)
    assert proxy.injected[0] >= 1


# --- permanent faults ------------------------------------------------------------------------------------------------


def deny_writes(endpoint: str, bucket: str, prefix: str) -> None:
    import boto3

    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:PutObject",
                "Resource": f"arn:aws:s3:::{bucket}/{prefix}*",
            }
        ],
    }
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


def run_cli(inputs: Path, output: str, endpoint: str) -> subprocess.CompletedProcess:
    """The segment job as a user runs it, with its own embedded Ray (short temp dir: Ray's socket paths)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with tempfile.TemporaryDirectory(prefix="sf-") as ray_tmp:
        env["RAY_TMPDIR"] = ray_tmp
        sets = [f"model.{k}={v}" for k, v in TINY_MODEL.items()] + [f"output.storage.endpoint_url={endpoint}"]
        cmd = [sys.executable, str(SCRIPT), "--input", str(inputs), "--output", output]
        cmd += [arg for s in sets for arg in ("--set", s)]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=400)


@pytest.mark.parametrize("case", ["missing-bucket", "access-denied", "dead-endpoint"])
def test_permanent_failure_ends_the_cli_with_one_line(case, moto_server, shapes_dir, tmp_path):
    import s3fs

    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in sorted((shapes_dir / "val").glob("*.jpg"))[:2]:
        (inputs / f.name).write_bytes(f.read_bytes())
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_server}, skip_instance_cache=True)
    bucket, endpoint = f"perm-{case}-{os.getpid()}", moto_server
    if case == "access-denied":
        fs.mkdir(bucket)
        deny_writes(moto_server, bucket, "results/")
        cause = "access denied"
    elif case == "missing-bucket":
        cause = "bucket does not exist"
    else:
        endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        cause = "storage endpoint unreachable"
    started = time.perf_counter()
    r = run_cli(inputs, f"s3://{bucket}/results", endpoint)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert errors == [r.stderr.strip().splitlines()[-1]], r.stderr[-3000:]  # one line, the last one
    assert re.fullmatch(
        rf"error: output: s3://{bucket}/results/_lease\.json: {cause}( \(.*\))?", errors[0]
    ), errors
    assert time.perf_counter() - started < 120  # permanent errors are not retried for minutes
    fs.invalidate_cache()
    if case == "missing-bucket":
        assert not fs.exists(bucket)  # reported, not created
    elif case == "access-denied":
        assert fs.find(f"{bucket}/results") == []  # nothing written, so nothing claimed done


def test_permanent_failure_mid_job_claims_nothing(ray_local, moto_server, shapes_dir):
    """Writes denied after the first unit is committed: the job stops with one line naming the URL and the cause;
    no `_SUCCESS.json`, and each completion record written before still promises whole data files."""
    import s3fs

    bucket = f"midjob-{os.getpid()}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_server}, skip_instance_cache=True)
    fs.mkdir(bucket)
    denied = threading.Event()

    def deny_after_first_commit() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            fs.invalidate_cache()
            if fs.exists(f"{bucket}/results/_committed") and fs.ls(f"{bucket}/results/_committed"):
                deny_writes(moto_server, bucket, "results/")
                denied.set()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=deny_after_first_commit, daemon=True)
    watcher.start()
    cfg = segment_config(
        {
            "input": {"url": str(shapes_dir / "val"), "unit_size": 2},
            "output": {"url": f"s3://{bucket}/results", "storage": {"endpoint_url": moto_server}},
            "model": {**TINY_MODEL, "batch_size": 1},
        }
    )
    with pytest.raises(JobError) as err:
        segment(cfg, log=lambda _: None)
    watcher.join(timeout=5)
    assert denied.is_set()
    message = str(err.value)
    assert "\n" not in message and re.search(rf"s3://{bucket}/results/\S+: access denied", message), message
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/results/_SUCCESS.json")
    records = fs.ls(f"{bucket}/results/_committed")
    assert 1 <= len(records) < 6  # 12 images in units of 2: the job stopped part-way
    for record in records:
        stats = json.loads(fs.cat_file(record))
        unit = stats["unit_id"]
        for folder, count in (("images", stats["images"]), ("detections", stats["detections"])):
            table = pads.dataset(f"{bucket}/results/{folder}/part-{unit}.parquet", filesystem=fs).to_table()
            assert table.num_rows == count
