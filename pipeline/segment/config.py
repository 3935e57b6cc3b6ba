"""Typed, validated configuration of the segment job; every key is documented in `configs/segment_archive.yaml`.

Built from a plain dict (`pipeline.config.from_dict`): unknown keys and bad values fail before any work starts,
naming the dotted key and what is allowed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from model.architectures import ARCHITECTURE_NAMES, WITH_COCO_WEIGHTS
from pipeline.config import ConfigError, StorageConfig, check_ranges, from_dict
from pipeline.segment.settings import ERROR_POLICIES, FP16_ON_CPU, PRECISIONS


@dataclasses.dataclass(frozen=True)
class InputConfig:
    url: str | None = None
    max_pixels: int = 100_000_000
    # Loose files per work unit: the unit of retry, of resume and of storage (one images/ and one detections/ file
    # each). None ("auto"): decided when the output is planned, from the cluster (`plan.auto_unit_size`: 2,048 with
    # GPUs, 64 on CPU only) and stored in the plan, which every later run on the output keeps.
    unit_size: int | None = None
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)

    def storage_options(self) -> dict[str, Any]:
        return self.storage.options_for(self.url or "")


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    url: str | None = None
    # resume: continue the stored plan; append: add the inputs the input holds now that the output lacks
    # (`pipeline.segment.append`); overwrite: start again.
    mode: Literal["resume", "overwrite", "append"] = "resume"
    # Seconds a run's lease on the output lasts without renewal (renewed every third of it): how long a second run
    # waits before it may take over the output of a run that died without releasing it (S3 outputs; local outputs
    # use a lock the operating system drops with the process).
    lease_s: float = 60.0
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)

    def storage_options(self) -> dict[str, Any]:
        return self.storage.options_for(self.url or "")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    weights: str = "DEFAULT"
    # None ("auto"): the checkpoint's own, else maskrcnn_resnet50_fpn (model.architectures' table).
    architecture: Literal[ARCHITECTURE_NAMES] | None = None
    min_size: int | None = None  # None ("auto"): the checkpoint's own, else torchvision's 800
    max_size: int | None = None  # None ("auto"): the checkpoint's own, else torchvision's 1333
    score_threshold: float = 0.5
    max_detections: int = 100
    batch_size: int | None = None  # None ("auto"): 1 on CPU actors, 4 on GPUs (measured: BENCHMARKS.md)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: fp16 autocast on GPUs, fp32 on CPUs. fp16 on a CPU is refused (no fp16 arithmetic there to gain from);
    # bf16: bfloat16 autocast, on GPUs or CPUs with AVX-512/AMX (1.34x fp32 on a 2-core EPYC, BENCHMARKS.md).
    precision: Literal[PRECISIONS] = "auto"
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)

    def storage_options(self) -> dict[str, Any]:
        return self.storage.options_for(self.weights)


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
    min_actors: int | None = None
    max_actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    threads_per_actor: int | None = None
    # Threads per actor that read and decode the next images while the model runs (I/O-bound reads from object
    # storage need many in flight; decoding releases the GIL). None ("auto"): settings.IO_THREADS.
    io_threads: int | None = None
    # MiB of decoded images an actor may hold at once (read ahead, batched, being post-processed). None ("auto"): an
    # eighth of the node's memory per actor, between 256 MiB and 2 GiB (settings.image_memory_for).
    image_memory_mb: int | None = None
    read_cpus: float = 0.25


@dataclasses.dataclass(frozen=True)
class SegmentConfig:
    input: InputConfig = dataclasses.field(default_factory=InputConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)
    on_image_error: Literal[ERROR_POLICIES] = "record"
    progress_interval_s: float = 10.0


# Value ranges that a type alone cannot express.
_RANGES: dict[str, tuple[float, float]] = {
    "input.max_pixels": (1, float("inf")),
    "input.unit_size": (1, 1_000_000),
    "model.min_size": (32, 10_000),
    "model.max_size": (32, 20_000),
    "model.score_threshold": (0.0, 1.0),
    "model.max_detections": (1, 10_000),
    "model.batch_size": (1, 1024),
    "compute.min_actors": (1, 100_000),
    "compute.max_actors": (1, 100_000),
    "compute.gpus_per_actor": (0.0, 64.0),  # above 1: refused below, with why
    "compute.cpus_per_actor": (0.0, 1024.0),
    "compute.threads_per_actor": (1, 1024),
    "compute.io_threads": (1, 256),
    "compute.image_memory_mb": (64, 1_048_576),
    "compute.read_cpus": (0.01, 64.0),
    "output.lease_s": (3.0, 86_400.0),
    "progress_interval_s": (0.1, 86_400.0),
}


def segment_config(data: dict | None) -> SegmentConfig:
    """Validate a full segment-job config dict (defaults filled in) and the rules that span keys."""
    cfg: SegmentConfig = from_dict(SegmentConfig, data)
    check_ranges(cfg, _RANGES)
    if not cfg.input.url:
        raise ConfigError("input.url: required (give --input URL or set input.url)")
    if not cfg.output.url:
        raise ConfigError("output.url: required (give --output URL or set output.url)")
    m, c = cfg.model, cfg.compute
    if m.min_size and m.max_size and m.max_size < m.min_size:
        raise ConfigError(f"model.max_size: must be >= model.min_size ({m.min_size}), got {m.max_size}")
    if c.min_actors and c.max_actors and c.max_actors < c.min_actors:
        raise ConfigError(
            f"compute.max_actors: must be >= compute.min_actors ({c.min_actors}), got {c.max_actors}"
        )
    if m.weights == "DEFAULT" and m.architecture and m.architecture not in WITH_COCO_WEIGHTS:
        raise ConfigError(
            f"model.architecture: model.weights DEFAULT (torchvision's COCO weights) exists for "
            f"{' and '.join(WITH_COCO_WEIGHTS)}, not {m.architecture}"
        )
    if m.precision == "fp16" and m.device == "cpu":
        raise ConfigError(FP16_ON_CPU)
    if c.gpus_per_actor is not None and c.gpus_per_actor > 1:
        raise ConfigError(
            f"compute.gpus_per_actor: an actor runs its model on one GPU, so more than 1 would reserve GPUs it never "
            f"uses; allowed: auto, 0 (CPU), or up to 1 (a fraction shares a GPU, each actor capped at that share of "
            f"its memory), got {c.gpus_per_actor:g}"
        )
    if m.device == "cuda" and c.gpus_per_actor == 0:
        raise ConfigError("compute.gpus_per_actor: must be > 0 (or auto) when model.device is 'cuda'")
    return cfg
