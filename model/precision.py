"""Mixed precision, shared by training and inference: whether this CPU computes bfloat16 natively, and one autocast
context for "this dtype, or fp32 when None"."""

from __future__ import annotations

import torch


def cpu_has_bf16() -> bool:
    """Whether oneDNN has bfloat16 kernels on this CPU (AVX-512 or AMX): where bf16 autocast is faster than fp32
    instead of an emulation slower than it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def autocast(device_type: str, dtype: torch.dtype | None):
    """`torch.autocast` to `dtype` on `device_type`; a disabled one (fp32) when `dtype` is None."""
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
