"""The training job's driver: validated config → Ray Train `TorchTrainer` → the best checkpoint's URL.

Requires a connected Ray (`ray.init` is the caller's business). Running again with the same `run.name` and
`run.storage_path` resumes from the latest checkpoint; `FailureConfig` restarts failed workers from it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import fsspec

from model.train_loop import CHECKPOINT_FILE, ERROR_FILE, NOT_EVALUATED, train_per_worker
from pipeline.config import redacted
from pipeline.errors import JobError, describe_storage_error
from pipeline.train.config import TrainConfig
from pipeline.train.events import EventPump, TrainDisplay


@dataclasses.dataclass
class TrainSummary:
    run_path: str
    epochs_done: int
    metrics: dict
    best_checkpoint_url: str | None
    best_metrics: dict

    def lines(self) -> list[str]:
        out = [f"run: {self.run_path}  epochs done: {self.epochs_done}"]
        m = self.best_metrics
        if m:
            out.append(
                f"best checkpoint: epoch {m.get('epoch')} bbox_AP={m.get('bbox_AP', math.nan):.3f} "
                f"segm_AP={m.get('segm_AP', math.nan):.3f}"
            )
        out.append(f"best checkpoint URL: {self.best_checkpoint_url}")
        return out


def _abs(url: str) -> str:
    # Workers do not share the driver's working directory: local paths travel absolute.
    return url if "://" in url or url in ("DEFAULT", "backbone", "none") else os.path.abspath(url)


def loop_config(cfg: TrainConfig) -> dict:
    """The plain dict each worker receives (model/ knows nothing of the config classes)."""
    d, m, t = cfg.data, cfg.model, cfg.train
    return {
        "train_annotations": _abs(d.train.annotations),
        "train_images": _abs(d.train.images),
        "val_annotations": _abs(d.val.annotations),
        "val_images": _abs(d.val.images),
        "data_storage_options": d.storage_options(d.train.annotations),
        "loader_workers": d.loader_workers,
        "flip_prob": d.flip_prob,
        "weights": _abs(m.weights),
        "architecture": m.architecture,
        "weights_storage_options": d.storage_options(m.weights),
        "min_size": list(m.min_size),
        "max_size": m.max_size,
        "eval_min_size": cfg.eval_min_size,
        "trainable_backbone_layers": m.trainable_backbone_layers,
        "rois_per_image": m.rois_per_image,
        "positive_fraction": m.positive_fraction,
        "fpn_channels": m.fpn_channels,
        "box_head_size": m.box_head_size,
        "rpn_proposals_train": m.rpn_proposals_train,
        "rpn_proposals_test": m.rpn_proposals_test,
        "anchor_sizes": list(m.anchor_sizes),
        "epochs": t.epochs,
        "batch_size": t.batch_size,
        "lr": cfg.lr,
        "optimizer": t.optimizer,
        "momentum": t.momentum,
        "weight_decay": t.weight_decay,
        "warmup_iters": t.warmup_iters,
        "warmup_factor": t.warmup_factor,
        "lr_schedule": t.lr_schedule,
        "lr_steps": list(t.lr_steps),
        "lr_gamma": t.lr_gamma,
        "amp": cfg.scaling.use_gpu if t.amp is None else t.amp,
        "log_interval": t.log_interval,
        "eval_every": t.eval_every,
        "seed": t.seed,
        "threads": t.threads_per_worker or max(1, int(cfg.scaling.cpus_per_worker)),
        "run_config": redacted(cfg),
        "run_path": f"{_abs(cfg.run.storage_path.rstrip('/'))}/{cfg.run.name}",
        "run_storage_options": cfg.run.storage.options_for(cfg.run.storage_path),
    }


def _storage(cfg: TrainConfig):
    """(storage_path, pyarrow filesystem or None, URL prefix) for Ray Train's RunConfig."""
    path = cfg.run.storage_path.rstrip("/")
    if not path.startswith(("s3://", "s3a://")):
        return _abs(path), None, ""  # Ray Train wants an absolute path or a URI
    import pyarrow.fs
    import s3fs

    fs = s3fs.S3FileSystem(**cfg.run.storage.options_for(path))
    # Through fsspec, so endpoint and credentials follow the same rules as every other URL of the job.
    return path.split("://", 1)[1], pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), "s3://"


def _check_inputs(cfg: TrainConfig) -> None:
    for key in ("train", "val"):
        url = getattr(cfg.data, key).annotations
        try:
            fs, path = fsspec.core.url_to_fs(url, **cfg.data.storage_options(url))
            if not fs.exists(path):
                raise FileNotFoundError(url)
        except Exception as e:
            raise JobError(f"data.{key}.annotations: {describe_storage_error(url, e)}") from None


def run_training(
    cfg: TrainConfig, *, log: Callable[[str], None] = print, live: bool = False, tables: bool = True
) -> TrainSummary:
    """Train (or resume) the run `cfg` describes; rank 0's lines are shown through `log` (as progress bars when
    `live`; `tables`: with pycocotools' AP tables)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    _check_inputs(cfg)
    pump = EventPump(TrainDisplay(log=log, live=live, tables=tables))
    loop = {**loop_config(cfg), "events": pump.queue}
    storage_path, storage_fs, prefix = _storage(cfg)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cfg.scaling.use_gpu else "gloo")
    trainer = TorchTrainer(
        train_per_worker,
        train_loop_config=loop,
        torch_config=TorchConfig(backend=backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.num_to_keep,
                checkpoint_score_attribute="segm_AP",
                checkpoint_score_order="max",
            ),
        ),
    )
    error_url = f"{_abs(cfg.run.storage_path.rstrip('/'))}/{cfg.run.name}/{ERROR_FILE}"
    error_fs, error_path = fsspec.core.url_to_fs(error_url, **cfg.run.storage.options_for(error_url))
    if error_fs.exists(error_path):
        error_fs.rm(error_path)  # a previous attempt's stop; this attempt starts clean
    try:
        with pump:
            result = trainer.fit()
    except Exception as e:
        raise JobError(f"training failed: {type(e).__name__}: {' '.join(str(e).split())[:400]}") from None
    error_fs.invalidate_cache()
    if error_fs.exists(error_path):
        raise JobError(error_fs.cat_file(error_path).decode("utf-8", "replace"))
    metrics = dict(result.metrics or {})
    best_url, best_metrics = None, {}
    scored = [
        (c, m)
        for c, m in (result.best_checkpoints or [])
        if isinstance(m.get("segm_AP"), (int, float)) and m["segm_AP"] != NOT_EVALUATED
    ]
    if scored:
        best, best_metrics = max(scored, key=lambda cm: cm[1]["segm_AP"])
        best_url = f"{prefix}{best.path}/{CHECKPOINT_FILE}"
    elif result.checkpoint is not None:
        best_url = f"{prefix}{result.checkpoint.path}/{CHECKPOINT_FILE}"
    return TrainSummary(
        run_path=f"{prefix}{storage_path}/{cfg.run.name}",
        epochs_done=int(metrics.get("epoch", -1)) + 1,
        metrics=metrics,
        best_checkpoint_url=best_url,
        best_metrics=dict(best_metrics),
    )
