"""Soak: many small images through ONE inference actor, its memory sampled over time; then the cost of a crash.

    python bench/soak.py [--images 4000] [--crash-images 2000] [--threads 2] [--model narrow|r50]

1. Memory: `--images` generated JPEGs (64x64 to 128x96, each size drawn at random) go through
   `pipeline.run.segment` on an embedded Ray with one actor. The actor's RSS is sampled every `--sample-s` seconds
   with the number of inputs committed so far; reported: RSS at start (after the first committed unit, i.e. after
   the model's first batches), at the end, its peak, and the least-squares slope in MiB per 1000 images. A slope
   near zero means no leak per image (decoder, post-processing, Arrow buffers); a steady climb would call for
   recycling actors every N batches.
2. Crash: `jobs/segment_archive.py` as a user runs it (a subprocess with its own embedded Ray) over the first
   `--crash-images` images: a clean run, timed; a run killed (SIGKILL to its process group) once half of the units
   are committed; the same command again on that output, timed, checked to hold each input exactly once.
   Reported: re-run time / clean-run time (about 0.5 plus the start-up both pay: Ray, the actor, the model).

The model: `narrow` (default) is a randomly initialised ResNet-18 FPN with narrow heads (FPN 32 channels, box head
64), written as a checkpoint so that the segment job builds it as it would a trained one; `r50` is torchvision's
ResNet-50 FPN with random weights (`model.weights=none`), several times slower. Random weights give random
detections: `--score-threshold 0.05` with `--max-detections 10` keeps ~10 per image, so masks and RLE run.

The last line is `actor_rss_start_mib=<a> actor_rss_end_mib=<b> rerun_after_kill_vs_clean=<c>`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCRIPT = ROOT / "jobs" / "segment_archive.py"

from bench._common import ActorMemory, local_ray, save_jpegs  # noqa: E402


def make_images(folder: Path, n: int, seed: int) -> list[Path]:
    """`n` JPEGs of 64x64 to 128x96 pixels: a noisy background and a few filled shapes each."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)

    # Not `photo_like`: uniform noise, and ellipses or rectangles that may reach the far edges.
    def images():
        for _ in range(n):
            h, w = int(rng.integers(64, 97)), int(rng.integers(64, 129))
            base = rng.integers(0, 256, size=3)
            noise = rng.integers(-24, 25, size=(h, w, 3))
            img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(img)
            for _ in range(int(rng.integers(1, 4))):
                x0, y0 = int(rng.integers(0, w - 16)), int(rng.integers(0, h - 16))
                box = [x0, y0, x0 + int(rng.integers(12, w - x0 + 1)), y0 + int(rng.integers(12, h - y0 + 1))]
                fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
            yield img

    return [Path(p) for p in save_jpegs(folder, images())]


def narrow_checkpoint(path: Path, *, min_size: int, max_size: int) -> str:
    """A random-init ResNet-18 FPN with narrow heads, saved as `jobs/train.py` saves its checkpoints."""
    import torch

    from model.build import build_maskrcnn
    from model.checkpoint import save_checkpoint

    torch.manual_seed(0)
    names = ["__background__", "circle", "square", "triangle", "star"]
    model = build_maskrcnn(
        num_classes=len(names),
        weights="none",
        architecture="maskrcnn_resnet18_fpn",
        fpn_channels=32,
        box_head_size=64,
    )
    arch = {
        "name": "maskrcnn_resnet18_fpn",
        "num_classes": len(names),
        "min_size": min_size,
        "max_size": max_size,
        "fpn_channels": 32,
        "box_head_size": 64,
    }
    save_checkpoint(str(path), model_state=model.state_dict(), arch=arch, class_names=names)
    return str(path)


def committed(out: Path) -> int:
    d = out / "_committed"
    return sum(1 for _ in d.glob("*.json")) if d.is_dir() else 0


class ActorRss(ActorMemory):
    """Samples (seconds, RSS, USS, inputs committed) of the SegmentWorker actor (see `ActorMemory`)."""

    def __init__(self, out: Path, unit_size: int, every_s: float):
        super().__init__(every_s, uss=True, count=lambda: committed(out) * unit_size)

    def report(self, total: int) -> dict:
        """RSS/USS in MiB at start (the first sample after the first committed unit: model loaded, first batches
        done), at the end and at peak; least-squares slopes after the start, in MiB per minute and per 1000 images
        (inputs committed)."""
        self.check()
        steady = [s for s in self.samples if s[3] > 0] or self.samples
        out = {}
        for k, name in ((1, "rss"), (2, "uss")):
            ys = [s[k] / 2**20 for s in steady]
            out[name] = {
                "start": ys[0],
                "end": ys[-1],
                "peak": max(s[k] for s in self.samples) / 2**20,
                "per_min": _slope([s[0] for s in steady], ys) * 60,
                "per_1000": _slope([min(s[3], total) for s in steady], ys) * 1000,
            }
        return out


def _slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def soak(args, images_dir: Path, weights: str, work: Path) -> tuple[float, float]:
    from pipeline.segment.config import segment_config
    from pipeline.segment.run import segment

    out = work / "soak-results"
    cfg = segment_config(
        {
            "input": {"url": str(images_dir), "unit_size": args.unit_size},
            "output": {"url": str(out)},
            "model": model_keys(args, weights),
            "compute": {"max_actors": 1, "threads_per_actor": args.threads},
        }
    )
    with local_ray(args.threads), ActorRss(out, args.unit_size, args.sample_s) as rss:
        started = time.perf_counter()
        summary = segment(cfg, log=lambda line: print(f"  {line}", flush=True))
        elapsed = time.perf_counter() - started
    assert summary.complete and summary.ok == args.images, summary.lines()
    mem = rss.report(args.images)
    print(
        f"soak: {args.images} images through 1 actor in {elapsed:.0f} s ({args.images / elapsed:.1f} images/s), "
        f"{summary.detections} detections; {len(rss.samples)} memory samples"
    )
    for name, m in mem.items():
        print(
            f"actor {name.upper()}: start {m['start']:.0f} MiB, end {m['end']:.0f} MiB, peak {m['peak']:.0f} MiB; "
            f"slope {m['per_min']:+.2f} MiB/min, {m['per_1000']:+.2f} MiB per 1000 images"
        )
    for t, r, u, d in rss.samples[:: max(1, len(rss.samples) // 15)] + rss.samples[-1:]:
        print(f"  t={t:6.0f}s  inputs committed={d:6d}  rss={r / 2**20:7.1f} MiB  uss={u / 2**20:7.1f} MiB")
    uss = mem["uss"]
    leak = uss["end"] - uss["start"] > 32 and uss["per_1000"] > 8
    print(
        "verdict: "
        + (
            "the actor's own memory grows with images processed: recycle actors (a leak in decode or post-processing?)"
            if leak
            else "no growth of the actor's own memory per image worth recycling actors for"
        )
    )
    return mem["rss"]["start"], mem["rss"]["end"]


def model_keys(args, weights: str) -> dict:
    return {
        "weights": weights,
        "min_size": args.min_size,
        "max_size": args.max_size,
        "batch_size": args.batch_size,
        "score_threshold": args.score_threshold,
        "max_detections": args.max_detections,
    }


class CliRun:
    """`jobs/segment_archive.py` in a session of its own (a kill takes driver, GCS and raylet together)."""

    def __init__(self, args, images_dir: Path, out: Path, weights: str, log: Path):
        self.ray_tmp = tempfile.mkdtemp(
            prefix="soak-"
        )  # short: Ray's socket paths must stay under ~107 chars
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = self.ray_tmp
        keys = {f"model.{k}": v for k, v in model_keys(args, weights).items()}
        keys.update({"input.unit_size": args.unit_size, "compute.max_actors": 1, "progress_interval_s": 30})
        cmd = [sys.executable, str(SCRIPT), "--input", str(images_dir), "--output", str(out)]
        cmd += [a for k, v in keys.items() for a in ("--set", f"{k}={v}")]
        self.log = log
        self.started = time.perf_counter()
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
            )

    def wait(self) -> float:
        code = self.proc.wait()
        elapsed = time.perf_counter() - self.started
        self._reap()
        if code != 0:
            raise SystemExit(f"segment job failed ({code}):\n{self.log.read_text()[-3000:]}")
        return elapsed

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._reap()

    def _reap(self) -> None:
        """Ray workers sit in process groups of their own (same session) and die with their raylet; wait for that,
        and kill by pid what has not, so the next timed run has the machine to itself."""
        import psutil

        def left() -> list:
            found = []
            for p in psutil.process_iter():
                try:
                    if (
                        p.pid != self.proc.pid
                        and os.getsid(p.pid) == self.proc.pid
                        and p.status() != "zombie"
                    ):
                        found.append(p)
                except (ProcessLookupError, psutil.Error):
                    continue
            return found

        deadline = time.time() + 30
        while (procs := left()) and time.time() < deadline:
            time.sleep(0.5)
        for p in procs:
            p.kill()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def crash(args, images_dir: Path, weights: str, work: Path) -> float:
    import pyarrow.dataset as pads

    n = len(list(images_dir.glob("*.jpg")))
    units = -(-n // args.unit_size)
    clean = CliRun(args, images_dir, work / "crash-clean", weights, work / "clean.log").wait()
    print(f"crash test: clean run of {n} images ({units} units): {clean:.0f} s")

    out = work / "crash-killed"
    job = CliRun(args, images_dir, out, weights, work / "killed.log")
    while committed(out) < units // 2:
        if job.proc.poll() is not None:
            raise SystemExit(
                f"the job ended before half its units were committed:\n{job.log.read_text()[-3000:]}"
            )
        time.sleep(0.05)
    job.kill()
    done = committed(out)
    print(
        f"crash test: killed after {time.perf_counter() - job.started:.0f} s with {done}/{units} units committed"
    )

    rerun = CliRun(args, images_dir, out, weights, work / "rerun.log").wait()
    text = (work / "rerun.log").read_text()
    skipped = [line for line in text.splitlines() if "already done" in line]
    print(f"crash test: re-run {rerun:.0f} s; {skipped[-1].strip() if skipped else '(no skip line)'}")
    uris = pads.dataset(str(out / "images"), format="parquet").to_table(columns=["image_uri"]).column(0)
    assert len(uris) == n and len(set(uris.to_pylist())) == n, "each input exactly once after the re-run"
    assert (out / "_SUCCESS.json").exists()
    ratio = rerun / clean
    print(f"crash test: re-run after a kill at {done}/{units} units / clean run = {ratio:.2f}")
    return ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4000, help="images through the one actor (memory soak)")
    p.add_argument("--crash-images", type=int, default=2000, help="images of the crash test (0: skip it)")
    p.add_argument("--model", choices=("narrow", "r50"), default="narrow")
    p.add_argument("--min-size", type=int, default=64)
    p.add_argument("--max-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--unit-size", type=int, default=64)
    p.add_argument("--score-threshold", type=float, default=0.05)
    p.add_argument("--max-detections", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sample-s", type=float, default=1.0)
    p.add_argument("--keep", action="store_true", help="keep the work folder (images, results, logs)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    try:
        t = time.perf_counter()
        images = work / "images"
        make_images(images, args.images, seed=0)
        weights = (
            narrow_checkpoint(work / "narrow.pt", min_size=args.min_size, max_size=args.max_size)
            if args.model == "narrow"
            else "none"
        )
        print(
            f"{args.images} JPEGs 64x64..128x96 generated in {time.perf_counter() - t:.0f} s; model {args.model} "
            f"(random init), min_size {args.min_size}, batch {args.batch_size}, units of {args.unit_size}, "
            f"{args.threads} torch threads, 1 actor; machine: {os.cpu_count()} CPUs"
        )
        start, end = soak(args, images, weights, work)
        ratio = float("nan")
        if args.crash_images:
            subset = work / "crash-images"
            subset.mkdir()
            for f in sorted(images.glob("*.jpg"))[: args.crash_images]:
                os.link(f, subset / f.name)
            ratio = crash(args, subset, weights, work)
        if args.keep:
            print(f"work folder kept: {work}")
        print(
            f"actor_rss_start_mib={start:.0f} actor_rss_end_mib={end:.0f} rerun_after_kill_vs_clean={ratio:.2f}"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
