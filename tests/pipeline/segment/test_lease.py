"""The output lease on a real S3 API (moto), without Ray: renewals, a takeover noticed by the run that lost it, and
conditional writes whose answers are lost on the way back (the write happened; the client saw a failure)."""

from __future__ import annotations

import json
import time

import pytest
import s3fs

from pipeline.errors import JobError
from pipeline.segment.lease import Lease
from pipeline.segment.storage import Output
from tests.support.s3proxy import Fault, FaultyS3


def output(endpoint: str, bucket: str) -> Output:
    s3fs.S3FileSystem.clear_instance_cache()
    return Output(f"s3://{bucket}/out", storage_options={"client_kwargs": {"endpoint_url": endpoint}})


def test_a_lease_is_renewed_and_a_run_that_lost_it_stops(s3):
    fs, bucket, endpoint = s3
    out = output(endpoint, bucket)
    with Lease(out, "run-A", ttl_s=3).acquire() as lease:
        first = fs.info(f"{bucket}/out/_lease.json", refresh=True)["ETag"]
        time.sleep(2.5)  # renewals every second
        assert fs.info(f"{bucket}/out/_lease.json", refresh=True)["ETag"] != first
        lease.check()
        # Another run takes the lease over (as after A's renewals failed for a whole period). A's renewal may land
        # between reading the ETag and the conditional write: then the write is refused, and B tries again.
        body = json.dumps({"run_id": "run-B", "host": "h", "pid": 2, "renewed_at": time.time()}).encode()
        for _ in range(10):
            etag = fs.info(f"{bucket}/out/_lease.json", refresh=True)["ETag"]
            try:
                fs.call_s3("put_object", Bucket=bucket, Key="out/_lease.json", Body=body, IfMatch=etag)
                break
            except OSError:  # s3fs's PreconditionFailed
                continue
        deadline = time.time() + 10
        while not lease.lost and time.time() < deadline:
            time.sleep(0.1)
        with pytest.raises(JobError, match=r"lost the lease on s3://.*/out \(run run-B holds it now"):
            lease.check()
    # A run that lost its lease leaves the new holder's lease alone.
    assert json.loads(fs.cat_file(f"{bucket}/out/_lease.json"))["run_id"] == "run-B"


@pytest.mark.parametrize("which", ["create", "renewal"])
def test_a_conditional_write_whose_answer_was_lost_is_recognised_as_ours(s3, moto_server, which):
    """The first attempt of the create (or of the first renewal) reaches S3 but its answer does not reach us;
    botocore tries again and S3 answers 412, the condition failing on our own write. The lease must stay ours."""
    fs, bucket, _ = s3
    after = (
        0 if which == "create" else 1
    )  # the create is the lease key's first PUT; the first renewal its second
    faults = [Fault("PUT", r"/out/_lease\.json$", after=after, times=1, kinds=("lose",))]
    with FaultyS3(moto_server, faults) as proxy:
        logged: list[str] = []
        with Lease(output(proxy.endpoint, bucket), "run-A", ttl_s=3).acquire(logged.append) as lease:
            assert logged == []  # neither waiting on its own lease nor "taking it over" from itself
            time.sleep(2.5)
            assert proxy.injected[0] == 1
            lease.check()
            assert json.loads(fs.cat_file(f"{bucket}/out/_lease.json"))["run_id"] == "run-A"
    assert not fs.exists(f"{bucket}/out/_lease.json")  # released
