"""The inference actor's compute path on a GPU (or, with `--device cpu`, on this machine), side by side with the
naive per-image script, on the images and settings a user runs. torch and torchvision are all it needs: no Ray, no
storage, pycocotools and pynvml optional.

    python bench/gpu.py --device cuda [--mix phone,640x480] [--images 48] [--batches 1,4,8,16] [--train]
    python bench/gpu.py --device cpu --mix phone --images 3     # a CPU smoke run: one image of each size

Images (`--mix`, comma-separated sets, each `--images` generated JPEGs): `phone` (the default's first set) cycles
through 12 MP phone photos in both orientations, 4000×3000 and 3000×4000 pixels (no EXIF rotation), and 640×480;
`640x480`; `coco`, COCO-like sizes (480–800 × 360–640). Textured, with ellipses scaled to the image; at most 4
distinct images per size, reused in turn (generating a 12 MP image takes a second). Model: `maskrcnn_resnet50_fpn`
with random weights (no download possible), the job's sizes (800 / 1333), score threshold 0 and 100 detections per
image (the most an image can have: the worst case for everything after the model; a random model scores nothing
above the job's 0.5).

- naive: what a user writes — PIL open, `model([image])` per image in fp32 (torchvision pastes every mask into a
  full-image canvas: 100 × 12 M floats per phone photo), every mask RLE-encoded with pycocotools (with `model.rle`
  where pycocotools is missing).
- ours: the inference actor's compute path (`pipeline.segment.infer.Segmenter`'s `forward` and `detections`, and the
  writer's Arrow columns), laid out as the actor runs it: decode on 8 threads ahead of the model, `forward` on the
  main thread, `detections` and Arrow on one post-processing thread; fp32, and on GPUs fp16 (autocast, what the
  job's `precision: auto` runs there); batch sizes `--batches` plus the job's default
  (`pipeline.segment.settings`: 4 on GPUs, 1 on CPUs).
- ratios to the naive script, each at the job's default batch on the first set: `ours_fp32_vs_naive_fp32` (the
  same arithmetic, so the actor's layout and mask route alone) and on GPUs `ours_fp16_vs_naive_fp32` (what the job
  runs against what a user writes); other sets add `_<set>` to the name.
- device busy (GPUs), during each timed actor run, as a share of its wall time: `gpu_busy_lo`, the union of
  CUDA-event spans around each `forward` (device work of the model, launch gaps inside it included), and
  `gpu_busy_hi`, that union with the spans around each `detections` call too (whose span also covers the host's RLE
  strings between its device work and its last copies: an upper bound); `gpu_util`, the mean of NVML's
  utilisation samples (the share of time any kernel ran, sampled every 0.2 s via `torch.cuda.utilization()` where
  pynvml is installed, else `nvidia-smi`; absent where neither works).
- profile, at the job's default batch on each set: the stages one after another, synchronised, in ms per image:
  decode, copy to the device, forward, masks on the device (paste, threshold, run boundaries, and the copy of the
  boundaries back), RLE strings, Arrow. On GPUs the device stages are timed with CUDA events.
- host: the steps that stay on the host when the device is a GPU — the RLE strings from the run boundaries,
  `Detections` assembly, the unit writer's bookkeeping and the Arrow columns (decode runs on read threads, off the
  actor's path) — in ms per image at 100 detections, on the first set; on `--device cpu` the device steps run on the
  CPU and are reported separately.
- fp16 and bf16 vs fp32: on the same images, detections matched by label and box IoU ≥ 0.5: mean/min box IoU, score
  differences, mask IoU, and detections that have no match. Random weights make detections near-ties and masks
  near 0.5 everywhere, so this part takes a trained checkpoint (`--drift-weights`, e.g. the demo's) and its own
  images (`--drift-images`, e.g. `demo/shapes/val`); without them it runs on the random model and 640×480 images,
  a worst case. On a CPU fp16 (autocast with CPU fp16 kernels, ~10× slower than fp32 there) is a proxy for what a
  GPU does; bf16 is what `model.precision: bf16` runs, and its `time_vs_fp32` its speed there.
- `--train` (GPU): training images/s with AMP at batch 8 on generated 640×480 images and synthetic targets, with
  the data loader's own rate (4 workers, pinned memory) beside it.

The last line is `host_ms_per_image=<x> device=<cpu|cuda>` followed by the other figures as `name=value`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._common import encode_jpeg, mask_rles, per_image_loop, photo_like, random_model, sync  # noqa: E402

MAX_DETECTIONS = 100


# (width, height) of the images of each set, taken in turn; None: drawn per image.
MIXES: dict[str, tuple[tuple[int, int], ...] | None] = {
    "phone": ((4000, 3000), (3000, 4000), (640, 480)),
    "640x480": ((640, 480),),
    "coco": None,
}


def make_jpegs(n: int, mix: str, *, seed: int = 0, distinct: int = 4) -> list[bytes]:
    """`n` JPEGs of the set `mix` (see `MIXES`), textured, with 3–8 ellipses each scaled to the image; at most
    `distinct` different images per size, reused in turn (`coco`: all different)."""
    rng = np.random.default_rng(seed)
    sizes, made, out = MIXES[mix], {}, []
    for i in range(n):
        if sizes is None:
            w, h = int(rng.integers(480, 801)), int(rng.integers(360, 641))
            key = i
        else:
            w, h = sizes[i % len(sizes)]
            key = (w, h, (i // len(sizes)) % distinct)
        if key not in made:
            scale = max(w, h) / 640
            image = photo_like(
                rng,
                h,
                w,
                base=(60, 200),
                noise=30,
                shapes=(3, 9),
                margin=int(40 * scale),
                extent=(int(20 * scale), int(250 * scale)),
            )
            made[key] = encode_jpeg(image)
        out.append(made[key])
    return out


# --- device busy time -------------------------------------------------------------------------------------------------


class DeviceSpans:
    """CUDA-event spans of device work, from any thread: `with spans.span(kind):` records an event on the calling
    thread's current stream before and after the block; `busy_ms(kinds)` is the union of those spans, in ms of
    device time. A span runs from when the device reaches the work queued before the block to when it finishes the
    work queued in it, so it includes gaps in which the device waited for the host between the two. Off CUDA,
    nothing is recorded and `busy_ms` is None."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, object, object]] = []
        self._lock = threading.Lock()
        if self.cuda:
            self.origin = torch.cuda.Event(enable_timing=True)
            self.origin.record()

    @contextlib.contextmanager
    def span(self, kind: str):
        if not self.cuda:
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            with self._lock:
                self.spans.append((kind, start, end))

    def busy_ms(self, kinds: tuple[str, ...]) -> float | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize()  # elapsed_time needs both events completed
        intervals = sorted(
            (self.origin.elapsed_time(s), self.origin.elapsed_time(e)) for k, s, e in self.spans if k in kinds
        )
        busy, until = 0.0, float("-inf")
        for lo, hi in intervals:  # union: overlapping spans (two threads, one stream) count once
            lo = max(lo, until)
            if hi > lo:
                busy += hi - lo
                until = hi
        return busy


def nvml_reader(device: torch.device):
    """A function returning the device's NVML utilisation (% of the last sample period in which a kernel ran), and
    what it reads: `torch.cuda.utilization()` (needs pynvml), else `nvidia-smi`; (None, why) where neither works."""
    try:
        torch.cuda.utilization(device)
        return (lambda: float(torch.cuda.utilization(device))), "pynvml"
    except Exception as e:  # pynvml missing (ModuleNotFoundError) or NVML refusing (its own errors)
        why = f"torch.cuda.utilization: {type(e).__name__}: {e}"
    try:
        # nvidia-smi numbers GPUs without CUDA_VISIBLE_DEVICES: name this one by its UUID.
        ident = f"GPU-{torch.cuda.get_device_properties(device).uuid}"
        cmd = ["nvidia-smi", f"--id={ident}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]

        def smi() -> float:
            return float(subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout)

        smi()
        return smi, "nvidia-smi"
    except (OSError, ValueError, AttributeError, subprocess.SubprocessError) as e:
        return None, f"{why}; nvidia-smi: {type(e).__name__}: {e}"


class Utilization:
    """Samples `read()` every `every_s` seconds on a thread while in `with`; `mean` is None without samples."""

    def __init__(self, read, every_s: float = 0.2):
        self.read, self.every_s, self.samples, self.error = read, every_s, [], None
        self._stop = threading.Event()

    def __enter__(self) -> Utilization:
        if self.read is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.samples.append(self.read())
            except Exception as e:  # a failing read ends the sampling; the error is printed with the figures
                self.error = f"{type(e).__name__}: {e}"
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.read is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


# --- the two scripts ------------------------------------------------------------------------------------------------


def naive(datas: list[bytes], model, device: torch.device) -> float:
    """images/s of the naive script: PIL, `model([image])`, every mask RLE-encoded (warm-up on one image first)."""
    return per_image_loop(model, datas, finish=lambda _, out: mask_rles(out), device=device, warm_finish=True)


def actor_path(datas: list[bytes], seg, batch: int, nvml=None) -> dict[str, float | None]:
    """The actor's compute path, laid out as `SegmentWorker` runs it (decode threads → `forward` on this thread →
    `detections`, strings and Arrow on one post thread): images/s, and on CUDA the device's busy time as a share of
    the wall time (`DeviceSpans`; `nvml`, a reader from `nvml_reader`, adds NVML's mean utilisation)."""
    from model.decode import decode_image
    from pipeline.segment.writer import detections_table

    names = np.array(list(seg.spec.class_names), dtype=object)
    pin = seg.device.type == "cuda"

    def decode(data: bytes):
        image = decode_image(data, max_pixels=10**9)
        return torch.from_numpy(image).pin_memory() if pin else image

    def finish(outputs, images, spans) -> None:
        with spans.span("detections"):
            dets = seg.detections(outputs, [(int(i.shape[0]), int(i.shape[1])) for i in images])
        detections_table(
            [("u", int(i.shape[0]), int(i.shape[1]), d) for i, d in zip(images, dets) if len(d)],
            names,
            "m",
            "r",
        )

    def forward(images, spans):
        with spans.span("forward"):
            return seg.forward(images)

    with ThreadPoolExecutor(8) as readers, ThreadPoolExecutor(1) as post:
        warm = [decode(datas[0])] * batch
        finish(
            seg.forward(warm), warm, DeviceSpans(torch.device("cpu"))
        )  # warm-up (kernels, autocast caches)
        sync(seg.device)
        spans = DeviceSpans(seg.device)
        with Utilization(nvml) as util:
            start = time.perf_counter()
            decoded = readers.map(decode, datas)
            pending, images = [], []
            for image in decoded:
                images.append(image)
                if len(images) == batch:
                    pending.append(post.submit(finish, forward(images, spans), images, spans))
                    images = []
            if images:
                pending.append(post.submit(finish, forward(images, spans), images, spans))
            for f in pending:
                f.result()
            sync(seg.device)
            wall = time.perf_counter() - start
    lo, hi = spans.busy_ms(("forward",)), spans.busy_ms(("forward", "detections"))
    return {
        "img_s": len(datas) / wall,
        "busy_lo": None if lo is None else lo / 1e3 / wall,
        "busy_hi": None if hi is None else hi / 1e3 / wall,
        "util": None if util.mean is None else util.mean / 100,
        "util_error": util.error,
    }


# --- the profile and the host path ------------------------------------------------------------------------------------


def profile(datas: list[bytes], seg, batch: int, reps: int = 21) -> dict[str, float]:
    """ms per image of each stage, one after another, synchronised. On CUDA the device stages (copy, forward,
    masks) are timed with CUDA events. The host stages are repeated `reps` times on the same inputs and their
    median taken (they are short, and this machine is noisy)."""
    import tempfile

    from model.decode import decode_image
    from model.paste_batched import mask_changes, rle_strings
    from model.postprocess import Detections, forward_to_mask_probs, xyxy_to_xywh
    from pipeline.segment.infer import to_tensor
    from pipeline.segment.storage import Output
    from pipeline.segment.writer import UnitWriter, detections_table

    device = seg.device
    out = Output(
        tempfile.mkdtemp(prefix="bench-gpu-")
    )  # nothing is written: the writer only collects rows here
    names = np.array(list(seg.spec.class_names), dtype=object)
    t = dict.fromkeys(
        ["decode", "copy", "forward", "masks (device)", "RLE strings (host)", "rows + Arrow (host)"],
        0.0,
    )
    detections, spans = 0, DeviceSpans(device)
    for start in range(0, len(datas), batch):
        chunk = datas[start : start + batch]
        t0 = time.perf_counter()
        images = [decode_image(d, max_pixels=10**9) for d in chunk]
        t1 = time.perf_counter()
        pinned = [torch.from_numpy(i).pin_memory() if device.type == "cuda" else i for i in images]
        with spans.span("copy"):
            tensors = [to_tensor(i, device) for i in pinned]
        sync(device)
        t2 = time.perf_counter()
        with torch.inference_mode(), seg._autocast(), spans.span("forward"):
            outputs = forward_to_mask_probs(seg.model, tensors)
        sync(device)
        t3 = time.perf_counter()
        kept = [
            {k: o[k][o["scores"] >= seg.score_threshold] for k in ("boxes", "labels", "scores", "masks")}
            for o in outputs
        ]
        sizes = [(i.shape[0], i.shape[1]) for i in images]
        per = [len(k["scores"]) for k in kept]
        masks = torch.cat([k["masks"] for k in kept])
        boxes = torch.cat([k["boxes"] for k in kept])
        size_t = torch.tensor([s for s, n in zip(sizes, per) for _ in range(n)], dtype=torch.int64).reshape(
            -1, 2
        )
        with torch.inference_mode(), spans.span("masks"):
            changes, lengths, areas = mask_changes(masks, boxes, size_t)
            meta = (
                torch.cat([boxes.float(), torch.cat([k["scores"] for k in kept]).float()[:, None]], 1)
                .cpu()
                .numpy()
            )
            labels = torch.cat([k["labels"] for k in kept]).cpu().numpy()
        t4 = time.perf_counter()
        pixels = (size_t[:, 0] * size_t[:, 1]).numpy()
        strings_s, arrow_s = [], []
        for _ in range(reps):
            r0 = time.perf_counter()
            strings = rle_strings(changes, lengths, pixels)
            r1 = time.perf_counter()
            dets, at = [], 0
            for (h, w), n in zip(sizes, per):
                sl = slice(at, at + n)
                rles = [{"size": [h, w], "counts": c} for c in strings[sl]]
                dets.append(Detections(xyxy_to_xywh(meta[sl, :4]), labels[sl], meta[sl, 4], rles, areas[sl]))
                at += n
            writer = UnitWriter(out, "0", model_id="m", run_id="r", class_names=list(names))
            for k, ((h, w), d) in enumerate(zip(sizes, dets)):
                writer.add(k, "u", bytes=1, height=h, width=w, decode_ms=1.0, infer_ms=1.0, detections=d)
            detections_table([("u", h, w, d) for (h, w), d in zip(sizes, dets)], names, "m", "r")
            strings_s.append(r1 - r0)
            arrow_s.append(time.perf_counter() - r1)
        t5, t6 = (
            t4 + statistics.median(strings_s),
            t4 + statistics.median(strings_s) + statistics.median(arrow_s),
        )
        detections += sum(per)
        for name, seconds in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            t[name] += seconds
    if spans.cuda:  # the device's own time for its stages, not the host's wait for them
        for name, kind in (("copy", "copy"), ("forward", "forward"), ("masks (device)", "masks")):
            t[name] = spans.busy_ms((kind,)) / 1e3
    out = {name: seconds * 1e3 / len(datas) for name, seconds in t.items()}
    out["detections per image"] = detections / len(datas)
    return out


# --- fp16 against fp32 --------------------------------------------------------------------------------------------------


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """xywh `[n, 4]`, `[m, 4]` → IoU `[n, m]`."""
    ax1, ay1, bx1, by1 = a[:, 0], a[:, 1], b[:, 0], b[:, 1]
    ax2, ay2, bx2, by2 = ax1 + a[:, 2], ay1 + a[:, 3], bx1 + b[:, 2], by1 + b[:, 3]
    iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(ax1[:, None], bx1[None]), 0, None)
    ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(ay1[:, None], by1[None]), 0, None)
    inter = iw * ih
    return inter / (a[:, 2:].prod(1)[:, None] + b[:, 2:].prod(1)[None] - inter + 1e-9)


def decode_rle(rle: dict) -> np.ndarray:
    """COCO string → bool `[H, W]` (pure NumPy: the GPU machine may lack pycocotools)."""
    h, w = rle["size"]
    s, counts, p = rle["counts"].encode(), [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = s[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    flat = np.zeros(h * w, bool)
    at = 0
    for i, n in enumerate(counts):
        if i % 2:
            flat[at : at + n] = True
        at += n
    return flat.reshape(w, h).T


def precision_drift(
    datas: list[bytes], spec, device: str, min_size: int | None, other: str = "fp16"
) -> dict[str, float]:
    """`other` (fp16 or bf16) vs fp32 detections on the same images (see the module docstring); `min_size` shrinks
    the model's resize (CPU fp16 kernels are slow)."""
    import dataclasses

    from model.decode import decode_image
    from pipeline.segment.infer import Segmenter

    small = spec
    if min_size and min_size < spec.min_size:
        small = dataclasses.replace(
            spec, min_size=min_size, max_size=spec.max_size * min_size // spec.min_size
        )
    images = [decode_image(d, max_pixels=10**9) for d in datas]
    runs, seconds = {}, {}
    for precision in ("fp32", other):
        seg = Segmenter(
            spec=small, score_threshold=0.05, max_detections=MAX_DETECTIONS, device=device, precision="fp32"
        )
        seg.precision = precision  # the CPU check only: the job refuses fp16 there (BENCHMARKS.md)
        seg.predict(images[:1])  # warm-up
        start = time.perf_counter()
        runs[precision] = seg.predict(images)
        seconds[precision] = time.perf_counter() - start
    ious, dscores, mious, unmatched, total = [], [], [], 0, 0
    for a, b in zip(runs["fp32"], runs[other]):
        total += len(a)
        if not len(a) or not len(b):
            unmatched += len(a)
            continue
        iou = box_iou(a.boxes_xywh, b.boxes_xywh) * (a.labels[:, None] == b.labels[None])
        used = set()
        for i in np.argsort(-a.scores):
            j = int(np.argmax(np.where([k in used for k in range(len(b))], -1, iou[i])))
            if iou[i, j] < 0.5 or j in used:
                unmatched += 1
                continue
            used.add(j)
            ious.append(iou[i, j])
            dscores.append(abs(float(a.scores[i]) - float(b.scores[j])))
            ma, mb = decode_rle(a.rles[i]), decode_rle(b.rles[j])
            mious.append((ma & mb).sum() / max((ma | mb).sum(), 1))
    return {
        "time_vs_fp32": seconds[other] / seconds["fp32"],
        "detections_fp32": total,
        "unmatched_share": unmatched / max(total, 1),
        "box_iou_mean": float(np.mean(ious)) if ious else float("nan"),
        "box_iou_min": float(np.min(ious)) if ious else float("nan"),
        "score_delta_mean": float(np.mean(dscores)) if dscores else float("nan"),
        "score_delta_max": float(np.max(dscores)) if dscores else float("nan"),
        "mask_iou_mean": float(np.mean(mious)) if mious else float("nan"),
        "mask_iou_p05": float(np.percentile(mious, 5)) if mious else float("nan"),
    }


# --- training --------------------------------------------------------------------------------------------------------


class _SyntheticCoco(torch.utils.data.Dataset):
    """JPEG bytes decoded per item, with 1–6 random boxes and box-shaped masks as targets."""

    def __init__(self, datas: list[bytes]):
        self.datas = datas

    def __len__(self) -> int:
        return len(self.datas) * 8

    def __getitem__(self, i: int):
        from model.decode import decode_image

        image = torch.from_numpy(decode_image(self.datas[i % len(self.datas)], max_pixels=10**9)).permute(
            2, 0, 1
        )
        h, w = image.shape[1:]
        g = torch.Generator().manual_seed(i)
        n = int(torch.randint(1, 7, (), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 20 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        return image.float() / 255, {
            "boxes": boxes,
            "labels": torch.randint(1, 91, (n,), generator=g),
            "masks": masks,
        }


def training(
    datas: list[bytes], device: torch.device, *, batch: int, steps: int, workers: int
) -> dict[str, float]:
    from model.build import build_maskrcnn
    from model.data import collate

    ds = _SyntheticCoco(datas)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )
    start, n = time.perf_counter(), 0
    for i, (images, _) in enumerate(loader):  # the loader alone: how fast it can feed
        n += len(images)
        if i + 1 >= steps:
            break
    loader_rate = n / (time.perf_counter() - start)
    model = build_maskrcnn(num_classes=91, weights="none").to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    seen, start = 0, None
    for i, (images, targets) in enumerate(loader):
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, enabled=amp):
            loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if i == 1:  # two warm-up steps
            sync(device)
            start = time.perf_counter()
        elif i > 1:
            seen += len(images)
        if i + 1 >= steps + 2:
            break
    sync(device)
    return {"train_img_s": seen / (time.perf_counter() - start), "loader_img_s": loader_rate}


# --- main ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    from pipeline.segment.settings import batch_size_for

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument(
        "--mix",
        default="phone,640x480",
        help=f"image sets, comma-separated, of {sorted(MIXES)}; ratios and host figures on the first",
    )
    p.add_argument("--images", type=int, default=None, help="per set (default 48 on cuda, 3 on cpu)")
    p.add_argument(
        "--batches",
        default=None,
        help="batch sizes for the actor path (default 1,8,16 on cuda, none more on cpu); the job's default "
        "batch is always added",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--train", action="store_true", help="also training images/s with AMP (cuda)")
    p.add_argument(
        "--drift-weights", default=None, help="checkpoint for the fp16 vs fp32 part (default: random)"
    )
    p.add_argument(
        "--drift-images", default=None, help="folder of JPEGs for that part (default: generated 640x480)"
    )
    args = p.parse_args()
    mixes = args.mix.split(",")
    if unknown := [m for m in mixes if m not in MIXES]:
        p.error(f"--mix: unknown {unknown}, allowed {sorted(MIXES)}")
    cuda = args.device == "cuda"
    n = args.images or (48 if cuda else 3)
    default_batch = batch_size_for(None, args.device)  # what the job runs when model.batch_size is auto
    extra = args.batches if args.batches is not None else ("1,8,16" if cuda else "")
    batches = sorted({default_batch, *(int(b) for b in extra.split(",") if b)})
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from model.build import resolve_spec
    from pipeline.segment.infer import Segmenter

    spec = resolve_spec("none")  # torchvision's sizes: 800 / 1333
    sets = {mix: make_jpegs(n, mix, seed=k) for k, mix in enumerate(mixes)}
    main_set = mixes[0]
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {args.threads} threads"
    print(
        f"device: {name}; torch {torch.__version__}; sets {', '.join(mixes)}, {n} images each; model R50-FPN "
        f"random init, 800/1333, score threshold 0, up to {MAX_DETECTIONS} detections per image; "
        f"the job's default batch {default_batch}"
    )
    nvml, nvml_source = nvml_reader(device) if cuda else (None, "not a GPU")
    if cuda:
        print(f"NVML utilisation: {nvml_source if nvml else 'unavailable (' + nvml_source + ')'}")
    figures: dict[str, object] = {}

    def named(base: str, mix: str) -> str:  # the first set's figures carry no set name
        return base if mix == main_set else f"{base}_{mix}"

    model = random_model(score=0.0, threads=args.threads, detections=MAX_DETECTIONS).to(device)
    naive_rate = {}
    for mix, datas in sets.items():
        naive_rate[mix] = naive(datas, model, device)
        print(f"naive script fp32, {mix}: {naive_rate[mix]:.2f} images/s")
        figures[f"naive_fp32_{mix}_img_s"] = round(naive_rate[mix], 2)
    del model
    if cuda:
        torch.cuda.empty_cache()  # the naive paste's full-image canvases
    precisions = ["fp32", "fp16"] if cuda else ["fp32"]
    for precision in precisions:
        seg = Segmenter(
            spec=spec,
            score_threshold=0.0,
            max_detections=MAX_DETECTIONS,
            device=args.device,
            precision=precision,
        )
        for b in batches:
            for mix, datas in sets.items():
                r = actor_path(datas, seg, b, nvml)
                busy = ""
                if cuda:
                    util = "n/a" if r["util"] is None else f"{r['util']:.0%}"
                    busy = (
                        f"; device busy {r['busy_lo']:.0%} (forward) to {r['busy_hi']:.0%} (with detections), "
                        f"NVML {util}" + (f" ({r['util_error']})" if r["util_error"] else "")
                    )
                print(f"ours {precision} batch {b:2d} {mix:8s}: {r['img_s']:7.2f} images/s{busy}")
                figures[f"ours_{precision}_b{b}_{mix}_img_s"] = round(r["img_s"], 2)
                if cuda and b == default_batch:
                    figures[f"gpu_busy_lo_{precision}_b{b}_{mix}"] = round(r["busy_lo"], 3)
                    figures[f"gpu_busy_hi_{precision}_b{b}_{mix}"] = round(r["busy_hi"], 3)
                    if r["util"] is not None:
                        figures[f"gpu_util_{precision}_b{b}_{mix}"] = round(r["util"], 3)
                if b == default_batch:
                    ratio = r["img_s"] / naive_rate[mix]
                    figures[named(f"ours_{precision}_vs_naive_fp32", mix)] = round(ratio, 2)
        for mix, datas in sets.items():
            stages = profile(datas[: max(default_batch, min(n, 12))], seg, default_batch)
            device_ms = stages["copy"] + stages["forward"] + stages["masks (device)"]
            host_ms = stages["RLE strings (host)"] + stages["rows + Arrow (host)"]
            print(
                f"profile {precision} batch {default_batch} {mix} (ms per image, "
                f"{stages['detections per image']:.0f} detections per image"
                f"{', device stages by CUDA events' if cuda else ''}): "
                + ", ".join(f"{k} {v:.2f}" for k, v in stages.items() if k != "detections per image")
            )
            print(f"  device stages {device_ms:.2f} ms, host stages {host_ms:.2f} ms per image")
            figures[named(f"host_ms_{precision}", mix)] = round(host_ms, 3)
            figures[named(f"device_ms_{precision}", mix)] = round(device_ms, 2)
        del seg

    if args.drift_images:
        files = sorted(
            f for f in os.listdir(args.drift_images) if f.lower().endswith((".jpg", ".jpeg", ".png"))
        )
        drift_data = [open(os.path.join(args.drift_images, f), "rb").read() for f in files[:16]]
    else:
        drift_data = make_jpegs(8 if cuda else 2, "640x480", seed=100)
    drift_spec = resolve_spec(args.drift_weights) if args.drift_weights else spec
    # bf16 too: on a CPU with AVX-512 it is the job's fast option (model.precision: bf16), not a proxy.
    for other in ("fp16", "bf16"):
        drift = precision_drift(drift_data, drift_spec, args.device, None if cuda else 320, other=other)
        what = f"{drift_spec.model_id}, {len(drift_data)} images, score >= 0.05" + (
            ", CPU fp16 kernels" if other == "fp16" and not cuda else ""
        )
        print(
            f"{other} vs fp32 ({what}): "
            + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in drift.items())
        )
        figures.update({f"{other}_{k}": round(v, 4) if isinstance(v, float) else v for k, v in drift.items()})

    if args.train:
        t = training(
            make_jpegs(min(n, 16), "640x480", seed=200),
            device,
            batch=8 if cuda else 2,
            steps=20 if cuda else 2,
            workers=4,
        )
        print(
            f"training, batch {8 if cuda else 2}{' with AMP' if cuda else ''}: {t['train_img_s']:.1f} images/s; "
            f"the data loader alone (4 workers): {t['loader_img_s']:.1f} images/s"
        )
        figures.update({k: round(v, 1) for k, v in t.items()})

    host = figures[f"host_ms_{precisions[-1]}"]
    rest = " ".join(f"{k}={v}" for k, v in figures.items())
    print(f"host_ms_per_image={host} device={args.device} {rest}")


if __name__ == "__main__":
    main()
