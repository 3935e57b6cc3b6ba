"""Checkpoint files: one `torch.save`d dict of plain types and tensors, loaded with `weights_only=True`.

Layout (`FORMAT` = "archive-segmenter/maskrcnn/v1"):
    {
      "format": FORMAT,
      "arch": {"name": "maskrcnn_resnet50_fpn", "num_classes": int, "min_size": int, "max_size": int,
               "schema": 2, ...},  # name: one of model.architectures; training adds the head widths, RPN settings
      "class_names": [str, ...],          # index = label; index 0 is "__background__"
      "model": state_dict,                # tensors only
      # training adds: "optimizer", "scheduler", "epoch", "metrics", "config"
    }

`arch["schema"]`: 2 since `model.architecture` (the segment job's model id of such a checkpoint names the
architecture); absent in older checkpoints, whose ids stay as they were so that their outputs resume.

`weights_only=True` means a file carrying arbitrary pickled objects (code) is refused, not executed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
from typing import Any

import fsspec
import torch

FORMAT = "archive-segmenter/maskrcnn/v1"
ARCH_SCHEMA = 2  # arch["schema"] of the checkpoints written now (see above)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not ours, or carrying executable pickled objects."""


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    url: str
    digest: str  # sha256 of the file's bytes: identifies the exact weights in outputs
    arch: dict
    class_names: list[str]
    model_state: dict[str, torch.Tensor] | None
    extra: dict[str, Any]


def save_checkpoint(
    url: str,
    *,
    model_state: dict[str, torch.Tensor],
    arch: dict,
    class_names: list[str],
    storage_options: dict | None = None,
    **extra: Any,
) -> None:
    """Write a checkpoint to a local path or fsspec URL (serialised in memory first, so no partial file is left)."""
    if len(class_names) != arch.get("num_classes", len(class_names)):
        raise ValueError(f"{len(class_names)} class names for num_classes={arch.get('num_classes')}")
    payload = {"format": FORMAT, "arch": dict(arch), "class_names": list(class_names), "model": model_state}
    payload.update(extra)
    buf = io.BytesIO()
    torch.save(payload, buf)
    with fsspec.open(url, "wb", **(storage_options or {})) as f:
        f.write(buf.getvalue())


def load_checkpoint(
    url: str, *, storage_options: dict | None = None, with_state: bool = True
) -> LoadedCheckpoint:
    """Read and validate a checkpoint. Raises `CheckpointError` with the URL and the cause."""
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint not found: {url}") from e
    except PermissionError as e:
        raise CheckpointError(f"checkpoint not readable (access denied): {url}") from e
    if not data.startswith(b"PK\x03\x04"):  # torch.save's zip container; anything else is not ours
        raise CheckpointError(f"not a readable checkpoint: {url} (not a torch.save zip file)")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # A pickled object outside weights_only's allow-list: the "checkpoint that runs code" case.
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln]
        what = lines[0] if lines else "objects beyond tensors and plain containers"
        raise CheckpointError(
            f"refusing checkpoint {url}: it holds pickled objects that weights_only loading does not allow ({what})"
        ) from e
    except Exception as e:  # zip/format errors: truncated upload, a file that is not a checkpoint at all
        raise CheckpointError(f"not a readable checkpoint: {url} ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"not an archive-segmenter checkpoint: {url} (format {found!r}, expected {FORMAT!r})"
        )
    for key in ("arch", "class_names", "model"):
        if key not in payload:
            raise CheckpointError(f"checkpoint {url} lacks {key!r}")
    extra = {k: v for k, v in payload.items() if k not in ("format", "arch", "class_names", "model")}
    return LoadedCheckpoint(
        url=url,
        digest=hashlib.sha256(data).hexdigest(),
        arch=dict(payload["arch"]),
        class_names=list(payload["class_names"]),
        model_state=payload["model"] if with_state else None,
        extra=extra if with_state else {},
    )
