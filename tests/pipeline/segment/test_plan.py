import dataclasses
import io
import os
import tarfile
from collections import Counter

import numpy as np
import pytest

from pipeline.segment.plan import load_plan, pending_parts, plan_inputs, write_index
from pipeline.segment.read import decoded_inputs
from pipeline.segment.sources import InputRef, iter_inputs
from pipeline.segment.units import Kind, expand_parts, units_from_table
from tests.support.images import jpeg_bytes


def _tree(root):
    (root / "a" / "b").mkdir(parents=True)
    (root / "one.JPG").write_bytes(jpeg_bytes(seed=1))
    (root / "a" / "two.png").write_bytes(b"x")
    (root / "a" / "b" / "three.Tiff").write_bytes(b"y")
    (root / "a" / "notes.txt").write_text("not an input")
    (root / "a" / "b" / "with space é.jpeg").write_bytes(b"z")
    return root


def test_folder_recursive_case_insensitive_breadth_first(tmp_path, monkeypatch):
    _tree(tmp_path / "arch")
    monkeypatch.chdir(tmp_path)
    refs = list(iter_inputs("arch"))
    assert [r.image_uri for r in refs] == [
        "arch/one.JPG",
        "arch/a/two.png",
        "arch/a/b/three.Tiff",
        "arch/a/b/with space é.jpeg",
    ]
    assert all(r.kind is Kind.FILES and os.path.isabs(r.read_url) for r in refs)
    # an absolute input gives absolute names
    assert all(os.path.isabs(r.image_uri) for r in iter_inputs(str(tmp_path / "arch")))


def test_glob_and_manifest(tmp_path):
    root = _tree(tmp_path / "arch")
    globbed = [r.image_uri for r in iter_inputs(str(root / "a" / "*.png"))]
    assert globbed == [str(root / "a" / "two.png")]
    manifest = root / "list.txt"
    manifest.write_text(f"# comment\none.JPG\n\n{root}/a/two.png\n")
    refs = list(iter_inputs(str(manifest)))
    assert [r.image_uri for r in refs] == [str(root / "one.JPG"), f"{root}/a/two.png"]


def test_missing_input_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(iter_inputs(str(tmp_path / "nope")))


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def plan(refs, tmp_path, unit_size):
    """Plan `refs` under tmp_path/plan; returns (plan, its units)."""
    url = str(tmp_path / "plan")
    p = write_index(
        url, plan_inputs(refs, plan_url=url, unit_size=unit_size), unit_size=unit_size, skipped={}
    )
    done = np.zeros(p.units, dtype=bool)
    items = pending_parts(p, done)
    return p, _expand(items, p, unit_size)


def _expand(items, p, unit_size):
    import pyarrow as pa

    if not items:
        return []
    return units_from_table(expand_parts(pa.Table.from_pylist(items), plan_url=p.url, unit_size=unit_size))


def _read_all(unit):
    return [
        {**dataclasses.asdict(r), **r.columns}
        for r in decoded_inputs(unit, max_pixels=10**8, min_size=16, max_size=64, threads=3)
    ]


def test_plan_and_read_files_unit(tmp_path):
    root = _tree(tmp_path / "arch")
    (root / "a" / "gone.jpg").write_bytes(b"q")
    p, units = plan(iter_inputs(str(root)), tmp_path, unit_size=2)
    assert [u.count for u in units] == [2, 2, 1] and all(u.kind is Kind.FILES for u in units)
    assert [u.unit_id for u in units] == ["00000000", "00000001", "00000002"]
    assert load_plan(p.url) == p and (p.inputs, p.units) == (5, 3)
    os.remove(root / "a" / "gone.jpg")  # deleted between listing and reading
    rows = [r for u in units for r in _read_all(u)]
    assert len(rows) == 5 and [r["index"] for r in rows] == [0, 1, 0, 1, 0]
    gone = [r for r in rows if r["image_uri"].endswith("gone.jpg")][0]
    assert gone.get("bytes") is None and gone["error"].startswith("read failed:") and "not found" in gone["error"]
    ok = [r for r in rows if r["image_uri"].endswith("one.JPG")][0]
    assert ok["error"] is None and ok["bytes"] == len((root / "one.JPG").read_bytes())


def test_units_already_done_are_not_expanded(tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(11):
        (root / f"{i:02d}.jpg").write_bytes(b"x")
    p, units = plan(iter_inputs(str(root)), tmp_path, unit_size=3)
    assert [u.count for u in units] == [3, 3, 3, 2]
    done = np.array([True, False, True, False])
    left = _expand(pending_parts(p, done), p, 3)
    assert [u.unit_id for u in left] == ["00000001", "00000003"]
    assert pending_parts(p, np.ones(4, dtype=bool)) == []
    # A unit reads exactly its own inputs (its row group of the plan part).
    assert [r["image_uri"] for r in _read_all(left[1])] == [str(root / "09.jpg"), str(root / "10.jpg")]


def test_tar_shards_members_named_and_shard_rows(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    _tar(root / "s-000.tar", [("x/1.jpg", b"a"), ("x/1.json", b"{}"), ("x/2.PNG", b"b")])
    _tar(root / "s-001.tar", [("meta.json", b"{}")])
    _, units = plan(iter_inputs(str(root)), tmp_path, unit_size=10)
    assert [u.kind for u in units] == [Kind.TARS, Kind.TARS]
    t0 = _read_all(units[0])
    assert [r["image_uri"] for r in t0] == [f"{root}/s-000.tar#x/1.jpg", f"{root}/s-000.tar#x/2.PNG"]
    assert [r["bytes"] for r in t0] == [1, 1] and [r["index"] for r in t0] == [0, 1]
    t1 = _read_all(units[1])  # a shard without images is one error row, named by the shard
    assert len(t1) == 1 and t1[0]["image_uri"] == f"{root}/s-001.tar" and "no image" in t1[0]["error"]


def test_truncated_tar_keeps_members_read_and_reports_shard(tmp_path):
    path = tmp_path / "t.tar"
    _tar(path, [("1.jpg", b"a" * 2000), ("2.jpg", b"b" * 5000)])
    data = path.read_bytes()
    path.write_bytes(data[:3000])  # cut inside the second member
    _, units = plan(iter_inputs(str(path)), tmp_path, unit_size=10)
    rows = _read_all(units[0])
    assert rows[0]["image_uri"].endswith("#1.jpg") and rows[0]["bytes"] == 2000
    assert rows[-1]["image_uri"] == str(path) and "tar" in rows[-1]["error"]
    assert [r["index"] for r in rows] == list(range(len(rows)))


@pytest.mark.parametrize(
    "pattern",
    [
        "*",
        "a/*",
        "a/*/*",
        "*/*.png",
        "a/?/*.jp*g",
        "a/[ab]",
        "**/*.jpeg",
        "a/**",
        "**",
        "[!a]*",
        "a/b/*.Tiff",
        "a*/**/*.jpg",
        "[ab]/**/f*.jpg",
        "*/c/*",
    ],
)
def test_glob_matches_what_fsspec_matches_each_input_once(tmp_path, pattern):
    """Globs are listed by our own retried listing (see test_storage_faults for why); they must select what fsspec's
    glob selects, and an input below a matched folder must come once (from the folder's walk), not twice."""
    import fsspec

    root = _tree(tmp_path / "arch")
    (root / "a" / "c").mkdir()
    (root / "a" / "c" / "four.jpg").write_bytes(b"w")
    url = f"{root}/{pattern}"
    refs = [r.image_uri for r in iter_inputs(url)]
    assert len(refs) == len(set(refs))
    fs = fsspec.filesystem("file")
    expected = set()
    for match in fs.glob(url):
        files = fs.find(match) if fs.isdir(match) else [match]
        expected |= {f for f in files if os.path.splitext(f)[1].lower() in {".jpg", ".jpeg", ".png", ".tiff"}}
    assert set(refs) == expected and expected


def test_manifest_naming_a_file_twice_lists_it_once(tmp_path):
    from collections import Counter

    root = _tree(tmp_path / "arch")
    _tar(root / "s.tar", [("m.jpg", b"m")])
    manifest = root / "list.txt"
    # The same file relative, absolute and again relative; the same shard twice.
    manifest.write_text(f"one.JPG\n{root}/one.JPG\na/two.png\none.JPG\ns.tar\n{root}/s.tar\n")
    skipped: Counter = Counter()
    refs = list(iter_inputs(str(manifest), skipped=skipped))
    assert [(r.kind, r.image_uri) for r in refs] == [
        (Kind.FILES, str(root / "one.JPG")),
        (Kind.FILES, str(root / "a" / "two.png")),
        (Kind.TARS, str(root / "s.tar")),
    ]
    assert skipped == {"duplicate manifest lines": 3}


def test_csv_and_parquet_manifests(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.errors import JobError

    root = _tree(tmp_path / "arch")
    csv = root / "list.csv.gz"
    # A header naming the column; relative paths are relative to the manifest; a repeat is skipped and counted.
    csv.write_bytes(gzip.compress(f"id,url\n1,one.JPG\n2,{root}/a/two.png\n3,one.JPG\n".encode()))
    skipped: Counter = Counter()
    assert [r.image_uri for r in iter_inputs(str(csv), skipped=skipped)] == [
        str(root / "one.JPG"),
        f"{root}/a/two.png",
    ]
    assert skipped == {"duplicate manifest lines": 1}

    keys = root / "keys.parquet"
    pq.write_table(pa.table({"Bucket": ["b1", "b1"], "Key": ["x/1.jpg", "y/shard.tar"]}), keys)
    refs = list(iter_inputs(str(keys)))
    assert [(r.kind, r.image_uri, r.read_url) for r in refs] == [
        (Kind.FILES, "s3://b1/x/1.jpg", "s3://b1/x/1.jpg"),
        (Kind.TARS, "s3://b1/y/shard.tar", "s3://b1/y/shard.tar"),
    ]

    bad = root / "bad.csv"
    bad.write_text("name,size\na.jpg,3\n")
    with pytest.raises(JobError, match="manifest has no input column; name one of url, uri, image_uri, path"):
        list(iter_inputs(str(bad)))
    not_inventory = root / "x.json"
    not_inventory.write_text('{"images": []}')
    with pytest.raises(JobError, match="not an S3 Inventory manifest.json"):
        list(iter_inputs(str(not_inventory)))


def test_plan_parts_hold_whole_units_and_the_index_numbers_them(tmp_path):
    from pipeline.segment import plan as plan_mod

    refs = [InputRef(Kind.FILES, f"/x/{i:05d}.jpg", f"{i:05d}.jpg") for i in range(50)]
    refs.insert(7, InputRef(Kind.TARS, "/x/s.tar", "s.tar"))
    original = plan_mod.PART_UNITS
    plan_mod.PART_UNITS = 2  # parts of 2 units of 4: 8 rows
    try:
        p, units = plan(refs, tmp_path, unit_size=4)
    finally:
        plan_mod.PART_UNITS = original
    assert [(part.kind, part.inputs, part.units) for part in p.parts] == [
        *[(Kind.FILES, 8, 2)] * 6,
        (Kind.FILES, 2, 1),
        (Kind.TARS, 1, 1),
    ]
    assert [u.unit_id for u in units] == [f"{i:08d}" for i in range(14)]
    assert units[-1].kind is Kind.TARS and units[-1].location == "/x/s.tar"
    assert [r["image_uri"] for r in _read_all(units[12])] == ["00048.jpg", "00049.jpg"]
