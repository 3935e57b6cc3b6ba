"""Typed, validated configuration of the training job (`jobs/train.py`); every key is in `configs/train.yaml`.

Same rules as the segment job's config: built from a plain dict, unknown keys and bad values fail before any work,
naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from model.architectures import ARCHITECTURE_NAMES, DEFAULT_ARCHITECTURE, WITH_COCO_WEIGHTS, for_backbone
from pipeline.config import ConfigError, StorageConfig, check_ranges, from_dict


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    annotations: str | None = None  # COCO instances JSON (fsspec URL)
    images: str | None = None  # folder/prefix the JSON's file_names are relative to


@dataclasses.dataclass(frozen=True)
class DataConfig:
    train: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    val: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)
    loader_workers: int = 2
    flip_prob: float = 0.5

    def storage_options(self, url: str) -> dict:
        return self.storage.options_for(url)


@dataclasses.dataclass(frozen=True)
class TrainModelConfig:
    weights: str = "backbone"  # DEFAULT | backbone | none | checkpoint URL
    architecture: Literal[ARCHITECTURE_NAMES] = DEFAULT_ARCHITECTURE  # model.architectures' table
    min_size: tuple[int, ...] = (800,)  # several values: multi-scale training (one drawn per image)
    max_size: int = 1333
    eval_min_size: int | None = (
        None  # auto: the largest min_size; also what the checkpoint tells the segment job
    )
    trainable_backbone_layers: int | None = (
        None  # auto: torchvision's 3 with pretrained weights, all from scratch
    )
    rois_per_image: int = 512
    positive_fraction: float = 0.25
    fpn_channels: int = 256  # FPN, RPN, mask-head (and v2's box-head conv) width (torchvision's 256)
    box_head_size: int = 1024  # box head fully connected width (torchvision's 1024)
    rpn_proposals_train: int = 2000  # RPN proposals per image while training (torchvision's 2000)
    rpn_proposals_test: int = 1000  # ... at evaluation; recorded in checkpoints for the segment job (1000)
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)  # RPN anchor per FPN level P2..P6 (torchvision's)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    epochs: int = 26
    batch_size: int = 2  # images per worker
    lr: float | None = (
        None  # auto: 0.02 x total batch / 16 (the linear scaling rule); adamw: 1e-4 x total batch / 16
    )
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0001
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    lr_schedule: Literal["step", "cosine"] = (
        "step"  # step: x lr_gamma at lr_steps; cosine: down to 0 at the end
    )
    lr_steps: tuple[float, ...] = (0.667, 0.889)  # fractions of the total iterations where lr x= lr_gamma
    lr_gamma: float = 0.1
    amp: bool | None = None  # auto: on with GPUs (fp16); true on a CPU: bfloat16 where oneDNN has it
    log_interval: int = 20
    eval_every: int = 1  # epochs; the last epoch is always evaluated
    seed: int = 0
    threads_per_worker: int | None = None  # torch threads on CPU workers; auto: cpus_per_worker


@dataclasses.dataclass(frozen=True)
class ScalingCfg:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


@dataclasses.dataclass(frozen=True)
class RunCfg:
    name: str | None = None
    storage_path: str | None = None  # local path or s3://bucket/prefix
    max_failures: int = 3
    num_to_keep: int = 2
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: TrainModelConfig = dataclasses.field(default_factory=TrainModelConfig)
    train: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    scaling: ScalingCfg = dataclasses.field(default_factory=ScalingCfg)
    run: RunCfg = dataclasses.field(default_factory=RunCfg)
    backend: Literal["auto", "gloo", "nccl"] = "auto"

    @property
    def total_batch(self) -> int:
        return self.train.batch_size * self.scaling.num_workers

    @property
    def lr(self) -> float:
        if self.train.lr is not None:
            return self.train.lr
        base = 0.02 if self.train.optimizer == "sgd" else 1e-4
        return base * self.total_batch / 16

    @property
    def eval_min_size(self) -> int:
        return self.model.eval_min_size or max(self.model.min_size)


_RANGES = {
    "train.epochs": (1, 100_000),
    "model.fpn_channels": (8, 4096),
    "model.box_head_size": (8, 65_536),
    "model.rpn_proposals_train": (1, 100_000),
    "model.rpn_proposals_test": (1, 100_000),
    "model.rois_per_image": (1, 100_000),
    "train.batch_size": (1, 1024),
    "train.lr": (0.0, 10.0),
    "train.warmup_factor": (0.0, 1.0),
    "scaling.num_workers": (1, 100_000),
    "run.max_failures": (-1, 1_000),
    "run.num_to_keep": (1, 1_000),
}


def train_config(data: dict | None) -> TrainConfig:
    cfg: TrainConfig = from_dict(TrainConfig, _renamed_keys(data))
    for split in ("train", "val"):
        s = getattr(cfg.data, split)
        for key in ("annotations", "images"):
            if not getattr(s, key):
                raise ConfigError(f"data.{split}.{key}: required (a COCO JSON URL / the images folder URL)")
    if not cfg.run.name:
        raise ConfigError("run.name: required (runs with the same name resume each other)")
    if not cfg.run.storage_path:
        raise ConfigError("run.storage_path: required (local path or s3://bucket/prefix for checkpoints)")
    check_ranges(cfg, _RANGES)
    if any(not 0.0 < f < 1.0 for f in cfg.train.lr_steps):
        raise ConfigError(
            f"train.lr_steps: fractions of the schedule in (0, 1), got {list(cfg.train.lr_steps)}"
        )
    m = cfg.model
    if m.weights == "DEFAULT" and (
        m.architecture not in WITH_COCO_WEIGHTS or (m.fpn_channels, m.box_head_size) != (256, 1024)
    ):
        raise ConfigError(
            f"model.weights: DEFAULT (COCO weights) exists only for model.architecture {' or '.join(WITH_COCO_WEIGHTS)} "
            "with fpn_channels 256 and box_head_size 1024; use 'backbone' or 'none' for other architectures"
        )
    if len(m.anchor_sizes) != 5 or min(m.anchor_sizes) < 1:
        raise ConfigError(
            f"model.anchor_sizes: five positive sizes in pixels, one per FPN level P2..P6, got {list(m.anchor_sizes)}"
        )
    if max(cfg.model.min_size) > cfg.model.max_size:
        raise ConfigError(f"model.max_size: must be >= every model.min_size, got {cfg.model.max_size}")
    return cfg


def _renamed_keys(data: dict | None) -> dict | None:
    """`model.backbone` (before `model.architecture`), mapped: `resnet18` means `maskrcnn_resnet18_fpn`."""
    model = (data or {}).get("model")
    if not isinstance(model, dict) or "backbone" not in model:
        return data
    model = dict(model)
    backbone = model.pop("backbone")
    try:
        name = for_backbone(str(backbone))
    except ValueError:
        raise ConfigError(
            f"model.backbone: replaced by model.architecture, one of {', '.join(ARCHITECTURE_NAMES)}; "
            f"got backbone {backbone!r}"
        ) from None
    if model.setdefault("architecture", name) != name:
        raise ConfigError(
            f"model.backbone: replaced by model.architecture; set model.architecture: {name} instead "
            f"(this config also sets model.architecture: {model['architecture']})"
        )
    return {**data, "model": model}
