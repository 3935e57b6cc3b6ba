"""The training loop's pure parts: the optimiser choice, the lr schedule, mixed precision."""

import math

import pytest
import torch

from model.train_loop import autocast_dtype, cpu_has_bf16, lr_factor, make_optimizer
from pipeline.config import ConfigError
from pipeline.train.config import train_config


def test_make_optimizer_builds_sgd_or_adamw_with_the_given_settings():
    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd = make_optimizer(params, kind="sgd", lr=0.02, momentum=0.9, weight_decay=1e-4)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    adamw = make_optimizer(params, kind="adamw", lr=1e-3, momentum=0.8, weight_decay=0.05)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["betas"] == (0.8, 0.999) and adamw.defaults["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="'sgd' or 'adamw'"):
        make_optimizer(params, kind="adam", lr=1e-3, momentum=0.9, weight_decay=0.0)


def test_optimizer_key_is_validated_and_sets_the_auto_lr():
    base = {
        "data": {
            "train": {"annotations": "a.json", "images": "i"},
            "val": {"annotations": "a.json", "images": "i"},
        },
        "run": {"name": "x", "storage_path": "/tmp/x"},
        "train": {"batch_size": 4},
        "scaling": {"num_workers": 4},
    }
    assert train_config(base).lr == pytest.approx(0.02)  # sgd: 0.02 x 16 / 16
    base["train"]["optimizer"] = "adamw"
    assert train_config(base).lr == pytest.approx(1e-4)
    base["train"]["optimizer"] = "adam"
    with pytest.raises(ConfigError, match="train.optimizer"):
        train_config(base)


def test_lr_factor_warms_up_then_steps_down():
    kw = dict(warmup_iters=10, warmup_factor=0.001, milestones=[70, 90], gamma=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.001)
    assert lr_factor(10, **kw) == 1.0 and lr_factor(69, **kw) == 1.0
    assert lr_factor(70, **kw) == pytest.approx(0.1) and lr_factor(95, **kw) == pytest.approx(0.01)


def test_lr_factor_cosine_warms_up_then_decays_to_zero_at_the_end():
    kw = dict(warmup_iters=10, warmup_factor=0.001, milestones=[5], gamma=0.1, cosine_total=100)
    assert lr_factor(0, **kw) == pytest.approx(0.001)  # warm-up multiplies the cosine (~1 at the start)
    assert lr_factor(10, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))  # milestones ignored
    assert lr_factor(50, **kw) == pytest.approx(0.5)
    assert lr_factor(100, **kw) == pytest.approx(0.0, abs=1e-12) and lr_factor(150, **kw) == pytest.approx(
        0.0, abs=1e-12
    )


def test_amp_trains_in_fp16_on_gpus_and_bfloat16_on_cpus_with_onednn_kernels():
    assert autocast_dtype(False, "cuda") is None and autocast_dtype(False, "cpu") is None
    assert autocast_dtype(True, "cuda") == torch.float16
    assert autocast_dtype(True, "cpu") == (torch.bfloat16 if cpu_has_bf16() else None)
    assert autocast_dtype(True, "mps") is None


def test_a_bfloat16_step_on_a_cpu_keeps_fp32_weights_and_learns():
    """What `train.amp: true` does on a CPU: autocast to bfloat16 around the forward pass, fp32 weights and
    gradients, no loss scaling; the model's losses come out finite and a few steps lower them."""
    from model.build import build_maskrcnn

    torch.manual_seed(0)
    model = build_maskrcnn(
        num_classes=3,
        weights="none",
        min_size=64,
        max_size=96,
        architecture="maskrcnn_resnet18_fpn",
        fpn_channels=16,
        box_head_size=32,
        box_batch_size_per_image=16,
        rpn_proposals_train=100,
    ).train()
    image = torch.rand(3, 64, 80)
    mask = torch.zeros(1, 64, 80, dtype=torch.uint8)
    mask[0, 16:48, 20:60] = 1
    target = {"boxes": torch.tensor([[20.0, 16.0, 60.0, 48.0]]), "labels": torch.tensor([1]), "masks": mask}
    opt = make_optimizer(
        [p for p in model.parameters() if p.requires_grad],
        kind="adamw",
        lr=1e-3,
        momentum=0.9,
        weight_decay=0.0,
    )
    losses = []
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sum(model([image], [target]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.float32}
