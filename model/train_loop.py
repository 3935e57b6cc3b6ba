"""The per-worker training loop: plain torch, plus the few Ray Train calls marked `# [Ray Train]`.

Launched by `pipeline.train.run_training` as `TorchTrainer(train_per_worker, train_loop_config=...)`; each worker
reads its own shard (`DistributedSampler` + aspect-ratio grouping), trains with the paper's recipe (SGD momentum
0.9, weight decay 1e-4, lr 0.02 x total batch / 16, linear warm-up, x0.1 steps), evaluates COCO box/mask AP on the
val split with predictions gathered from all workers, and reports a checkpoint from rank 0 every epoch.

`config` keys (a plain dict built by `pipeline.train`): train/val annotation and image URLs, storage options, model
architecture, weights and sizes, optimiser settings, `run_config` (the redacted config, stored in checkpoints).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import time

import fsspec
import torch
import torch.distributed as dist

from model import checkpoint as ckpt
from model.architectures import DEFAULT_ARCHITECTURE
from model.build import (
    ANCHOR_SIZES,
    BOX_HEAD_SIZE,
    FPN_CHANNELS,
    RPN_PROPOSALS_TEST,
    RPN_PROPOSALS_TRAIN,
    build_maskrcnn,
    replace_heads,
)
from model.coco_eval import evaluate, predictions_to_coco, summary_line
from model.data import CocoInstances, GroupedBatchSampler, aspect_ratio_group_ids, collate
from model.precision import autocast, cpu_has_bf16

CHECKPOINT_FILE = "model.pt"
ERROR_FILE = "_error.txt"  # written by rank 0 when training stops on a non-finite loss
NOT_EVALUATED = -1.0  # bbox_AP / segm_AP of an epoch that was not evaluated (train.eval_every)


def make_optimizer(
    params, *, kind: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The paper's SGD with momentum, or AdamW (`momentum` is its beta1): from scratch and over a few epochs, as in
    the offline demo, AdamW's per-parameter steps learn much faster than one global SGD step size."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {kind!r}")


def lr_factor(
    step: int,
    *,
    warmup_iters: int,
    warmup_factor: float,
    milestones: list[int],
    gamma: float,
    cosine_total: int | None = None,
) -> float:
    """Multiplier of the base lr at optimizer step `step`: linear warm-up, then x`gamma` at each milestone, or, with
    `cosine_total` (all steps), a half cosine from 1 down to 0 at the last step (milestones ignored)."""
    if cosine_total:
        factor = 0.5 * (1 + math.cos(math.pi * min(step, cosine_total) / cosine_total))
    else:
        factor = gamma ** sum(step >= m for m in milestones)
    if step < warmup_iters:
        alpha = step / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def build_for_training(config: dict, num_classes: int) -> torch.nn.Module:
    """The model `config` describes, for `num_classes` (background included): COCO weights with new heads
    (`DEFAULT`), the ImageNet backbone (`backbone`), from scratch (`none`), or a checkpoint of the same
    architecture and classes to continue from."""
    weights = config["weights"]
    common = dict(
        architecture=config["architecture"],
        min_size=tuple(config["min_size"]),
        max_size=config["max_size"],
        trainable_backbone_layers=config["trainable_backbone_layers"],
        box_batch_size_per_image=config["rois_per_image"],
        box_positive_fraction=config["positive_fraction"],
        fpn_channels=config.get("fpn_channels", FPN_CHANNELS),
        box_head_size=config.get("box_head_size", BOX_HEAD_SIZE),
        rpn_proposals_train=config.get("rpn_proposals_train", RPN_PROPOSALS_TRAIN),
        rpn_proposals_test=config.get("rpn_proposals_test", RPN_PROPOSALS_TEST),
        anchor_sizes=tuple(config.get("anchor_sizes", ANCHOR_SIZES)),
    )
    if weights == "DEFAULT":  # COCO weights, new heads for this dataset's classes
        return replace_heads(
            build_maskrcnn(num_classes=91, weights="DEFAULT", **common), num_classes=num_classes
        )
    if weights in ("backbone", "none"):
        if weights == "none":
            common.pop("trainable_backbone_layers")  # from scratch every layer trains
        return build_maskrcnn(num_classes=num_classes, weights=weights, **common)
    loaded = ckpt.load_checkpoint(weights, storage_options=config["weights_storage_options"])
    recorded = loaded.arch.get("name", DEFAULT_ARCHITECTURE)
    if recorded != config["architecture"]:
        raise ValueError(f"model.weights {weights} is a {recorded}; set model.architecture: {recorded}")
    if len(loaded.class_names) != num_classes:
        raise ValueError(
            f"model.weights {weights} has {len(loaded.class_names) - 1} classes, the dataset {num_classes - 1}"
        )
    model = build_maskrcnn(num_classes=num_classes, weights="none", **common)
    model.load_state_dict(loaded.model_state)
    return model


def checkpoint_arch(config: dict, num_classes: int) -> dict:
    """The checkpoint's `arch` record of the model `build_for_training(config, num_classes)` builds: what the segment
    job rebuilds it from, with the sizes it was evaluated at."""
    return {
        "name": config["architecture"],
        "schema": ckpt.ARCH_SCHEMA,
        "num_classes": num_classes,
        "min_size": config["eval_min_size"],
        "max_size": config["max_size"],
        "fpn_channels": config.get("fpn_channels", FPN_CHANNELS),
        "box_head_size": config.get("box_head_size", BOX_HEAD_SIZE),
        "rpn_proposals_test": config.get("rpn_proposals_test", RPN_PROPOSALS_TEST),
        "anchor_sizes": list(config.get("anchor_sizes", ANCHOR_SIZES)),
    }


def autocast_dtype(amp: bool, device_type: str) -> torch.dtype | None:
    """The dtype `train.amp` trains in, None for fp32: fp16 on GPUs; bfloat16 on CPUs with oneDNN's bfloat16
    kernels (AVX-512 or AMX), where a step of the demo's model ran 1.35x the images/s of fp32 (BENCHMARKS.md,
    "How the demo was chosen"); weights, optimizer state and the losses stay fp32 either way."""
    if not amp:
        return None
    if device_type == "cuda":
        return torch.float16
    if device_type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def train_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()  # [Ray Train]
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # [Ray Train]
    if device.type == "cpu" and config.get("threads"):
        torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"] + rank)

    def split(name: str, *, train: bool) -> CocoInstances:
        return CocoInstances(
            annotations_url=config[f"{name}_annotations"],
            images_url=config[f"{name}_images"],
            storage_options=config["data_storage_options"],
            train=train,
            flip_prob=config["flip_prob"],
        )

    say = _Reporter(config.get("events"), enabled=rank == 0)
    train_ds, val_ds = split("train", train=True), split("val", train=False)
    index, val_index = train_ds.index, val_ds.index
    if rank == 0 and any(train_ds.dropped.values()):
        say.line(f"train data: dropped {train_ds.dropped} annotations (crowd / boxes under 1 px)")
    model = build_for_training(config, index.num_classes)
    model = ray.train.torch.prepare_model(model)  # [Ray Train] to device + DDP
    bare = model.module if hasattr(model, "module") else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(
        params,
        kind=config.get("optimizer", "sgd"),
        lr=config["lr"],
        momentum=config["momentum"],
        weight_decay=config["weight_decay"],
    )
    sampler = torch.utils.data.DistributedSampler(
        train_ds, num_replicas=world, rank=rank, shuffle=True, seed=config["seed"]
    )
    batches = GroupedBatchSampler(
        sampler, group_ids=aspect_ratio_group_ids(train_ds.aspect_ratios()), batch_size=config["batch_size"]
    )
    workers = config["loader_workers"]
    # A GPU step takes tens of milliseconds: batches come from worker processes that stay up between epochs and
    # keep a few batches ready, in page-locked memory so the copies to the GPU need no staging.
    loader = torch.utils.data.DataLoader(
        train_ds,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    iters = max(1, len(batches))
    total = config["epochs"] * iters
    milestones = [int(f * total) for f in config["lr_steps"]]
    warmup = min(config["warmup_iters"], iters)  # a short run must not spend all of its steps warming up

    def schedule(step: int) -> float:
        return lr_factor(
            step,
            warmup_iters=warmup,
            warmup_factor=config["warmup_factor"],
            milestones=milestones,
            gamma=config["lr_gamma"],
            cosine_total=total if config.get("lr_schedule") == "cosine" else None,
        )

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    amp_dtype = autocast_dtype(bool(config["amp"]), device.type)
    # fp16's narrow exponent needs loss scaling; bfloat16 has fp32's range and trains without it.
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    if config["amp"] and amp_dtype is None:
        say.line(
            f"train.amp: no mixed precision on this {device.type} (no bfloat16 kernels); training in fp32"
        )

    start_epoch = 0
    resume = ray.train.get_checkpoint()  # [Ray Train] set on restarts and re-runs of the same run name
    if resume is not None:
        with resume.as_directory() as d:
            state = ckpt.load_checkpoint(os.path.join(d, CHECKPOINT_FILE))
        bare.load_state_dict(state.model_state)
        optimizer.load_state_dict(state.extra["optimizer"])
        scheduler.load_state_dict(state.extra["scheduler"])
        start_epoch = int(state.extra["epoch"]) + 1
        if rank == 0:
            say.line(f"resuming from {resume.path} at epoch {start_epoch}")

    for epoch in range(start_epoch, config["epochs"]):
        batches.set_epoch(epoch)
        model.train()
        seen, t0, loss_sum, n_iter = 0, time.perf_counter(), 0.0, 0
        for it, (images, targets) in enumerate(loader):
            images = [img.to(device, non_blocking=True) for img in images]
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            with autocast(device.type, amp_dtype):
                losses = model(images, targets)
            loss = sum(losses.values())
            value = float(loss.detach())  # float() of a tensor that requires grad warns on every call
            finite = torch.tensor([1.0 if math.isfinite(value) else 0.0], device=device)
            if _is_dist():
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every worker stops together, no DDP hang
            if finite.item() < 1:
                values = {k: round(float(v.detach()), 4) for k, v in losses.items()}
                message = (
                    f"non-finite loss at epoch {epoch} iteration {it} (step {scheduler.last_epoch}); "
                    f"losses on rank {rank}: {values}; lower train.lr or raise train.warmup_iters"
                )
                if rank == 0:  # Ray Train keeps only checkpointed metrics: the driver reads this file instead
                    with fsspec.open(
                        f"{config['run_path']}/{ERROR_FILE}", "w", **config["run_storage_options"]
                    ) as f:
                        f.write(message)
                ray.train.report({"epoch": epoch, "error": message})  # [Ray Train] same report count on all
                return
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            seen += len(images) * world
            loss_sum += value
            n_iter += 1
            if rank == 0:
                rate = seen / (time.perf_counter() - t0)
                lr = optimizer.param_groups[0]["lr"]
                text = None
                if (it + 1) % config["log_interval"] == 0:
                    parts = " ".join(f"{k}={float(v.detach()):.3f}" for k, v in losses.items())
                    text = f"epoch {epoch} iter {it + 1}/{iters} loss={value:.3f} {parts} lr={lr:.5f} {rate:.2f} images/s"
                    print(text)
                say.step(
                    epoch=epoch,
                    epochs=config["epochs"],
                    it=it + 1,
                    iters=iters,
                    loss=value,
                    lr=lr,
                    rate=rate,
                    text=text,
                )
        metrics = {
            "epoch": epoch,
            "loss": loss_sum / max(1, n_iter),
            "images_per_s": seen / max(1e-9, time.perf_counter() - t0),
            # Every report carries the checkpoint-ranking key (Ray Train warns on each report that lacks it);
            # NOT_EVALUATED ranks an epoch without evaluation below every evaluated one, as pycocotools' -1 does.
            "bbox_AP": NOT_EVALUATED,
            "segm_AP": NOT_EVALUATED,
        }
        if (epoch + 1) % config["eval_every"] == 0 or epoch + 1 == config["epochs"]:
            say.line(f"epoch {epoch}: evaluating on {len(val_ds)} val images ...", transient=True)
            tables = io.StringIO()
            with contextlib.redirect_stdout(tables):
                stats = evaluate_distributed(
                    bare, val_ds, val_index, rank=rank, world=world, device=device, amp_dtype=amp_dtype
                )
            metrics.update(bbox_AP=stats["bbox"][0], segm_AP=stats["segm"][0])
            if rank == 0:
                say.table(tables.getvalue().rstrip("\n"))
                say.line(f"epoch {epoch}: {summary_line(stats)}")
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:  # one copy of the weights; the other workers report metrics only
                ckpt.save_checkpoint(
                    os.path.join(d, CHECKPOINT_FILE),
                    model_state={k: v.detach().cpu() for k, v in bare.state_dict().items()},
                    arch=checkpoint_arch(config, index.num_classes),
                    class_names=list(index.class_names),
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    epoch=epoch,
                    metrics={k: float(v) for k, v in metrics.items()},
                    config=config["run_config"],
                )
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)  # [Ray Train]


class _Reporter:
    """Rank 0's lines for the person running the job: printed (Ray keeps them in the worker's log, and forwards
    them when the driver asks for workers' output) and, when the driver passed an `events` queue, sent to it, so
    the driver shows them once, as lines or progress bars, without forwarding Ray's own worker noise.

    Events: `{"kind": "line", "text", "transient"}`, `{"kind": "table", "text"}` (pycocotools' AP tables),
    `{"kind": "step", "epoch", "epochs", "it", "iters", "loss", "lr", "rate", "text"}` (`text`: the log_interval
    line, else None). Steps are sent at most every STEP_EVENT_S; sending never stops training.
    """

    STEP_EVENT_S = 0.5

    def __init__(self, events, *, enabled: bool):
        self._events, self._enabled = events, enabled
        self._last_step = 0.0

    def line(self, text: str, *, transient: bool = False) -> None:
        if self._enabled:
            print(text)
            self._send({"kind": "line", "text": text, "transient": transient})

    def table(self, text: str) -> None:
        if self._enabled:
            print(text)
            self._send({"kind": "table", "text": text})

    def step(self, *, text: str | None, it: int, iters: int, **values) -> None:
        now = time.perf_counter()
        if text is None and it < iters and now - self._last_step < self.STEP_EVENT_S:
            return
        self._last_step = now
        self._send({"kind": "step", "text": text, "it": it, "iters": iters, **values})

    def _send(self, event: dict) -> None:
        if self._events is None or not self._enabled:
            return
        try:
            self._events.put_nowait(event)
        except Exception:  # noqa: BLE001  (a full or lost queue costs the driver a line, never the training)
            pass


def evaluate_distributed(
    model, val_ds, val_index, *, rank: int, world: int, device, amp_dtype: torch.dtype | None = None
) -> dict[str, list[float]]:
    """Each worker predicts its share of the val images; rank 0 scores all of them with COCOeval.

    `amp_dtype`: the training's mixed precision, so the AP is that of the model as it trains (and as the segment
    job runs it at `model.precision` fp16/bf16); outputs are cast back to fp32 before scoring."""
    model.eval()
    preds: list[dict] = []
    with torch.inference_mode():
        for i in range(rank, len(val_ds), world):
            image, target = val_ds[i]
            with autocast(device.type, amp_dtype):
                output = model([image.to(device)])[0]
            preds += predictions_to_coco(
                int(target["image_id"]),
                {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in output.items()},
                label_to_cat=val_index.label_to_cat,
            )
    gathered: list = [None] * world
    if _is_dist():
        dist.all_gather_object(gathered, preds)
    else:
        gathered = [preds]
    stats = None
    if rank == 0:
        stats = evaluate(val_index.dataset, [p for part in gathered for p in part], verbose=True)
    box = [stats]
    if _is_dist():
        dist.broadcast_object_list(box, src=0)
    model.train()
    return box[0] if box[0] is not None else {"bbox": [math.nan] * 12, "segm": [math.nan] * 12}
