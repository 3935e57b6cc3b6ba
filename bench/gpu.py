"""The actor's compute path on a GPU (or, with `--device cpu`, its host side on this machine), side by side with the
naive per-image script. torch and torchvision are all it needs: no Ray, no storage, pycocotools optional.

    python bench/gpu.py --device cuda [--images 64] [--batches 1,8,16] [--train]
    python bench/gpu.py --device cpu             # this machine: the host path at 100 detections per image

Images: generated JPEGs, 640×480 and mixed COCO-like sizes (480–800 × 360–640), textured with shapes. Model:
`maskrcnn_resnet50_fpn` with random weights (no download possible), torchvision's sizes (800 / 1333), score
threshold 0 and 100 detections per image (the most an image can have: the worst case for everything after the
model).

- naive: what a user writes — PIL open, `model([image])` per image (torchvision pastes every mask into a full-image
  canvas), every mask RLE-encoded with pycocotools (with `model.rle` where pycocotools is missing).
- ours: the inference actor's compute path (`pipeline.segment.infer.Segmenter` and the writer's Arrow columns), laid
  out as the actor runs it: decode on 8 threads ahead of the model, the forward pass on the main thread, masks, RLE
  strings and Arrow columns on one post-processing thread; fp32 and fp16 (autocast), batch sizes `--batches`.
- profile: the same stages one after another, synchronised, in ms per image: decode, copy to the device, forward,
  masks on the device (paste, threshold, run boundaries, and the copy of the boundaries back), RLE strings, Arrow;
  GPU busy time = the device stages' share of the wall time.
- host: the steps that stay on the host when the device is a GPU — the RLE strings from the run boundaries,
  `Detections` assembly, the unit writer's bookkeeping and the Arrow columns (decode runs on read threads, off the
  actor's path) — in ms per image
  at 100 detections; on `--device cpu` the device steps run on the CPU and are reported separately.
- fp16 and bf16 vs fp32: on the same images, detections matched by label and box IoU ≥ 0.5: mean/min box IoU, score
  differences, mask IoU, and detections that have no match. Random weights make detections near-ties and masks
  near 0.5 everywhere, so this part takes a trained checkpoint (`--drift-weights`, e.g. the demo's) and its own
  images (`--drift-images`, e.g. `demo/shapes/val`); without them it runs on the random model, a worst case. On a
  CPU fp16 (autocast with CPU fp16 kernels, ~10× slower than fp32 there) is a proxy for what a GPU does; bf16 is
  what `model.precision: bf16` runs, and its `time_vs_fp32` its speed there.
- `--train` (GPU): training images/s with AMP at batch 8 on generated images and synthetic targets, with the data
  loader's own rate (4 workers, pinned memory) beside it.

The last line is `host_ms_per_image=<x> device=<cpu|cuda>` followed by the other figures as `name=value`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._common import encode_jpeg, mask_rles, per_image_loop, photo_like, random_model, sync  # noqa: E402

MAX_DETECTIONS = 100


def make_jpegs(n: int, *, mixed: bool, seed: int = 0) -> list[bytes]:
    """`n` JPEGs, 640×480 or (`mixed`) 480–800 × 360–640, textured, with 3–8 large ellipses each."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = (int(rng.integers(480, 801)), int(rng.integers(360, 641))) if mixed else (640, 480)
        image = photo_like(rng, h, w, base=(60, 200), noise=30, shapes=(3, 9), margin=40, extent=(20, 250))
        out.append(encode_jpeg(image))
    return out


# --- the two scripts ------------------------------------------------------------------------------------------------


def naive(datas: list[bytes], model, device: torch.device) -> float:
    """images/s of the naive script: PIL, `model([image])`, every mask RLE-encoded (warm-up on one image first)."""
    return per_image_loop(model, datas, finish=lambda _, out: mask_rles(out), device=device, warm_finish=True)


def actor_path(datas: list[bytes], seg, batch: int) -> float:
    """images/s of the actor's compute path, laid out as `SegmentWorker` runs it (decode threads → forward on this
    thread → masks, strings and Arrow on one post thread)."""
    from model.decode import decode_image
    from pipeline.segment.writer import detections_table

    names = np.array(list(seg.spec.class_names), dtype=object)
    pin = seg.device.type == "cuda"

    def decode(data: bytes):
        image = decode_image(data, max_pixels=10**9)
        return torch.from_numpy(image).pin_memory() if pin else image

    def finish(outputs, images) -> None:
        dets = seg.detections(outputs, [(int(i.shape[0]), int(i.shape[1])) for i in images])
        detections_table(
            [("u", int(i.shape[0]), int(i.shape[1]), d) for i, d in zip(images, dets) if len(d)],
            names,
            "m",
            "r",
        )

    with ThreadPoolExecutor(8) as readers, ThreadPoolExecutor(1) as post:
        warm = [decode(datas[0])] * batch
        finish(seg.forward(warm), warm)  # warm-up (kernels, autocast caches)
        sync(seg.device)
        start = time.perf_counter()
        decoded = readers.map(decode, datas)
        pending, images = [], []
        for image in decoded:
            images.append(image)
            if len(images) == batch:
                pending.append(post.submit(finish, seg.forward(images), images))
                images = []
        if images:
            pending.append(post.submit(finish, seg.forward(images), images))
        for f in pending:
            f.result()
        sync(seg.device)
    return len(datas) / (time.perf_counter() - start)


# --- the profile and the host path ------------------------------------------------------------------------------------


def profile(datas: list[bytes], seg, batch: int, reps: int = 21) -> dict[str, float]:
    """ms per image of each stage, one after another, synchronised. The host stages are repeated `reps` times on
    the same inputs and their median taken (they are short, and this machine is noisy)."""
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
    detections = 0
    for start in range(0, len(datas), batch):
        chunk = datas[start : start + batch]
        t0 = time.perf_counter()
        images = [decode_image(d, max_pixels=10**9) for d in chunk]
        t1 = time.perf_counter()
        tensors = [
            to_tensor(torch.from_numpy(i).pin_memory() if device.type == "cuda" else i, device)
            for i in images
        ]
        sync(device)
        t2 = time.perf_counter()
        with torch.inference_mode(), seg._autocast():
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
        with torch.inference_mode():
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--images", type=int, default=None, help="per size set (default 64 on cuda, 3 on cpu)")
    p.add_argument(
        "--batches", default=None, help="batch sizes for the actor path (default 1,8,16 on cuda, 1 on cpu)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--train", action="store_true", help="also training images/s with AMP (cuda)")
    p.add_argument(
        "--drift-weights", default=None, help="checkpoint for the fp16 vs fp32 part (default: random)"
    )
    p.add_argument(
        "--drift-images", default=None, help="folder of JPEGs for that part (default: the generated)"
    )
    args = p.parse_args()
    cuda = args.device == "cuda"
    n = args.images or (64 if cuda else 3)
    batches = [int(b) for b in (args.batches or ("1,8,16" if cuda else "1")).split(",")]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from model.build import resolve_spec
    from pipeline.segment.infer import Segmenter

    spec = resolve_spec("none")  # torchvision's sizes: 800 / 1333
    sets = {"640x480": make_jpegs(n, mixed=False), "mixed": make_jpegs(n, mixed=True, seed=1)}
    name = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} threads"
    print(
        f"device: {name}; torch {torch.__version__}; {n} images per set; model R50-FPN random init, 800/1333, "
        f"score threshold 0, up to {MAX_DETECTIONS} detections per image"
    )
    figures: dict[str, object] = {}

    model = random_model(score=0.0, threads=args.threads, detections=MAX_DETECTIONS).to(device)
    naive_rate = naive(sets["640x480"], model, device)
    del model
    print(f"naive script, 640x480: {naive_rate:.2f} images/s")
    figures["naive_img_s"] = round(naive_rate, 2)
    precisions = ["fp32", "fp16"] if cuda else ["fp32"]
    best = 0.0
    for precision in precisions:
        seg = Segmenter(
            spec=spec,
            score_threshold=0.0,
            max_detections=MAX_DETECTIONS,
            device=args.device,
            precision=precision,
        )
        for b in batches:
            for label, datas in sets.items():
                rate = actor_path(datas, seg, b)
                best = max(best, rate) if label == "640x480" else best
                print(f"ours {precision} batch {b:2d} {label:8s}: {rate:7.2f} images/s")
                figures[f"ours_{precision}_b{b}_{label}_img_s"] = round(rate, 2)
        b = max(batches)
        stages = profile(sets["640x480"][: max(b, min(n, 8))], seg, b)
        device_ms = stages["copy"] + stages["forward"] + stages["masks (device)"]
        host_ms = stages["RLE strings (host)"] + stages["rows + Arrow (host)"]
        wall = sum(v for k, v in stages.items() if k != "detections per image")
        print(
            f"profile {precision} batch {b} (ms per image, {stages['detections per image']:.0f} detections per image): "
            + ", ".join(f"{k} {v:.2f}" for k, v in stages.items() if k != "detections per image")
        )
        print(
            f"  device stages {device_ms:.2f} ms, host stages {host_ms:.2f} ms; "
            f"{'GPU busy' if cuda else 'device share'} {device_ms / wall:.0%} of the sequential wall time"
        )
        figures[f"host_ms_{precision}"] = round(host_ms, 3)
        figures[f"device_ms_{precision}"] = round(device_ms, 2)
        del seg
    figures["ours_vs_naive"] = round(best / naive_rate, 2)

    if args.drift_images:
        files = sorted(
            f for f in os.listdir(args.drift_images) if f.lower().endswith((".jpg", ".jpeg", ".png"))
        )
        drift_data = [open(os.path.join(args.drift_images, f), "rb").read() for f in files[:16]]
    else:
        drift_data = sets["640x480"][: (8 if cuda else 2)]
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
        t = training(sets["640x480"], device, batch=8 if cuda else 2, steps=20 if cuda else 2, workers=4)
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
