import io
import os
import tarfile

import pyarrow as pa
import pytest

from pipeline.sources import iter_inputs, load_plan, plan_units, read_unit
from tests.conftest import jpeg_bytes


def _tree(root):
    (root / "a" / "b").mkdir(parents=True)
    (root / "one.JPG").write_bytes(jpeg_bytes(seed=1))
    (root / "a" / "two.png").write_bytes(b"x")
    (root / "a" / "b" / "three.Tiff").write_bytes(b"y")
    (root / "a" / "notes.txt").write_text("not an input")
    (root / "a" / "b" / "with space é.jpeg").write_bytes(b"z")
    return root


def test_folder_recursive_case_insensitive_sorted(tmp_path, monkeypatch):
    _tree(tmp_path / "arch")
    monkeypatch.chdir(tmp_path)
    refs = list(iter_inputs("arch"))
    assert [r.image_uri for r in refs] == [
        "arch/one.JPG",
        "arch/a/two.png",
        "arch/a/b/three.Tiff",
        "arch/a/b/with space é.jpeg",
    ] or sorted(r.image_uri for r in refs) == sorted(
        ["arch/one.JPG", "arch/a/two.png", "arch/a/b/three.Tiff", "arch/a/b/with space é.jpeg"]
    )
    assert all(r.kind == "file" and os.path.isabs(r.read_url) for r in refs)
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


def _read_all(unit, **kw) -> pa.Table:
    return pa.concat_tables(list(read_unit(unit, **kw)))


def test_plan_and_read_files_unit(tmp_path):
    root = _tree(tmp_path / "arch")
    (root / "a" / "gone.jpg").write_bytes(b"q")
    units = plan_units(iter_inputs(str(root)), plan_url=str(tmp_path / "plan"), unit_size=2)
    assert [u.count for u in units] == [2, 2, 1] and all(u.kind == "files" for u in units)
    assert load_plan(str(tmp_path / "plan")) == units
    os.remove(root / "a" / "gone.jpg")  # deleted between listing and reading
    rows = pa.concat_tables([_read_all(u) for u in units]).to_pylist()
    assert len(rows) == 5 and all(r["unit_total"] in (1, 2) for r in rows)
    gone = [r for r in rows if r["image_uri"].endswith("gone.jpg")][0]
    assert (
        gone["data"] is None
        and gone["read_error"].startswith("read failed:")
        and "not found" in gone["read_error"]
    )
    ok = [r for r in rows if r["image_uri"].endswith("one.JPG")][0]
    assert ok["data"] == (root / "one.JPG").read_bytes()


def test_tar_shards_members_named_and_last_row_carries_total(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    _tar(root / "s-000.tar", [("x/1.jpg", b"a"), ("x/1.json", b"{}"), ("x/2.PNG", b"b")])
    _tar(root / "s-001.tar", [("meta.json", b"{}")])
    units = plan_units(iter_inputs(str(root)), plan_url=str(tmp_path / "plan"), unit_size=10)
    assert [u.kind for u in units] == ["tar", "tar"]
    t0 = _read_all(units[0]).to_pylist()
    assert [r["image_uri"] for r in t0] == [f"{root}/s-000.tar#x/1.jpg", f"{root}/s-000.tar#x/2.PNG"]
    assert [r["unit_total"] for r in t0] == [-1, 2] and [r["data"] for r in t0] == [b"a", b"b"]
    t1 = _read_all(units[1]).to_pylist()  # a shard without images is one error row, named by the shard
    assert len(t1) == 1 and t1[0]["image_uri"] == f"{root}/s-001.tar" and "no image" in t1[0]["read_error"]


def test_truncated_tar_keeps_members_read_and_reports_shard(tmp_path):
    path = tmp_path / "t.tar"
    _tar(path, [("1.jpg", b"a" * 2000), ("2.jpg", b"b" * 5000)])
    data = path.read_bytes()
    path.write_bytes(data[:3000])  # cut inside the second member
    units = plan_units(iter_inputs(str(path)), plan_url=str(tmp_path / "plan"), unit_size=10)
    rows = _read_all(units[0]).to_pylist()
    assert rows[0]["image_uri"].endswith("#1.jpg") and rows[0]["data"] == b"a" * 2000
    assert rows[-1]["image_uri"] == str(path) and "tar" in rows[-1]["read_error"]
    assert rows[-1]["unit_total"] == len(rows) and len({r["unit_index"] for r in rows}) == len(rows)


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
        ("file", str(root / "one.JPG")),
        ("file", str(root / "a" / "two.png")),
        ("tar", str(root / "s.tar")),
    ]
    assert skipped == {"duplicate manifest lines": 3}
