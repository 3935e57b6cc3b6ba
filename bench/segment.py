"""Pipeline vs bare model loop, side by side in one run, same images, same weights, same threads.

    python bench/segment.py [--images 32] [--height 480 --width 640] [--batch-size 4] [--threads 2]

- bare: the images decoded up front (not timed), then only `model(batch)` under `torch.inference_mode()`.
- pipeline: `pipeline.run.segment` end to end on an embedded Ray (already started): plan, actor start and model load,
  reads, decode, model, score filter, mask threshold + RLE, Parquet commits. One actor, `--threads` torch threads.
The last line is `pipeline_vs_bare=<pipeline images/s ÷ bare images/s>`.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def bare_loop(
    files: list[str], *, min_size: int, max_size: int, batch_size: int, threads: int, score: float
) -> float:
    import torch

    from model.build import load_model, resolve_spec
    from model.decode import decode_image

    torch.set_num_threads(threads)
    spec = resolve_spec("none", min_size=min_size, max_size=max_size)
    model = load_model(spec, box_score_thresh=score)
    images = [decode_image(open(f, "rb").read(), max_pixels=10**9) for f in files]
    tensors = [torch.from_numpy(i).permute(2, 0, 1).float().div(255) for i in images]
    with torch.inference_mode():
        model(tensors[:1])  # warm-up, as the pipeline's actor also runs one batch before it is at speed
        start = time.perf_counter()
        for k in range(0, len(tensors), batch_size):
            model(tensors[k : k + batch_size])
        elapsed = time.perf_counter() - start
    return len(files) / elapsed


class PeakRss:
    """Samples the resident memory of Ray's inference actor processes while the pipeline runs."""

    def __init__(self, name_part: str = "Segmenter"):
        self.name_part, self.peak, self._stop = name_part, 0, threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        import psutil

        while not self._stop.is_set():
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(p.info.get("cmdline") or [])
                if self.name_part in cmd and p.info.get("memory_info"):
                    self.peak = max(self.peak, p.info["memory_info"].rss)
            self._stop.wait(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--min-size", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--score-threshold", type=float, default=0.5)
    args = p.parse_args()

    import ray

    from pipeline.config import segment_config
    from pipeline.run import segment
    from pipeline.shapes import make_shapes

    work = tempfile.mkdtemp(prefix="bench-segment-")
    make_shapes(work, train=0, val=args.images, seed=7, size=(args.height, args.width))
    # make_shapes varies sizes down to 75%; rewrite at exactly the stated size so both sides see COCO-like inputs.
    from PIL import Image

    files = sorted(os.path.join(work, "val", f) for f in os.listdir(os.path.join(work, "val")))
    for f in files:
        Image.open(f).convert("RGB").resize((args.width, args.height)).save(f, quality=92)
    print(
        f"images: {len(files)} JPEG {args.width}x{args.height}; model maskrcnn_resnet50_fpn (random init), "
        f"min_size {args.min_size}, batch {args.batch_size}, {args.threads} torch threads, "
        f"score_threshold {args.score_threshold}; machine: {os.cpu_count()} CPUs"
    )

    run_bare = functools.partial(
        bare_loop,
        files,
        min_size=args.min_size,
        max_size=args.max_size,
        batch_size=args.batch_size,
        threads=args.threads,
        score=args.score_threshold,
    )
    bare = run_bare()
    print(f"bare model loop: {bare:.3f} images/s")

    os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    ray.init(num_cpus=args.threads, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = segment_config(
        {
            "input": {"url": os.path.join(work, "val"), "unit_size": 8},
            "output": {"url": os.path.join(work, "results")},
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
    with PeakRss() as rss:
        start = time.perf_counter()
        summary = segment(cfg, log=lambda _: None)
        elapsed = time.perf_counter() - start
    # The same bare loop again while the (idle) Ray processes still share the 2 cores: separates Ray's background
    # cost from the pipeline's own work.
    bare_ray_up = run_bare()
    ray.shutdown()
    print(f"bare model loop with an idle Ray running beside it: {bare_ray_up:.3f} images/s")
    assert summary.complete and summary.ok == len(files), summary.lines()
    pipe = len(files) / elapsed
    print(
        f"pipeline (Ray Data, 1 actor, end to end incl. actor start): {pipe:.3f} images/s; "
        f"{summary.detections} detections written"
    )
    print(f"actor peak RSS: {rss.peak / 2**20:.0f} MiB")
    print(f"pipeline_vs_bare={pipe / bare:.3f}")


if __name__ == "__main__":
    main()
