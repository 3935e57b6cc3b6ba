"""What the benchmarks share: photo-like JPEGs, the plain per-image model loop a user writes (no Ray), an embedded Ray
for one measurement, and memory samples of the inference actor's process.

A script puts the repository on `sys.path`, then imports from here (`python bench/<name>.py` runs it with `bench/`
as its directory). Heavy imports (numpy, PIL, torch, Ray, psutil) stay inside the functions: `--help` stays fast,
and `bench/gpu.py` still needs nothing beyond torch and torchvision.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The inference actor's class (pipeline/segment/worker.py), as its process's command line names it. Ray titles an
# actor's process `ray::<class>` (`ray::<class>.<method>` while a task runs); Ray Data's actor pool runs the class
# given to `map_batches` inside a class of its own named `MapWorker(<operator>)`, so `ps` shows
# `ray::MapWorker(MapBatches(SegmentWorker))` and `ray::MapWorker(MapBatches(SegmentWorker)).submit`.
ACTOR = "SegmentWorker"


# --- images ----------------------------------------------------------------------------------------------------------


def photo_like(
    rng,
    height: int,
    width: int,
    *,
    base: tuple[int, int] = (0, 256),
    noise: float = 25.0,
    shapes: tuple[int, int] = (1, 5),
    margin: int = 20,
    extent: tuple[int, int] = (10, 60),
):
    """An RGB PIL image, `height`×`width`, that compresses and segments like a photo holding objects: a flat colour
    (each channel drawn from `[base)`) with Gaussian noise of std `noise`, and `[shapes)` filled ellipses, each with
    its corner at least `margin` px from the right and bottom edges and sides drawn from `[extent)`. Every draw comes
    from `rng` (a numpy Generator) in a fixed order, so one seed gives the same images."""
    import numpy as np
    from PIL import Image, ImageDraw

    arr = np.clip(rng.integers(*base, 3) + rng.normal(0, noise, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(arr)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(*shapes))):
        x0, y0 = int(rng.integers(0, width - margin)), int(rng.integers(0, height - margin))
        box = (x0, y0, x0 + int(rng.integers(*extent)), y0 + int(rng.integers(*extent)))
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def encode_jpeg(image, quality: int = 90) -> bytes:
    """A PIL image as JPEG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def save_jpegs(folder: str | os.PathLike, images: Iterable) -> list[str]:
    """Write `images` (PIL) as `folder/img-000000.jpg`, `img-000001.jpg`, ... (JPEG quality 90; the folder is
    created); returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = os.path.join(folder, f"img-{i:06d}.jpg")
        with open(path, "wb") as f:
            f.write(encode_jpeg(image))
        paths.append(path)
    return paths


# --- the model without Ray ---------------------------------------------------------------------------------------------


def random_model(
    *,
    score: float,
    threads: int,
    min_size: int | None = None,
    max_size: int | None = None,
    detections: int = 100,
):
    """torchvision's Mask R-CNN R50-FPN with random weights (`model.weights: none`), built as the job builds it, in
    eval mode on the CPU, keeping boxes scored >= `score` (at most `detections`); torch set to `threads` threads.
    `min_size`/`max_size` None: torchvision's 800/1333."""
    import torch

    from model.build import load_model, resolve_spec

    torch.set_num_threads(threads)
    spec = resolve_spec("none", min_size=min_size, max_size=max_size)
    return load_model(spec, box_score_thresh=score, box_detections_per_img=detections)


def sync(device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so a clock read after it times the work itself."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def mask_rles(output: dict) -> list[str]:
    """COCO RLE strings of a torchvision output's masks (`masks [N, 1, H, W]`, soft, full image) thresholded at 0.5,
    as a user's script stores them: pycocotools where installed, else `model.rle` (a GPU machine may lack it)."""
    import numpy as np

    masks = (output["masks"][:, 0] >= 0.5).cpu().numpy().astype(np.uint8)
    try:
        from pycocotools import mask as mask_utils

        return [r["counts"].decode() for r in mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))]
    except ImportError:
        from model.rle import encode_counts, runs_from_changes

        flat = masks.transpose(0, 2, 1).reshape(len(masks), -1).astype(np.int8)
        framed = np.concatenate([np.zeros((len(masks), 1), np.int8), flat], axis=1)
        rows, cols = np.nonzero(framed[:, 1:] != framed[:, :-1])
        lengths = np.bincount(rows, minlength=len(masks))
        return encode_counts(runs_from_changes(cols, lengths, flat.shape[1]), lengths + 1)


def per_image_loop(
    model,
    sources: list,
    *,
    finish: Callable[[object, dict], object] | None = None,
    device="cpu",
    warm_finish: bool = False,
) -> float:
    """images/s of the loop a user writes around the model, without Ray: for each source (a path, or encoded bytes),
    PIL open → RGB → `to_tensor` → `device` → `model([image])[0]` under `torch.inference_mode()` → `finish(source,
    output)` (RLE the masks, write files, ...). Timed from the first source to the last `finish`, after one untimed
    warm-up forward of the first source (its `finish` too where `warm_finish`); `model` is built and on `device`."""
    import torch
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    def forward(source) -> dict:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source).convert("RGB")
        tensor = to_tensor(image).to(device)
        with torch.inference_mode():
            return model([tensor])[0]

    warm = forward(sources[0])
    if warm_finish and finish is not None:
        finish(sources[0], warm)
    sync(device)
    start = time.perf_counter()
    for source in sources:
        output = forward(source)
        if finish is not None:
            finish(source, output)
    return len(sources) / (time.perf_counter() - start)


def train_step(model, optimizer, images, targets, *, autocast=None) -> None:
    """One step of the plain training loop (no Ray): the summed losses of `model(images, targets)` (under `autocast`
    where given), gradients zeroed (set to None), backward, optimizer step."""
    with autocast if autocast is not None else contextlib.nullcontext():
        loss = sum(model(images, targets).values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


# --- Ray ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    """An embedded Ray for one measurement, shut down on exit: `num_cpus` CPUs, no dashboard, Ray's own log at ERROR,
    Ray Data's at WARNING and no progress bars (the job's own lines only); its workers import this repository
    (PYTHONPATH, left set for the processes started after it)."""
    import logging

    import ray
    import ray.data

    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


# --- memory of the inference actor -------------------------------------------------------------------------------------


def actor_processes(name: str = ACTOR) -> list:
    """The processes among this process's descendants (an embedded Ray's workers: another job's actors on the
    machine are never counted) whose command line names `name` (see `ACTOR`), as `psutil.Process`es."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if name in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:  # ended since the listing
            continue
    return found


class ActorMemory:
    """Samples the memory of the inference actor's process every `every_s` seconds on a thread while in `with`.

    `samples`: `(seconds since entry, RSS bytes, USS bytes, count())`, one per sampling that found an actor process
    (with several, the largest by RSS). RSS counts the pages of Ray's shared-memory object store the actor has
    touched (its outputs go there); USS, the memory only the actor holds, is where a leak would show, and is dearer
    to read: taken where `uss`, else 0.
    """

    def __init__(self, every_s: float, *, uss: bool = False, count: Callable[[], int] = lambda: 0):
        self.every_s, self.uss, self.count = every_s, uss, count
        self.samples: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()

    def __enter__(self) -> ActorMemory:
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            mem = None
            for p in actor_processes():
                try:
                    m = p.memory_full_info() if self.uss else p.memory_info()
                except psutil.Error:
                    continue
                if mem is None or m.rss > mem.rss:
                    mem = m
            if mem is not None:
                uss = mem.uss if self.uss else 0
                self.samples.append((time.perf_counter() - self._t0, mem.rss, uss, self.count()))
            self._stop.wait(self.every_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def check(self) -> None:
        """Fail with one line if no actor process was ever found (a renamed actor class would read as 0 bytes)."""
        if not self.samples:
            raise SystemExit(f"no {ACTOR} actor process was found to sample")

    @property
    def peak_rss(self) -> int:
        """The largest RSS sampled, in bytes."""
        self.check()
        return max(s[1] for s in self.samples)
