"""The inference actor's memory, its idle time between units, its batches' padding and its progress, side by side.

    python bench/actor.py memory   [--images 24] [--side 10000]       # the job on huge photos: RSS and progress
    python bench/actor.py boundary [--unit-size 2048] [--units 3]     # model idle at unit boundaries, +50 ms storage
    python bench/actor.py padding                                     # padded / real pixels of batches

- memory: the segment job (embedded Ray, 2 CPUs, CPU actor, random weights, `model.min_size=96`, defaults otherwise)
  on `--images` JPEGs of `--side` x `--side` pixels (100 MP: the default `input.max_pixels`), twice: with the default
  byte budget for decoded images (`compute.image_memory_mb` auto), and with the budget lifted (1 TiB) to show what
  it bounds. Prints each run's actor peak RSS (sampled every 0.2 s), the seconds between its progress lines (the
  longest gap while it ran, against `progress_interval_s`), and, measured in this process beforehand, what the model
  takes (RSS after building it) and one image at the pixel cap through decode, shrink and the forward pass (the
  random model has no detection at the default threshold 0.5, so no mask is pasted).
- boundary: one `SegmentWorker` driven as Ray Data drives it (one thread per concurrent call), without Ray: a unit
  list of `--unit-size` inputs (small JPEGs on moto S3 behind the fault proxy adding 50 ms to every request, read by
  64 threads), the forward pass stubbed to take `batch / 300` s (300 images/s, the GPU target) and return no
  detections, the default GPU batch (4) with the post-processing thread. Two units in flight per actor (the job's
  layout) against one (the layout before it): the model thread's idle time at each unit boundary (from the end of
  the last forward pass of unit k to the start of the next pass, less the median gap between passes within units).
  The idle at a boundary is a fixed cost (the commit's uploads, the next unit's list and first reads, each +50 ms),
  so it is reported against a default GPU unit (2,048 images at 300 images/s = 6.83 s). On the 2-core build machine
  moto and the proxy serve ~55 images/s (HEAD + ranged GET each), below 300: run there with `--rate 30` (under the
  storage's rate, so that the reads keep up within a unit and only the boundary shows) and smaller units.
- padding: 50/50 landscape/portrait 4:3 photos (4000x3000 and 3000x4000) in random arrival order, batch 4, at the
  model's default sizes: the pixels the model processes (each batch padded to its largest sides, then to a multiple
  of 32) over the images' own, in arrival order against `pipeline.segment.batching.ShapeBatcher`'s grouping.

Each part ends with one line of `name=value` figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# --- memory --------------------------------------------------------------------------------------------------------


def huge_jpegs(folder: str, n: int, side: int) -> list[str]:
    """`n` JPEGs of `side` x `side` (two distinct images, copied): smooth gradients with noise, ~10-20 MB each."""
    import numpy as np
    from PIL import Image

    paths = []
    made: list[bytes] = []
    for seed in range(min(2, n)):
        rng = np.random.default_rng(seed)
        img = np.empty((side, side, 3), np.uint8)
        ramp = np.linspace(0, 200, side, dtype=np.float32)
        img[..., 0] = ramp[:, None].astype(np.uint8)
        img[..., 1] = ramp[None, :].astype(np.uint8)
        img[..., 2] = 100
        noise = rng.integers(0, 48, (side // 16 + 1, side // 16 + 1, 1), dtype=np.uint8)
        img += noise.repeat(16, 0).repeat(16, 1)[:side, :side]
        path = os.path.join(folder, f"seed{seed}.jpg")
        Image.fromarray(img).save(path, quality=85)
        made.append(open(path, "rb").read())
        os.remove(path)
        del img, noise
    for i in range(n):
        path = os.path.join(folder, f"{i:04d}.jpg")
        with open(path, "wb") as f:
            f.write(made[i % len(made)])
        paths.append(path)
    return paths


def model_and_one_image(path: str, min_size: int) -> tuple[float, float]:
    """RSS (MiB) after building the model, and the peak RSS over one image at the pixel cap (decode, shrink,
    forward, masks), measured in this process."""
    import psutil

    from model.build import resolve_spec
    from model.decode import decode_image
    from model.resize import shrink_for_model
    from pipeline.segment.infer import Segmenter

    proc = psutil.Process()
    spec = resolve_spec("none", min_size=min_size, max_size=1333)
    from pipeline.segment.memory import return_freed_memory

    return_freed_memory()  # as the actor does
    seg = Segmenter(spec=spec, score_threshold=0.5, threads=2)  # the job's default threshold
    model_rss = proc.memory_info().rss
    peak = [model_rss]
    stop = threading.Event()

    def sample():
        while not stop.wait(0.05):
            peak[0] = max(peak[0], proc.memory_info().rss)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    image = decode_image(open(path, "rb").read(), max_pixels=10**8)
    size = image.shape[:2]
    small = shrink_for_model(image, min_size=spec.min_size, max_size=spec.max_size)
    del image
    seg.detections(seg.forward([small], [size]), [size])
    stop.set()
    t.join()
    return model_rss / 2**20, peak[0] / 2**20


def run_job(folder: str, out: str, *, min_size: int, image_memory_mb: int | None, interval_s: float) -> dict:
    from bench._common import ActorMemory
    from pipeline.segment.config import segment_config
    from pipeline.segment.run import segment

    cfg = {
        "input": {"url": folder},
        "output": {"url": out, "mode": "overwrite"},
        "model": {"weights": "none", "min_size": min_size},
        "progress_interval_s": interval_s,
    }
    if image_memory_mb:
        cfg["compute"] = {"image_memory_mb": image_memory_mb}
    stamps: list[float] = []
    t0 = time.perf_counter()

    def log(line: str) -> None:
        if line.startswith("progress:"):
            stamps.append(time.perf_counter() - t0)
        print(f"  [{time.perf_counter() - t0:6.1f} s] {line}", flush=True)

    with ActorMemory(0.2) as rss:
        summary = segment(segment_config(cfg), log=log)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {
        "peak_rss_gib": rss.peak_rss / 2**30,
        "max_gap_s": max(gaps) if gaps else float("nan"),
        "first_line_s": stamps[0] if stamps else float("nan"),
        "lines": len(stamps),
        "seconds": time.perf_counter() - t0,
        "images": summary.images,
    }


def part_memory(args) -> None:
    from bench._common import local_ray

    with tempfile.TemporaryDirectory(prefix="bench-actor-") as tmp:
        folder = os.path.join(tmp, "in")
        os.makedirs(folder)
        t = time.perf_counter()
        paths = huge_jpegs(folder, args.images, args.side)
        print(f"{len(paths)} JPEGs of {args.side}x{args.side} in {time.perf_counter() - t:.0f} s", flush=True)
        model_mib, one_mib = model_and_one_image(paths[0], args.min_size)
        print(
            f"in this process: model {model_mib:.0f} MiB RSS; one image at the pixel cap: peak {one_mib:.0f} MiB"
        )
        results = {}
        with local_ray(2):
            for name, budget in (("default", None), ("unbounded", 1 << 20)):
                print(f"job, image memory {name}:", flush=True)
                results[name] = run_job(
                    folder,
                    os.path.join(tmp, f"out-{name}"),
                    min_size=args.min_size,
                    image_memory_mb=budget,
                    interval_s=args.interval,
                )
                r = results[name]
                print(
                    f"  actor peak RSS {r['peak_rss_gib']:.2f} GiB; {r['lines']} progress lines, first at "
                    f"{r['first_line_s']:.0f} s, longest gap {r['max_gap_s']:.1f} s (progress_interval_s="
                    f"{args.interval:g}); {r['images']} images in {r['seconds']:.0f} s",
                    flush=True,
                )
    d, u = results["default"], results["unbounded"]
    print(
        f"actor_peak_rss_gib={d['peak_rss_gib']:.2f} unbounded_peak_rss_gib={u['peak_rss_gib']:.2f} "
        f"model_mib={model_mib:.0f} one_image_peak_mib={one_mib:.0f} progress_max_gap_s={d['max_gap_s']:.1f} "
        f"progress_interval_s={args.interval:g} first_progress_s={d['first_line_s']:.0f}"
    )


# --- boundary ------------------------------------------------------------------------------------------------------

GPU_UNIT = 2048  # input.unit_size auto on GPU clusters
GPU_UNIT_S = GPU_UNIT / 300  # its time at the GPU target of 300 images/s

_PROXY = """
import sys, time
sys.path.insert(0, sys.argv[1])
from tests.support.s3proxy import FaultyS3
with FaultyS3(sys.argv[2], [], latency_s=float(sys.argv[3])) as proxy:
    print(proxy.endpoint, flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def proxy_in_process(upstream: str, latency_s: float):
    """The tests' S3 proxy (`tests/support/s3proxy.py`) adding `latency_s` to every request, in a process of its
    own (its threads would otherwise share this process's GIL with the actor's read threads); yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _PROXY, ROOT, upstream, str(latency_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def part_boundary(args) -> None:
    import numpy as np

    from model.build import resolve_spec
    from model.postprocess import Detections
    from pipeline.segment.settings import GPU_BATCH_SIZE, WorkerSettings
    from pipeline.segment.sources import InputRef
    from pipeline.segment.units import Kind
    from pipeline.segment.worker import SegmentWorker
    from tests.conftest import plan_units
    from tests.support.images import jpeg_bytes
    from tests.support.s3 import moto_in_process, s3_filesystem

    rate = args.rate
    with moto_in_process() as endpoint, proxy_in_process(endpoint, args.latency) as proxy:
        fs = s3_filesystem(endpoint, skip_instance_cache=True)
        fs.mkdir("bench")
        distinct = 64
        for i in range(distinct):
            fs.pipe(f"bench/in/{i:03d}.jpg", jpeg_bytes(48, 64, seed=i))
        opts = {"client_kwargs": {"endpoint_url": proxy}, "skip_instance_cache": True}
        refs = [
            InputRef(Kind.FILES, f"s3://bench/in/{i % distinct:03d}.jpg", f"s3://bench/in/{i:06d}.jpg")
            for i in range(args.unit_size * args.units)
        ]
        figures = {}
        for in_flight in (1, 2):
            plan_url = f"s3://bench/plan-{in_flight}"
            units = plan_units(refs, plan_url=plan_url, unit_size=args.unit_size, storage_options=opts)
            spec = resolve_spec("none", min_size=96, max_size=128)
            worker = SegmentWorker(
                WorkerSettings(
                    spec=spec,
                    output_url=f"s3://bench/out-{in_flight}",
                    score_threshold=0.5,
                    batch_size=GPU_BATCH_SIZE,
                    overlap=True,
                    io_threads=args.io_threads,
                    output_options=opts,
                    input_options=opts,
                )
            )
            passes: list[tuple[float, float, int]] = []  # (start, end, unit order) per forward pass
            lock = threading.Lock()

            def forward(images, sizes=None, worker=worker, passes=passes, lock=lock):
                t = time.perf_counter()
                time.sleep(len(images) / rate)
                with lock:
                    passes.append((t, time.perf_counter(), worker._local.order))
                return [None] * len(images)

            def detections(outputs, sizes):
                empty = Detections(
                    np.zeros((0, 4), np.float32),
                    np.zeros(0, np.int64),
                    np.zeros(0, np.float32),
                    [],
                    np.zeros(0, np.int64),
                )
                return [empty for _ in outputs]

            worker.segmenter.forward = forward
            worker.segmenter.detections = detections
            queue = list(units)
            qlock = threading.Lock()
            unit_times: list[float] = []

            def call(queue=queue, qlock=qlock, unit_times=unit_times, worker=worker):
                while True:
                    with qlock:
                        if not queue:
                            return
                        unit = queue.pop(0)
                    t = time.perf_counter()
                    worker.process(unit)
                    unit_times.append(time.perf_counter() - t)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=call) for _ in range(in_flight)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            wall = time.perf_counter() - t0
            passes.sort()
            gaps = [b[0] - a[1] for a, b in zip(passes, passes[1:])]
            within = [g for (a, b), g in zip(zip(passes, passes[1:]), gaps) if a[2] == b[2]]
            typical = statistics.median(within) if within else 0.0
            # A boundary: the last pass of a unit (by order), and the first pass that starts after it ends.
            last_of = {}
            for p in passes:
                last_of[p[2]] = p
            idle = []
            for _order, last in sorted(last_of.items())[:-1]:
                after = [p for p in passes if p[0] >= last[1]]
                if after:
                    idle.append(max(0.0, after[0][0] - last[1] - typical))
            unit_s = args.unit_size / rate
            per_boundary = statistics.mean(idle) if idle else 0.0
            figures[in_flight] = (per_boundary, per_boundary / GPU_UNIT_S)
            busy = sum(p[1] - p[0] for p in passes)
            print(
                f"{in_flight} unit(s) in flight: {len(passes)} passes, model busy {busy / wall:.1%} of {wall:.1f} s; "
                f"median gap within a unit {typical * 1e3:.1f} ms; idle per unit boundary "
                f"{[round(i * 1e3) for i in idle]} ms = {per_boundary / unit_s:.2%} of a unit's {unit_s:.1f} s "
                f"at {rate:g} images/s",
                flush=True,
            )
    one, two = figures[1], figures[2]
    print(
        f"idle per boundary as a share of a default GPU unit ({GPU_UNIT} images at 300 images/s = "
        f"{GPU_UNIT_S:.2f} s): two units in flight {two[1]:.2%}, one {one[1]:.2%}"
    )
    print(
        f"boundary_idle_ms_two_units={two[0] * 1e3:.0f} boundary_idle_share_two_units={two[1]:.4f} "
        f"boundary_idle_ms_one_unit={one[0] * 1e3:.0f} boundary_idle_share_one_unit={one[1]:.4f}"
    )


# --- padding -------------------------------------------------------------------------------------------------------


def part_padding(args) -> None:
    from pipeline.segment.batching import ShapeBatcher, padded_ratio

    class Item:
        def __init__(self, h, w):
            self.height, self.width = h, w

    rng = random.Random(0)
    sizes = [(3000, 4000), (4000, 3000)] * (args.images // 2)
    rng.shuffle(sizes)
    arrival = [sizes[k : k + args.batch] for k in range(0, len(sizes), args.batch)]
    batcher = ShapeBatcher(args.batch)
    grouped = []
    for h, w in sizes:
        grouped += [[(i.height, i.width) for i in b] for b in batcher.add(Item(h, w))]
    grouped += [[(i.height, i.width) for i in b] for b in batcher.flush()]
    naive = padded_ratio(arrival, min_size=800, max_size=1333)
    ours = padded_ratio(grouped, min_size=800, max_size=1333)
    full = sum(len(b) == args.batch for b in grouped) / len(grouped)
    print(
        f"{len(sizes)} images, batch {args.batch}: arrival order {naive:.3f}, grouped by orientation {ours:.3f} "
        f"({full:.0%} of batches full)"
    )
    print(f"padded_ratio_grouped={ours:.3f} padded_ratio_arrival={naive:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("memory", "boundary", "padding"))
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--side", type=int, default=10_000)
    p.add_argument("--min-size", type=int, default=96)
    p.add_argument("--interval", type=float, default=10.0, help="progress_interval_s of the memory runs")
    p.add_argument("--unit-size", type=int, default=2048)
    p.add_argument("--units", type=int, default=3)
    p.add_argument("--rate", type=float, default=300.0, help="images/s of the stubbed forward pass")
    p.add_argument("--latency", type=float, default=0.05, help="seconds the proxy adds to every request")
    p.add_argument("--io-threads", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    if args.part == "memory":
        args.images = args.images or 24
        part_memory(args)
    elif args.part == "boundary":
        part_boundary(args)
    else:
        args.images = args.images or 1000
        part_padding(args)


if __name__ == "__main__":
    main()
