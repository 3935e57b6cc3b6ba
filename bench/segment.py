"""Pipeline vs bare model loop vs the naive per-image script, side by side in one run: same images, same weights,
same threads.

    python bench/segment.py [--images 16] [--height 480 --width 640] [--batch-size 1] [--threads 2] [--options]

- bare: the images decoded up front (not timed), then only torchvision's `model(batch)` (its full-image mask paste
  included) under `torch.inference_mode()`.
- naive: the script a user would write: for each file, PIL open → tensor → `model([image])`, then every detection's
  full-resolution thresholded mask saved as a PNG and a JSON of boxes/labels/scores per image. Timed from the first
  image to the last file written (model built and warmed up before, as for the bare loop).
- pipeline: `pipeline.segment.run.segment` end to end on an embedded Ray (already started): plan, actor start and model load,
  reads, decode, model, masks pasted/thresholded/RLE-encoded within their boxes, Parquet commits. One actor,
  `--threads` torch threads. Its output bytes: the `images/` and `detections/` data files.
- profile: one actor's compute path, timed by calling the Segmenter's pieces directly in this process (decode,
  model up to the RoI heads, masks, Arrow, Parquet), beside what torchvision's own full-image paste would cost on
  the same model outputs.
- `--options`: also times the model with and without the CPU options the performance issue asks about (batching
  across images, `torch.inference_mode` vs `torch.no_grad`, channels-last), interleaved, best of `--repeats`.

The last line is `pipeline_vs_bare=<x> pipeline_vs_naive=<y> naive_bytes_vs_ours=<z>`: images/s ratios and the bytes
the naive script wrote ÷ the bytes of our Parquet output.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._common import ActorMemory, local_ray, per_image_loop, random_model  # noqa: E402


def bare_loop(
    files: list[str], *, min_size: int, max_size: int, batch_size: int, threads: int, score: float
) -> float:
    import torch

    from model.decode import decode_image

    model = random_model(min_size=min_size, max_size=max_size, score=score, threads=threads)
    images = [decode_image(open(f, "rb").read(), max_pixels=10**9) for f in files]
    tensors = [torch.from_numpy(i).permute(2, 0, 1).float().div(255) for i in images]
    with torch.inference_mode():
        model(tensors[:1])  # warm-up, as the pipeline's actor also runs one batch before it is at speed
        start = time.perf_counter()
        for k in range(0, len(tensors), batch_size):
            model(tensors[k : k + batch_size])
        elapsed = time.perf_counter() - start
    return len(files) / elapsed


def naive_script(
    files: list[str], out_dir: str, *, min_size: int, max_size: int, threads: int, score: float
) -> tuple[float, int, int]:
    """The per-image script a user would write. Returns (images/s, bytes written, detections written)."""
    import numpy as np
    from PIL import Image

    model = random_model(min_size=min_size, max_size=max_size, score=score, threads=threads)
    os.makedirs(out_dir, exist_ok=True)
    detections = 0

    def save(f: str, out: dict) -> None:
        nonlocal detections
        keep = out["scores"] >= score
        stem = os.path.join(out_dir, os.path.splitext(os.path.basename(f))[0])
        masks = (out["masks"][keep, 0] >= 0.5).numpy()
        for k, mask in enumerate(masks):
            Image.fromarray(mask.astype(np.uint8) * 255).save(f"{stem}_mask{k:03d}.png")
        with open(stem + ".json", "w") as fh:
            json.dump(
                {
                    "image": f,
                    "boxes": out["boxes"][keep].tolist(),
                    "labels": out["labels"][keep].tolist(),
                    "scores": out["scores"][keep].tolist(),
                    "masks": [f"{os.path.basename(stem)}_mask{k:03d}.png" for k in range(len(masks))],
                },
                fh,
            )
        detections += len(masks)

    rate = per_image_loop(model, files, finish=save)  # warm-up forward not timed, nothing saved for it
    return rate, folder_bytes(out_dir), detections


def folder_bytes(path: str, suffix: str = "") -> int:
    """Bytes of the files below `path` (ending in `suffix`), skipping `_`/`.` names as Parquet readers do."""
    total = 0
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
        total += sum(
            os.path.getsize(os.path.join(root, n))
            for n in names
            if n.endswith(suffix) and not n.startswith(("_", "."))
        )
    return total


def profile_compute_path(
    files: list[str], *, min_size: int, max_size: int, batch_size: int, threads: int, score: float
) -> list[tuple[str, float]]:
    """One actor's compute path on `files`, stage by stage, calling the pieces the actor calls (`Segmenter`,
    `detections_table` of its `UnitWriter`, Parquet).

    Returns `(stage, seconds)`; the last entry is torchvision's own mask paste + `to_detections` on the same model
    outputs, for comparison (not part of the path).
    """
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from model.build import resolve_spec
    from model.decode import decode_image
    from model.postprocess import detections_from_mask_probs, forward_to_mask_probs, to_detections
    from pipeline.segment.infer import Segmenter, to_tensor
    from pipeline.segment.writer import ROW_GROUP_ROWS, detections_table

    spec = resolve_spec("none", min_size=min_size, max_size=max_size)
    seg = Segmenter(spec=spec, score_threshold=score, threads=threads)
    names_array = np.array(list(spec.class_names), dtype=object)
    datas = [open(f, "rb").read() for f in files]
    seg.predict([decode_image(datas[0], max_pixels=10**9)])  # warm-up, not timed
    names = ["decode", "model: transform+backbone+rpn+roi_heads", "masks: paste+threshold+RLE in boxes"]
    names += ["Arrow build", "Parquet write (zstd)", "(torchvision's full-image paste + to_detections)"]
    t = dict.fromkeys(names, 0.0)
    for start in range(0, len(files), batch_size):
        idx = range(start, min(start + batch_size, len(files)))
        t0 = time.perf_counter()
        images = [decode_image(datas[i], max_pixels=10**9) for i in idx]
        t1 = time.perf_counter()
        with torch.inference_mode():
            outputs = forward_to_mask_probs(seg.model, [to_tensor(img, seg.device) for img in images])
            t2 = time.perf_counter()
            dets = [
                detections_from_mask_probs(o, image_size=img.shape[:2], score_threshold=score)
                for o, img in zip(outputs, images)
            ]
            t3 = time.perf_counter()
            # What the actor's UnitWriter does with them: Arrow columns, then Parquet (zstd).
            table = (
                detections_table(
                    [
                        (files[i], img.shape[0], img.shape[1], d)
                        for i, img, d in zip(idx, images, dets)
                        if len(d)
                    ],
                    names_array,
                    spec.model_id,
                    "profile",
                )
                if any(len(d) for d in dets)
                else None
            )
            t4 = time.perf_counter()
            if table is not None:
                pq.write_table(table, io.BytesIO(), compression="zstd", row_group_size=ROW_GROUP_ROWS)
            t5 = time.perf_counter()
            for o, img in zip(outputs, images):
                pasted = paste_masks_in_image(o["masks"], o["boxes"], img.shape[:2])
                to_detections({**o, "masks": pasted}, score_threshold=score)
            t6 = time.perf_counter()
        for name, seconds in zip(names, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            t[name] += seconds
    return list(t.items())


def measure_options(
    files: list[str],
    *,
    min_size: int,
    max_size: int,
    batch_size: int,
    threads: int,
    score: float,
    repeats: int,
) -> tuple[dict[str, tuple[float, float]], str]:
    """The model up to the RoI heads with and without the CPU options: batched vs one image per call,
    inference_mode vs no_grad, channels-last. Variants run interleaved, `repeats` times, so a noisy machine hits
    them alike. Returns name → (best wall s/image, best CPU s/image of this process) and a line saying whether
    channels-last changes the detections (the output must stay the model's own)."""
    import contextlib

    import torch

    from model.decode import decode_image
    from model.postprocess import detections_from_mask_probs, forward_to_mask_probs

    model = random_model(min_size=min_size, max_size=max_size, score=score, threads=threads)
    tensors = [
        torch.from_numpy(decode_image(open(f, "rb").read(), max_pixels=10**9))
        .permute(2, 0, 1)
        .float()
        .div(255)
        for f in files
    ]

    @contextlib.contextmanager
    def nhwc():
        # Weights and the backbone's input in NHWC; the rest of the path is unchanged.
        model.to(memory_format=torch.channels_last)
        original = model.backbone.forward
        model.backbone.forward = lambda x: original(x.contiguous(memory_format=torch.channels_last))
        try:
            yield
        finally:
            del model.backbone.forward  # back to the class's method
            model.to(memory_format=torch.contiguous_format)

    def batched() -> None:
        for k in range(0, len(tensors), batch_size):
            forward_to_mask_probs(model, tensors[k : k + batch_size])

    def single() -> None:
        for x in tensors:
            forward_to_mask_probs(model, [x])

    def channels_last() -> None:
        with nhwc():
            batched()

    variants = {
        f"batch {batch_size}, inference_mode (ours)": (batched, torch.inference_mode),
        "batch 1, inference_mode": (single, torch.inference_mode),
        f"batch {batch_size}, no_grad": (batched, torch.no_grad),
        f"batch {batch_size}, inference_mode, channels-last": (channels_last, torch.inference_mode),
    }
    best = {name: (float("inf"), float("inf")) for name in variants}
    with torch.inference_mode():
        forward_to_mask_probs(model, tensors[:1])  # warm-up
    for _ in range(repeats):
        for name, (run, mode) in variants.items():
            with mode():
                wall, cpu = time.perf_counter(), time.process_time()
                run()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall / len(tensors)), min(best[name][1], cpu / len(tensors)))

    def detections(x: torch.Tensor):
        with torch.inference_mode():
            out = forward_to_mask_probs(model, [x])[0]
            return detections_from_mask_probs(out, image_size=tuple(x.shape[-2:]), score_threshold=score)

    plain = detections(tensors[0])
    with nhwc():
        other = detections(tensors[0])
    same = (
        len(plain) == len(other) and plain.rles == other.rles and bool((plain.scores == other.scores).all())
    )
    note = f"channels-last on image 0: {len(other)} vs {len(plain)} detections, "
    if same:
        note += "identical outputs"
    else:
        k = min(len(plain), len(other))
        diff = float(abs(plain.scores[:k] - other.scores[:k]).max()) if k else float("nan")
        differ = sum(a != b for a, b in zip(plain.rles, other.rles)) + abs(len(plain) - len(other))
        note += f"NOT identical: {differ} masks differ, max |score diff| {diff:.2e}"
    return best, note


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 16 images: at 640x480 resized to 800 an R50 forward takes ~2.5 s on one 2-core machine, and every side runs
    # them all (bare twice), so the default run stays under ~10 minutes there.
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--min-size", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--score-threshold", type=float, default=0.5)
    p.add_argument("--profile-images", type=int, default=8, help="images for the compute-path profile")
    p.add_argument(
        "--options", action="store_true", help="also time batching / inference_mode / channels-last"
    )
    p.add_argument("--repeats", type=int, default=2, help="repeats per variant for --options")
    args = p.parse_args()

    from pipeline.demo.shapes import make_shapes
    from pipeline.segment.config import segment_config
    from pipeline.segment.run import segment

    work = tempfile.mkdtemp(prefix="bench-segment-")
    make_shapes(work, train=0, val=args.images, seed=7, size=(args.height, args.width))
    # make_shapes varies sizes down to 75%; rewrite at exactly the stated size so every side sees COCO-like inputs.
    from PIL import Image

    files = sorted(os.path.join(work, "val", f) for f in os.listdir(os.path.join(work, "val")))
    for f in files:
        Image.open(f).convert("RGB").resize((args.width, args.height)).save(f, quality=92)
    print(
        f"images: {len(files)} JPEG {args.width}x{args.height}; model maskrcnn_resnet50_fpn (random init), "
        f"min_size {args.min_size}, batch {args.batch_size}, {args.threads} torch threads, "
        f"score_threshold {args.score_threshold}; machine: {os.cpu_count()} CPUs"
    )
    sizes = dict(
        min_size=args.min_size, max_size=args.max_size, threads=args.threads, score=args.score_threshold
    )

    run_bare = functools.partial(bare_loop, files, batch_size=args.batch_size, **sizes)
    bare = run_bare()
    print(f"bare model loop: {bare:.3f} images/s")
    naive, naive_bytes, naive_detections = naive_script(files, os.path.join(work, "naive"), **sizes)
    print(
        f"naive per-image script (PIL, model per image, PNG per mask + JSON): {naive:.3f} images/s; "
        f"{naive_detections} detections, {naive_bytes / 2**20:.2f} MiB written "
        f"({naive_bytes / max(naive_detections, 1):.0f} B per detection)"
    )

    results = os.path.join(work, "results")
    cfg = segment_config(
        {
            "input": {"url": os.path.join(work, "val")},
            "output": {"url": results},
            "model": {
                "weights": "none",
                "min_size": args.min_size,
                "max_size": args.max_size,
                "batch_size": args.batch_size,
                "score_threshold": args.score_threshold,
            },
            "compute": {"threads_per_actor": args.threads, "max_actors": 1},
        }
    )
    with local_ray(args.threads):
        with ActorMemory(0.2) as rss:
            start = time.perf_counter()
            summary = segment(cfg, log=lambda _: None)
            elapsed = time.perf_counter() - start
        # The same bare loop again while the (idle) Ray processes still share the cores: separates Ray's background
        # cost from the pipeline's own work.
        bare_ray_up = run_bare()
    print(f"bare model loop with an idle Ray running beside it: {bare_ray_up:.3f} images/s")
    assert summary.complete and summary.ok == len(files), summary.lines()
    pipe = len(files) / elapsed
    ours_bytes = folder_bytes(os.path.join(results, "images"), ".parquet")
    ours_bytes += folder_bytes(os.path.join(results, "detections"), ".parquet")
    print(
        f"pipeline (Ray Data, 1 actor, end to end incl. actor start): {pipe:.3f} images/s; "
        f"{summary.detections} detections, {ours_bytes / 2**20:.2f} MiB of Parquet (images/ + detections/; "
        f"{ours_bytes / max(summary.detections, 1):.0f} B per detection)"
    )
    print(f"actor peak RSS: {rss.peak_rss / 2**20:.0f} MiB")

    if args.options:
        best, note = measure_options(
            files[: args.profile_images], batch_size=args.batch_size, repeats=args.repeats, **sizes
        )
        print(
            f"model up to the RoI heads, best of {args.repeats}, variants interleaved (wall s/image, CPU s/image):"
        )
        for name, (wall, cpu) in best.items():
            print(f"  {name:<50} {wall:7.3f} {cpu:7.3f}")
        print(f"  {note}")

    stages = profile_compute_path(files[: args.profile_images], batch_size=args.batch_size, **sizes)
    n = min(args.profile_images, len(files))
    path_total = sum(s for _, s in stages[:-1])
    print(f"compute path of one actor, {n} images, called directly (share of the path; ms per image):")
    for name, seconds in stages:
        share = f"{100 * seconds / path_total:5.1f}%" if not name.startswith("(") else "      "
        print(f"  {name:<50} {seconds:8.3f} s {share} {1e3 * seconds / n:9.1f}")
    print(f"  {'total':<50} {path_total:8.3f} s")

    print(
        f"pipeline_vs_bare={pipe / bare:.3f} pipeline_vs_naive={pipe / naive:.3f} "
        f"naive_bytes_vs_ours={naive_bytes / ours_bytes:.1f}"
    )


if __name__ == "__main__":
    main()
