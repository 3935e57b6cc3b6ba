"""The actor class, called without Ray on a real plan: it reads its unit, runs the model, writes the unit's files;
same detections as the torchvision model called directly; bad inputs become error rows."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from model.build import load_model, resolve_spec
from model.decode import decode_image
from pipeline.segment.read import too_thin
from pipeline.segment.settings import WorkerSettings
from pipeline.segment.sources import InputRef
from pipeline.segment.units import Kind, Unit
from pipeline.segment.worker import ImageError, SegmentWorker
from tests.conftest import TINY_MODEL, plan_units
from tests.support.images import png_bytes

SCORE = 0.05


def make_worker(out, **kw):
    spec = resolve_spec("none", min_size=TINY_MODEL["min_size"], max_size=TINY_MODEL["max_size"])
    return SegmentWorker(
        WorkerSettings(
            spec=spec,
            score_threshold=SCORE,
            output_url=str(out),
            max_detections=10,
            threads=2,
            run_id="r1",
            **kw,
        )
    )


def units_for(tmp_path, files: dict[str, bytes | None], unit_size: int = 100) -> list[Unit]:
    """Write `files` (None: named in the plan but absent, as if deleted after listing) and plan them."""
    folder = tmp_path / "in"
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for name, data in files.items():
        if data is not None:
            (folder / name).write_bytes(data)
        refs.append(InputRef(Kind.FILES, str(folder / name), name))
    return plan_units(refs, plan_url=str(tmp_path / "plan"), unit_size=unit_size)


def run(tmp_path, files, **kw):
    out = tmp_path / "out"
    worker = make_worker(out, **kw)
    stats = [worker.process(u) for u in units_for(tmp_path, files)]
    images = pq.read_table(out / "images").to_pylist()
    dets = pq.read_table(out / "detections").to_pylist()
    return stats, images, dets


def reference(images):
    """What a user gets calling torchvision's model directly: same weights, same sizes, same thresholds."""
    spec = resolve_spec("none", min_size=TINY_MODEL["min_size"], max_size=TINY_MODEL["max_size"])
    model = load_model(spec, box_score_thresh=SCORE, box_detections_per_img=10)
    with torch.inference_mode():
        return model([torch.from_numpy(img).permute(2, 0, 1).float() / 255 for img in images])


def assert_matches_reference(det_rows, ref, height, width):
    keep = ref["scores"] >= SCORE
    assert len(det_rows) == int(keep.sum()) > 0
    for k, row in enumerate(det_rows):
        x1, y1, x2, y2 = ref["boxes"][k].tolist()
        np.testing.assert_allclose(row["bbox"], [x1, y1, x2 - x1, y2 - y1], rtol=1e-5, atol=1e-3)
        assert row["label"] == int(ref["labels"][k])
        assert row["score"] == pytest.approx(float(ref["scores"][k]), rel=1e-5)
        mask = mask_utils.decode({"size": row["mask"]["size"], "counts": row["mask"]["counts"].encode()})
        expected = (ref["masks"][k, 0] >= 0.5).numpy()
        assert mask.shape == (height, width) and np.array_equal(mask.astype(bool), expected)
        assert row["area"] == int(expected.sum())


def test_detections_equal_direct_model_call(shapes_dir, tmp_path):
    files = sorted((shapes_dir / "val").glob("*.jpg"))[:3]
    datas = {f.name: f.read_bytes() for f in files}
    [stats], images, dets = run(tmp_path, datas, batch_size=2)
    assert [r["status"] for r in images] == ["ok"] * 3 and [r["image_uri"] for r in images] == list(datas)
    assert (stats.images, stats.ok, stats.detections) == (3, 3, len(dets))
    decoded = [decode_image(d, max_pixels=10**8) for d in datas.values()]
    for name, img, ref in zip(datas, decoded, reference(decoded)):
        rows = [r for r in dets if r["image_uri"] == name]
        assert_matches_reference(rows, ref, *img.shape[:2])
        assert [r["instance"] for r in rows] == list(range(len(rows)))
        assert {r["model_id"] for r in rows} == {images[0]["model_id"]} and {r["run_id"] for r in rows} == {
            "r1"
        }


def test_bad_inputs_become_error_rows_and_the_unit_goes_on(shapes_dir, tmp_path):
    good = sorted((shapes_dir / "val").glob("*.jpg"))[0].read_bytes()
    files = {
        "good.jpg": good,
        "empty.jpg": b"",
        "html.png": b"<html></html>",
        "missing.jpg": None,  # deleted between listing and reading
        "trunc.jpg": good[: len(good) // 2],
    }
    [stats], rows, dets = run(tmp_path, files, max_pixels=200_000)
    assert [r["image_uri"] for r in rows] == list(files)
    assert [r["status"] for r in rows] == ["ok", "error", "error", "error", "error"]
    assert rows[0]["num_detections"] == len(dets) > 0 and rows[0]["error"] is None
    assert rows[1]["error"].startswith("empty file")
    assert rows[2]["error"].startswith("not an image")
    assert rows[3]["error"].startswith("read failed: missing.jpg: not found") and rows[3]["bytes"] is None
    assert rows[4]["error"].startswith("truncated or corrupt")
    assert all(r["num_detections"] == 0 for r in rows[1:])
    assert stats.error_reasons == {
        "empty file (0 bytes)": 1,
        "not an image": 1,
        "read failed": 1,
        "truncated or corrupt JPEG data": 1,
    }


def test_pixel_cap_and_raise_policy(shapes_dir, tmp_path):
    good = sorted((shapes_dir / "val").glob("*.jpg"))[0].read_bytes()
    _, [row], _ = run(tmp_path, {"big.jpg": good}, max_pixels=100)
    assert row["status"] == "error" and row["error"].startswith("too many pixels")
    strict = make_worker(tmp_path / "strict", on_image_error="raise")
    [unit] = units_for(tmp_path / "strict-plan", {"bad.jpg": b"garbage!"})
    with pytest.raises(ImageError, match="bad.jpg: not an image"):
        strict.process(unit)
    assert not (tmp_path / "strict" / "_committed").exists()  # nothing of the failed unit is trusted


def test_no_detections(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 127, np.uint8)).save(buf, format="PNG")
    worker = make_worker(tmp_path / "out")
    worker.segmenter.score_threshold = 1.01  # nothing can pass: the zero-detection path
    [unit] = units_for(tmp_path, {"flat.png": buf.getvalue()})
    stats = worker.process(unit)
    [row] = pq.read_table(tmp_path / "out" / "images").to_pylist()
    assert row["status"] == "ok" and row["num_detections"] == 0 and row["height"] == 64
    assert stats.detections == 0 and pq.read_table(tmp_path / "out" / "detections").num_rows == 0


def test_extreme_strip_is_an_error_row_with_a_reason_and_the_unit_goes_on(tmp_path):
    strip = png_bytes(np.full((1, 500, 3), 128, dtype=np.uint8))  # 500 wide, 1 high
    normal = png_bytes(np.full((48, 64, 3), 90, dtype=np.uint8))
    _, out, _ = run(tmp_path, {"strip.png": strip, "normal.png": normal})
    assert out[0]["status"] == "error" and out[0]["error"].startswith("image too thin to segment: 500x1")
    assert (out[0]["height"], out[0]["width"]) == (1, 500)
    assert out[1]["status"] == "ok"
    assert too_thin(1, 500, 800, 1333) is None  # at torchvision's sizes the same strip is fine (2 px high)
    assert too_thin(1, 2000, 800, 1333) is not None


def test_a_unit_of_many_inputs_keeps_their_order(shapes_dir, tmp_path):
    """Inputs fetched and decoded by several threads still land in the unit's order, errors included."""
    files = {
        f"{i:03d}.jpg": (b"" if i % 7 == 3 else f.read_bytes())
        for i, f in enumerate(sorted((shapes_dir / "val").glob("*.jpg")) * 2)
    }
    [stats], rows, _ = run(tmp_path, files, io_threads=4, batch_size=3)
    assert [r["image_uri"] for r in rows] == sorted(files)
    assert stats.images == len(files) and stats.errors == sum(1 for d in files.values() if not d)


def test_the_gpu_layout_writes_the_same_rows(shapes_dir, tmp_path):
    """What GPUs run — all masks of a batch at once with run boundaries on the device, on a post-processing thread
    beside the next forward pass — here on CPU tensors: the same rows, detections, RLE strings and areas, in the
    same order, as the CPU layout (exact in-box masks, one thread), bad inputs included."""
    datas = {f.name: f.read_bytes() for f in sorted((shapes_dir / "val").glob("*.jpg"))[:5]}
    datas["bad.jpg"] = b"not a jpeg"
    datas = dict(sorted(datas.items()))
    units = units_for(tmp_path, datas)
    rows = {}
    for route, overlap in (("in_box", False), ("batched", True)):
        out = tmp_path / f"out-{route}"
        make_worker(out, batch_size=2, mask_route=route, overlap=overlap).process(units[0])
        images = pq.read_table(out / "images").drop_columns(["run_id", "decode_ms", "infer_ms"]).to_pylist()
        dets = pq.read_table(out / "detections").drop_columns(["run_id"]).to_pylist()
        rows[route] = (images, dets)
    assert rows["batched"] == rows["in_box"] and len(rows["in_box"][1]) > 0
    assert [r["image_uri"] for r in rows["batched"][0]] == list(datas)


def test_fp16_is_refused_on_a_cpu():
    spec = resolve_spec("none", min_size=TINY_MODEL["min_size"], max_size=TINY_MODEL["max_size"])
    with pytest.raises(ValueError, match="fp16 runs on GPUs only"):
        SegmentWorker(WorkerSettings(spec=spec, score_threshold=SCORE, output_url="unused", precision="fp16"))


def test_bf16_on_a_cpu_gives_fp32_outputs_close_to_fp32s(shapes_dir):
    """`model.precision: bf16` on a CPU: bfloat16 autocast around the model, outputs cast back to fp32 so the
    pasting and encoding code is the fp32 one; detections near fp32's (the score order may swap near ties)."""
    from pipeline.segment.infer import Segmenter

    spec = resolve_spec("none", min_size=TINY_MODEL["min_size"], max_size=TINY_MODEL["max_size"])
    images = [
        decode_image(f.read_bytes(), max_pixels=10**8) for f in sorted((shapes_dir / "val").glob("*.jpg"))[:2]
    ]
    fp32, bf16 = (
        Segmenter(spec=spec, score_threshold=SCORE, precision=p, threads=2) for p in ("fp32", "bf16")
    )
    assert bf16.precision == "bf16"
    raw = bf16.forward(images)
    assert all(v.dtype == torch.float32 for out in raw for k, v in out.items() if k != "labels")
    for a, b, img in zip(fp32.predict(images), bf16.predict(images), images):
        assert len(a.scores) > 0 and abs(len(b.scores) - len(a.scores)) <= max(2, len(a.scores) // 5)
        assert float(b.scores[0]) == pytest.approx(float(a.scores[0]), abs=0.02)
        assert b.rles[0]["size"] == [img.shape[0], img.shape[1]] and b.scores.dtype == np.float32


def test_an_image_that_breaks_the_batch_is_isolated(shapes_dir, tmp_path):
    """A forward pass that fails on a batch (e.g. out of memory because of one huge image) is retried image by
    image: the other images of the batch come out ok, the one that still fails gets an error row."""
    datas = {f.name: f.read_bytes() for f in sorted((shapes_dir / "val").glob("*.jpg"))[:4]}
    bad = list(datas)[2]
    worker = make_worker(tmp_path / "out", batch_size=4, overlap=True)
    real_forward = worker.segmenter.forward
    bad_shape = decode_image(datas[bad], max_pixels=10**8).shape

    def forward(images, original_sizes=None):
        if any(tuple(i.shape) == bad_shape for i in images):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_forward(images, original_sizes)

    worker.segmenter.forward = forward
    [unit] = units_for(tmp_path, datas)
    stats = worker.process(unit)
    rows = {r["image_uri"]: r for r in pq.read_table(tmp_path / "out" / "images").to_pylist()}
    assert rows[bad]["status"] == "error"
    assert rows[bad]["error"] == "inference failed: RuntimeError: CUDA out of memory (simulated)"
    assert all(rows[u]["status"] == "ok" and rows[u]["num_detections"] > 0 for u in datas if u != bad)
    assert (stats.images, stats.ok, stats.errors) == (4, 3, 1)


def test_decoded_pixels_stay_within_the_byte_budget_and_every_image_is_segmented(tmp_path):
    from pipeline.segment.memory import DECODE_BYTES_PER_PIXEL

    datas = {f"{i:02d}.png": png_bytes(np.full((240, 320, 3), 20 * i, np.uint8)) for i in range(8)}
    one = 240 * 320 * DECODE_BYTES_PER_PIXEL
    worker = make_worker(tmp_path / "out", image_memory_bytes=2 * one, io_threads=8, batch_size=2)
    [unit] = units_for(tmp_path, datas)
    stats = worker.process(unit)
    assert stats.images == 8 and stats.ok == 8
    # The budget, plus the image the consumer waits for (always admitted so a batch can complete).
    assert 0 < worker.memory.peak <= 3 * one
    assert worker.memory.held == 0  # everything returned when the unit ended
