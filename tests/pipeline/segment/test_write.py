"""The write stage: a unit's files and completion record, and what a re-run learns from names and roll-ups."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
from pycocotools import mask as mask_utils

from model.postprocess import Detections, encode_binary_masks
from pipeline.segment.ledger import StatsLog, committed_stats, committed_units
from pipeline.segment.schema import DETECTIONS_SCHEMA, IMAGES_SCHEMA
from pipeline.segment.storage import Output
from pipeline.segment.writer import UnitWriter

NAMES = ["__background__", "person", "cat"]


def dets(n: int, h: int = 8, w: int = 10, seed: int = 0) -> Detections:
    rng = np.random.default_rng(seed)
    masks = rng.random((n, h, w)) > 0.6
    return Detections(
        boxes_xywh=rng.random((n, 4)).astype(np.float32) * 5,
        labels=rng.integers(1, 3, n).astype(np.int64),
        scores=np.sort(rng.random(n).astype(np.float32))[::-1].copy(),
        rles=encode_binary_masks(masks),
        areas=masks.sum(axis=(1, 2)).astype(np.int64),
    )


def writer(out: Output, unit: str = "00000007") -> UnitWriter:
    return UnitWriter(out, unit, model_id="m1", run_id="r1", class_names=NAMES)


def test_a_unit_is_written_in_input_order_with_its_record_last(tmp_path):
    out = Output(str(tmp_path))
    w = writer(out)
    d0, d2 = dets(3, seed=1), dets(2, seed=2)
    # Rows arrive out of order (errors at once, images after their batch): files keep the unit's order.
    w.add(1, "b.jpg", bytes=None, error="read failed: b.jpg: not found")
    w.add(2, "c.jpg", bytes=30, height=8, width=10, decode_ms=1.0, infer_ms=2.0, detections=d2)
    w.add(0, "a.jpg", bytes=20, height=8, width=10, decode_ms=1.0, infer_ms=2.0, detections=d0)
    assert not list(tmp_path.rglob("*.parquet")), "nothing reaches storage before commit"
    stats = w.commit()
    images = pq.read_table(tmp_path / "images" / "part-00000007.parquet")
    assert images.schema.equals(IMAGES_SCHEMA)
    rows = images.to_pylist()
    assert [r["image_uri"] for r in rows] == ["a.jpg", "b.jpg", "c.jpg"]
    assert [r["status"] for r in rows] == ["ok", "error", "ok"] and [r["num_detections"] for r in rows] == [
        3,
        0,
        2,
    ]
    assert {r["unit_id"] for r in rows} == {"00000007"} and {r["run_id"] for r in rows} == {"r1"}
    table = pq.read_table(tmp_path / "detections" / "part-00000007.parquet")
    assert table.schema.equals(DETECTIONS_SCHEMA)
    got = table.to_pylist()
    assert [(r["image_uri"], r["instance"]) for r in got] == [
        ("c.jpg", 0),
        ("c.jpg", 1),
        ("a.jpg", 0),
        ("a.jpg", 1),
        ("a.jpg", 2),
    ]
    for r, (d, k) in zip(got, [(d2, 0), (d2, 1), (d0, 0), (d0, 1), (d0, 2)]):
        assert r["label"] == d.labels[k] and r["label_name"] == NAMES[d.labels[k]]
        assert r["score"] == d.scores[k] and r["area"] == d.areas[k]
        np.testing.assert_array_equal(r["bbox"], d.boxes_xywh[k])
        assert r["mask"] == {"size": [8, 10], "counts": d.rles[k]["counts"]}
        decoded = mask_utils.decode({"size": r["mask"]["size"], "counts": r["mask"]["counts"].encode()})
        assert decoded.sum() == r["area"]
    record = json.loads((tmp_path / "_committed" / "00000007.json").read_text())
    assert record == {
        "unit_id": "00000007",
        "images": 3,
        "ok": 2,
        "errors": 1,
        "detections": 5,
        "labels": dict(stats.labels),
        "error_reasons": {"read failed": 1},
    }
    assert sum(stats.labels.values()) == 5
    # The record is written after both data files: its mtime is the newest.
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*00000007*")}
    assert mtimes["00000007.json"] >= max(mtimes.values())


def test_labels_outside_the_class_names_keep_their_number(tmp_path):
    out = Output(str(tmp_path))
    w = writer(out)
    d = dets(2)
    d.labels[:] = [1, 9]
    w.add(0, "a.jpg", bytes=1, height=8, width=10, detections=d)
    w.commit()
    names = pq.read_table(tmp_path / "detections").column("label_name").to_pylist()
    assert names == ["person", "9"]


def test_resume_reads_names_and_rollups_and_only_unrolled_records(tmp_path):
    out = Output(str(tmp_path))
    log = StatsLog(out, "run1", every_units=2, every_s=3600)
    stats = []
    for i in range(5):
        w = writer(out, f"{i:08d}")
        w.add(0, f"{i}.jpg", bytes=1, height=8, width=10, detections=dets(i + 1, seed=i))
        stats.append(w.commit())
        if i < 4:
            log.record(stats[-1])  # unit 4: committed, then the driver died before recording it
    # every 2 units a roll-up: units 0-1 and 2-3; none for unit 4
    assert sorted(p.name for p in (tmp_path / "_stats").iterdir()) == ["run1-00000.json", "run1-00001.json"]
    (tmp_path / "_committed" / "00000002.json").unlink()  # a unit whose record is gone counts as not done
    done = committed_units(out, 6)
    assert done.tolist() == [True, True, False, True, True, False]
    reads = []
    original = out.read_many
    out.read_many = lambda rels: (reads.extend(rels), original(rels))[1]
    got = {s.unit_id: (s.detections, from_record) for s, from_record in committed_stats(out, done)}
    assert got == {
        "00000000": (1, False),
        "00000001": (2, False),
        "00000003": (4, False),
        "00000004": (5, True),
    }
    # Two roll-ups and the one record not rolled up: never a record per unit.
    assert sorted(reads) == ["_committed/00000004.json", "_stats/run1-00000.json", "_stats/run1-00001.json"]


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    out = Output(str(tmp_path))
    w = writer(out, "00000000")
    w.add(0, "a.jpg", bytes=1, height=8, width=10, detections=dets(1))
    w.commit()
    stale = [
        tmp_path / "images" / ".part-00000001.parquet.0a1b.tmp",
        tmp_path / "_committed" / ".00000001.json.0a1b.tmp",
        tmp_path / "._config.json.0a1b.tmp",
    ]
    for p in stale:
        p.write_bytes(b"half")
    kept = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and p not in stale)
    assert out.remove_stale_temporaries() == 3
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == kept
    assert "images/part-00000000.parquet" in kept
