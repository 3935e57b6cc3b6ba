"""Settings: what an inference actor needs (`WorkerSettings`, one frozen object), and each rule about them declared
once: precisions, per-image error policies, batch sizes and read threads by device.

The job's config (`pipeline.segment.config`) validates against these names; `pipeline.segment.run` resolves the
config and the cluster into one `WorkerSettings` per run; `pipeline.segment.worker.SegmentWorker` takes it whole.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch stays out of the config's imports
    from model.build import ModelSpec

# auto: fp16 autocast on GPUs, fp32 on CPUs. bf16 is asked for, never automatic (its detections drift further from
# fp32's than fp16's do: scores by 0.009 on average, masks at IoU 0.91; bench/gpu.py, BENCHMARKS.md).
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
FP16_ON_CPU = (
    "model.precision: fp16 runs on GPUs only (a CPU has no fp16 arithmetic to gain from: 10x slower than fp32 "
    "there); use fp32, bf16 or auto"
)

# Per-image failures (a bad image, an image the model rejects):
# - "record": the image becomes an `images` row with status="error" and the reason; the unit goes on;
# - "raise": the first bad image fails the job (for debugging a pipeline on known-good data).
ERROR_POLICIES = ("record", "raise")

# Images per forward pass when `model.batch_size` is auto. On CPU one image at a time is fastest: batching 640x480
# images at 800 px ran at 0.31 images/s against 0.50 one by one (bench/segment.py, 2 cores; larger activations,
# no parallelism left to gain). GPUs gain from batching.
CPU_BATCH_SIZE = 1
GPU_BATCH_SIZE = 4
# Threads per actor that fetch and decode the next images (compute.io_threads auto): object-store reads take tens
# of milliseconds each and need many in flight.
IO_THREADS = 16

# Decoded-image bytes an actor may hold (compute.image_memory_mb auto: `image_memory_for`): an eighth of its share
# of the node's memory, within these bounds. 2 GiB holds ~55 decoded 12-MP photos or ~2,300 640x480 images: far
# more than a GPU needs queued (a few batches), while a node of 8 GPU actors keeps 16 GiB for pixels at most.
IMAGE_MEMORY_MIN = 256 << 20
IMAGE_MEMORY_MAX = 2 << 30


def image_memory_for(configured_mb: int | None, memory_per_actor: float | None) -> int:
    """The byte budget for an actor's decoded images: `configured_mb` MiB, else an eighth of `memory_per_actor`
    (bytes; None: unknown) within [`IMAGE_MEMORY_MIN`, `IMAGE_MEMORY_MAX`]."""
    if configured_mb:
        return int(configured_mb) << 20
    if not memory_per_actor:
        return IMAGE_MEMORY_MAX
    return int(min(IMAGE_MEMORY_MAX, max(IMAGE_MEMORY_MIN, memory_per_actor / 8)))


class PrecisionError(ValueError):
    pass


def resolve_precision(precision: str, device: str) -> str:
    """`auto` → fp16 on CUDA, fp32 on CPU; fp16 on a CPU is refused (measured 10x slower than fp32 under CPU
    autocast, `bench/gpu.py --device cpu`); bf16 runs on both (on CPUs with oneDNN's bfloat16 kernels, AVX-512 or
    AMX: 1.34x fp32's images/s on this project's 2-core EPYC)."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "fp16" if device == "cuda" else "fp32"
    if precision == "fp16" and device != "cuda":
        raise PrecisionError(FP16_ON_CPU)
    return precision


def batch_size_for(configured: int | None, device: str) -> int:
    return configured or (GPU_BATCH_SIZE if device == "cuda" else CPU_BATCH_SIZE)


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    """Everything an inference actor is constructed with (picklable: Ray sends it to every actor)."""

    spec: ModelSpec
    output_url: str
    score_threshold: float
    run_id: str = ""
    max_detections: int = 100
    device: str = "cpu"  # "cpu" | "cuda"
    threads: int | None = None  # torch threads; None: torch's default
    io_threads: int = IO_THREADS
    max_pixels: int = 100_000_000
    batch_size: int = CPU_BATCH_SIZE
    image_memory_bytes: int = IMAGE_MEMORY_MAX  # see pipeline.segment.memory
    precision: str = "auto"
    mask_route: str = "auto"  # "auto" | "batched" | "in_box" (see pipeline.segment.infer)
    # None: the post-processing thread runs on GPUs only; tests set it to run the GPU layout on a CPU.
    overlap: bool | None = None
    on_image_error: str = "record"
    # A handle of the driver's `pipeline.segment.live.ProgressBoard` actor (None: no live counts, e.g. without Ray).
    progress_board: object = None
    # Actors sharing a GPU (compute.gpus_per_actor below 1): the share of its memory each may use.
    gpu_memory_fraction: float | None = None
    output_options: dict = dataclasses.field(default_factory=dict)
    input_options: dict = dataclasses.field(default_factory=dict)
    weights_options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.on_image_error not in ERROR_POLICIES:
            raise ValueError(f"on_image_error must be one of {ERROR_POLICIES}, got {self.on_image_error!r}")
        resolve_precision(self.precision, self.device)
