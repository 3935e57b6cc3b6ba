"""An actor runs two units at once (the next one reads while the last one commits): killed at exactly that moment,
both units run again and every input still has exactly one images row."""

import s3fs

from tests.reliability.segment_job import Job, assert_exactly_once, finish_killing_actors_when
from tests.support.s3proxy import Fault, FaultyS3


def test_the_actor_killed_while_unit_k_commits_and_unit_k_plus_1_reads(moto_server, shapes_dir, tmp_path):
    bucket = f"ov-{tmp_path.name[-12:].lower().replace('_', '-')}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_server}, skip_instance_cache=True)
    fs.mkdir(bucket)
    files = sorted((shapes_dir / "val").glob("*.jpg"))[:6]
    for f in files:
        fs.pipe(f"{bucket}/in/{f.name}", f.read_bytes())
    expected = [f"s3://{bucket}/in/{f.name}" for f in files]
    next_unit = [f.name for f in files[2:4]]  # unit 1 (units of 2 inputs, in name order)
    seen_reading: list[str] = []
    # Unit 0's upload of its images file is held: the actor is then committing unit 0.
    hold = Fault("PUT", r"/out/images/part-00000000", kinds=("stall",), delay_s=60)
    with FaultyS3(moto_server, [hold]) as proxy:
        sets = [
            f"input.storage.endpoint_url={proxy.endpoint}",
            f"output.storage.endpoint_url={proxy.endpoint}",
        ]
        job = Job(f"s3://{bucket}/in", f"s3://{bucket}/out", tmp_path, "overlap", sets=sets)

        def note_unit_1_reads() -> None:
            with proxy._lock:
                requested = list(proxy._attempts)
            seen_reading.extend(n for n in next_unit if any(f"GET /{bucket}/in/{n}" in r for r in requested))

        code, killed = finish_killing_actors_when(job, proxy.stalled, note_unit_1_reads)
    assert code == 0, job.output()
    assert killed, "the actor was not found while it committed"
    assert seen_reading, "unit 1 had not started reading while unit 0 committed"
    rows = assert_exactly_once(f"{bucket}/out", expected, filesystem=fs)
    assert {r["status"] for r in rows.values()} == {"ok"}
