"""UnitCommitter: a unit is written once, when all of its inputs have arrived, whatever order and repeats Ray
delivers its rows in (retried tasks, tasks re-executed after a node is lost)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.commit import Output, UnitCommitter
from pipeline.schema import RESULT_SCHEMA


def rows(unit: str, indices: list[int], total: int) -> pa.Table:
    det = {
        "instance": 0,
        "label": 1,
        "label_name": "person",
        "score": 0.9,
        "bbox": [0.0, 0.0, 2.0, 2.0],
        "area": 4,
        "mask": {"size": [4, 4], "counts": "04"},
    }
    return pa.Table.from_pylist(
        [
            {
                "image_uri": f"s3://b/{unit}-{i}.jpg",
                "status": "ok",
                "height": 4,
                "width": 4,
                "num_detections": 1,
                "unit_id": unit,
                "unit_index": i,
                "unit_total": total,
                "detections": [det],
            }
            for i in indices
        ],
        schema=RESULT_SCHEMA,
    )


def test_unit_commits_once_with_each_input_once(tmp_path):
    out = Output(str(tmp_path))
    c = UnitCommitter(out)
    assert c.add(pa.concat_tables([rows("u0", [2], 3), rows("u1", [0], 2)])) == []
    assert c.add(rows("u0", [0, 2], 3)) == []  # index 2 again: a retried task
    assert c.pending_units == ["u0", "u1"]
    [stats] = c.add(rows("u0", [1], 3))
    assert (stats.unit_id, stats.images, stats.detections) == ("u0", 3, 3)
    images = pq.read_table(tmp_path / "images" / "part-u0.parquet")
    assert images.column("image_uri").to_pylist() == [f"s3://b/u0-{i}.jpg" for i in range(3)]
    assert pq.read_table(tmp_path / "detections" / "part-u0.parquet").num_rows == 3
    assert out.committed_units() == {"u0"} and c.pending_units == ["u1"]


def test_rows_of_a_committed_unit_delivered_again_are_ignored(tmp_path):
    out = Output(str(tmp_path))
    c = UnitCommitter(out)
    [stats] = c.add(rows("u0", [0, 1], 2))
    assert stats.images == 2
    written = os.stat(tmp_path / "images" / "part-u0.parquet").st_mtime_ns
    # A task re-executed after a lost node delivers the whole unit again, then part of it.
    assert c.add(rows("u0", [1, 0], 2)) == []
    assert c.add(rows("u0", [0], 2)) == []
    assert c.pending_units == []
    assert os.stat(tmp_path / "images" / "part-u0.parquet").st_mtime_ns == written


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    out = Output(str(tmp_path))
    UnitCommitter(out).add(rows("u0", [0], 1))
    stale = [
        tmp_path / "images" / ".part-u1.parquet.0a1b.tmp",
        tmp_path / "_committed" / ".u1.json.0a1b.tmp",
        tmp_path / "._config.json.0a1b.tmp",
    ]
    for p in stale:
        p.write_bytes(b"half")
    kept = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and p not in stale)
    assert out.remove_stale_temporaries() == 3
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == kept
    assert "images/part-u0.parquet" in kept
