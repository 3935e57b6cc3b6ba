"""Bad and awkward inputs, all in ONE segment job run (a real local Ray, a real S3 API): each input becomes exactly one
`images` row, bad ones with status=error and a reason that names the problem, awkward-but-valid ones `ok` with the
size a viewer shows; and the job goes on to complete.

The archive is an S3 prefix that the job walks (moto's server on 127.0.0.1), so that "deleted between listing and
reading" is real: the object is listed, then deleted once the plan is written (the job's "processing ..." line), then
read. "Unreadable" is an object denied by a bucket policy (403): the tests may run as root, for whom `chmod 000` on a
local file denies nothing. The same two cases on local files run below at the level of the read stage, without Ray.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import struct
import tarfile
import uuid
import zlib

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from pipeline.segment.config import segment_config
from pipeline.segment.read import decoded_inputs
from pipeline.segment.run import segment
from pipeline.segment.sources import iter_inputs
from tests.conftest import TINY_MODEL, plan_units

MAX_PIXELS = 1_000_000
RNG_SEED = 7


def encode(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def photo(h: int = 72, w: int = 96) -> Image.Image:
    rng = np.random.default_rng(RNG_SEED)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width`x`height` but holds 100 bytes of pixel data: decoding it would fail as
    truncated, so a "too many pixels" reason proves the cap was applied from the header, before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 96 wide x 72 high; a viewer rotates it 90° clockwise: 72 wide x 96 high
    return encode(photo(), "JPEG", exif=exif.tobytes())


def palette_with_transparency() -> bytes:
    img = Image.new("P", (20, 10), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((3, 3), 1)
    return encode(img, "PNG", transparency=0)


def rgba_png() -> bytes:
    rgba = photo().convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    return encode(rgba, "PNG")


def corrupt_header_tar() -> bytes:
    """a.jpg, then b.jpg whose header checksum is wrong, then c.jpg (unreachable behind the bad header)."""
    good = encode(photo(), "JPEG")
    data = bytearray(tar_of([("a.jpg", good), ("b.jpg", good), ("c.jpg", good)]))
    second = 512 + -(-len(good) // 512) * 512  # a.jpg's header block + its data blocks
    data[second + 148 : second + 156] = b"0000000\0"
    return bytes(data)


def truncated_tar() -> bytes:
    """a.jpg whole, the file ending in the middle of b.jpg's data (an upload cut short)."""
    good = encode(photo(), "JPEG")
    data = tar_of([("a.jpg", good), ("b.jpg", good)])
    second = 512 + -(-len(good) // 512) * 512
    return data[: second + 512 + len(good) // 2]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # key below the archive prefix; "shard.tar#member" for a tar member; "shard.tar" for the shard's row
    error: str | None = None  # a regex the reason must match from its start; None: the input must be ok
    size: tuple[int, int] | None = None  # (height, width) as a viewer shows the image


_jpeg, _png = encode(photo(), "JPEG", quality=90), encode(photo(), "PNG")
CORPUS: dict[str, bytes] = {
    "zero.jpg": b"",
    "truncated.jpg": _jpeg[: len(_jpeg) * 6 // 10],
    "truncated.png": _png[: len(_png) * 6 // 10],
    "page.jpg": b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>\n",
    "noise.webp": np.random.default_rng(RNG_SEED).bytes(4096),
    "bomb.png": png_claiming(20_000, 20_000),
    "gone.jpg": _jpeg,  # deleted after the plan is written
    "locked.jpg": _jpeg,  # GetObject denied by the bucket policy
    "corrupt-header.tar": corrupt_header_tar(),
    "truncated.tar": truncated_tar(),
    "exif-rotated.jpg": exif_rotated_jpeg(),
    "cmyk.jpg": encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"),
    "gray16.png": encode(Image.fromarray(np.full((21, 33), 40_000, np.uint16)), "PNG"),
    "gray.png": encode(photo().convert("L"), "PNG"),
    "palette-alpha.png": palette_with_transparency(),
    "rgba.png": rgba_png(),
    "one-pixel.jpg": encode(Image.new("RGB", (1, 1), (200, 10, 10)), "JPEG"),
    "png-named.jpg": encode(photo(50, 60), "PNG"),
    "my holiday photo.jpg": _jpeg,
    "café ñ 日本 [1] #2.png": _png,
    "100%20literal.jpeg": _jpeg,
}
CASES = [
    Case("zero.jpg", error=r"empty file \(0 bytes\)$"),
    Case("truncated.jpg", error=r"truncated or corrupt JPEG data: .*truncated"),
    Case("truncated.png", error=r"truncated or corrupt PNG data: .*truncated"),
    Case("page.jpg", error=r"not an image: unrecognised format \(first bytes b'<!DOCTYP'\)"),
    Case("noise.webp", error=r"not an image: unrecognised format"),
    Case("bomb.png", error=rf"too many pixels: 20000x20000 = 400000000 > max_pixels={MAX_PIXELS}$"),
    Case("gone.jpg", error=r"read failed: s3://.*/gone\.jpg: not found"),
    Case("locked.jpg", error=r"read failed: s3://.*/locked\.jpg: access denied"),
    Case("corrupt-header.tar#a.jpg", size=(72, 96)),
    Case("corrupt-header.tar", error=r"corrupt tar shard: has a corrupt header at byte \d+$"),
    Case("truncated.tar#a.jpg", size=(72, 96)),
    Case("truncated.tar#b.jpg", error=r"corrupt tar member: ReadError: unexpected end of data"),
    Case("truncated.tar", error=r"corrupt tar shard after member 'b\.jpg': ReadError"),
    Case("exif-rotated.jpg", size=(96, 72)),
    Case("cmyk.jpg", size=(30, 40)),
    Case("gray16.png", size=(21, 33)),
    Case("gray.png", size=(72, 96)),
    Case("palette-alpha.png", size=(10, 20)),
    Case("rgba.png", size=(72, 96)),
    Case("one-pixel.jpg", size=(1, 1)),
    Case("png-named.jpg", size=(50, 60)),
    Case("my holiday photo.jpg", size=(72, 96)),
    Case("café ñ 日本 [1] #2.png", size=(72, 96)),
    Case("100%20literal.jpeg", size=(72, 96)),
]


@dataclasses.dataclass
class Outcome:
    prefix: str  # s3://bucket/corpus/
    summary: object
    rows: list[dict]
    detections: list[dict]
    deleted_after_plan: bool


@pytest.fixture(scope="module")
def outcome(ray_local, moto_server, tmp_path_factory) -> Outcome:
    import boto3
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_server})
    bucket = f"bad-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    fs.pipe({f"{bucket}/corpus/{name}": data for name, data in CORPUS.items()})
    deny = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{bucket}/corpus/locked.jpg",
            }
        ],
    }
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").put_bucket_policy(
        Bucket=bucket, Policy=json.dumps(deny)
    )
    with pytest.raises(PermissionError):  # the policy really denies the read (else the case tests nothing)
        fs.cat_file(f"{bucket}/corpus/locked.jpg")

    out = tmp_path_factory.mktemp("bad") / "out"
    deleted: list[str] = []

    def on_log(line: str) -> None:
        # "processing N units ..." is logged after the plan is written and before any actor reads an input.
        if line.startswith("processing") and not deleted:
            fs.rm_file(f"{bucket}/corpus/gone.jpg")
            deleted.append(line)

    cfg = segment_config(
        {
            "input": {
                "url": f"s3://{bucket}/corpus/",
                "unit_size": 4,
                "max_pixels": MAX_PIXELS,
                "storage": {"endpoint_url": moto_server},
            },
            "output": {"url": str(out)},
            "model": {**TINY_MODEL, "batch_size": 2},
        }
    )
    summary = segment(cfg, log=on_log)
    planned = pads.dataset(sorted(str(p) for p in (out / "_plan").glob("files-*.parquet"))).to_table()
    assert (
        f"s3://{bucket}/corpus/gone.jpg" in planned.column("read_url").to_pylist()
    )  # listed while it existed
    rows = pads.dataset(str(out / "images"), format="parquet").to_table().to_pylist()
    dets = pads.dataset(str(out / "detections"), format="parquet").to_table().to_pylist()
    s3fs.S3FileSystem.clear_instance_cache()
    return Outcome(f"s3://{bucket}/corpus/", summary, rows, dets, bool(deleted))


def test_job_completes_with_one_row_per_input(outcome):
    s = outcome.summary
    uris = [r["image_uri"] for r in outcome.rows]
    assert sorted(uris) == sorted(outcome.prefix + c.name for c in CASES)  # each exactly once, nothing else
    assert s.complete and s.images == len(CASES)
    assert s.errors == sum(c.error is not None for c in CASES) and s.ok == sum(c.error is None for c in CASES)
    assert outcome.deleted_after_plan
    per_image = {r["image_uri"]: r["num_detections"] for r in outcome.rows}
    assert sum(per_image.values()) == len(outcome.detections) == s.detections
    assert {d["image_uri"] for d in outcome.detections} <= {u for u, n in per_image.items() if n}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_input(outcome, case):
    [row] = [r for r in outcome.rows if r["image_uri"] == outcome.prefix + case.name]
    if case.error is None:
        assert (row["status"], row["error"]) == ("ok", None)
        assert (row["height"], row["width"]) == case.size
    else:
        assert row["status"] == "error" and re.match(case.error, row["error"]), row["error"]
        assert row["height"] is None and row["width"] is None and row["num_detections"] == 0


# --- the same read failures on local files, at the read stage (what an actor runs), without Ray -------------


def test_local_file_deleted_after_planning_and_unreadable_file(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    for name in ("gone.jpg", "locked.jpg", "my holiday photo.jpg", "café ñ 日本 [1] #2.png"):
        (root / name).write_bytes(CORPUS.get(name, _jpeg))
    units = plan_units(iter_inputs(str(root)), plan_url=str(tmp_path / "plan"), unit_size=10)
    (root / "gone.jpg").unlink()
    (root / "locked.jpg").chmod(0)
    try:
        # root reads a mode-000 file anyway; then the S3 case above is what covers "access denied".
        denied = not os.access(root / "locked.jpg", os.R_OK)
        rows = {r.image_uri: r for r in decoded_inputs(units[0], max_pixels=10**8, min_size=16, max_size=64)}
    finally:
        (root / "locked.jpg").chmod(0o644)
    assert len(rows) == 4  # the deleted file was planned: it still has its row
    assert rows[str(root / "gone.jpg")].error.startswith(f"read failed: {root / 'gone.jpg'}: not found")
    locked = rows[str(root / "locked.jpg")]
    if denied:
        assert locked.error.startswith(f"read failed: {root / 'locked.jpg'}: access denied")
    else:
        assert locked.error is None and locked.columns["bytes"] == len(_jpeg)
    assert rows[str(root / "café ñ 日本 [1] #2.png")].columns["bytes"] == len(_png)
    assert rows[str(root / "my holiday photo.jpg")].columns["bytes"] == len(_jpeg)
