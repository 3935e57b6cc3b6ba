"""Infer: the model, loaded once per actor, on batches of decoded images → `Detections` per image.

`Segmenter` is the compute path of the inference actor and nothing else: no storage, no Ray. That makes it the seam
the tests compare with torchvision called directly, and what `bench/gpu.py` drives.

Two steps, so that an actor can overlap them: `forward` (the images to the device, the model up to its mask head,
under fp16 autocast on GPUs) and `detections` (masks pasted, thresholded and RLE-encoded). On GPUs the masks of a
whole batch are handled in a few tensor operations on the device and only run boundaries come back to the host
(`model.paste_batched.detections_batched`); on CPUs, where that would only add work, each mask is pasted within its
box, exactly as torchvision pastes it (`detections_from_mask_probs`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.build import ModelSpec, load_model
from model.paste_batched import detections_batched
from model.postprocess import Detections, detections_from_mask_probs, forward_to_mask_probs
from model.precision import autocast
from pipeline.segment.settings import resolve_precision

MASK_ROUTES = ("auto", "batched", "in_box")


class Segmenter:
    def __init__(
        self,
        *,
        spec: ModelSpec,
        score_threshold: float,
        max_detections: int = 100,
        device: str = "cpu",
        threads: int | None = None,
        precision: str = "auto",
        mask_route: str = "auto",
        weights_storage_options: dict | None = None,
    ):
        if threads:
            # A deliberate thread count: the actor's CPU share, not every core of a shared node.
            torch.set_num_threads(threads)
        if mask_route not in MASK_ROUTES:
            raise ValueError(f"mask_route must be one of {MASK_ROUTES}, got {mask_route!r}")
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device.type)
        self.mask_route = (
            mask_route if mask_route != "auto" else ("batched" if self.device.type == "cuda" else "in_box")
        )
        self.spec = spec
        self.score_threshold = score_threshold
        # The model's own score filter is set to ours so it never drops what we keep, nor keeps what we drop.
        self.model = load_model(
            spec,
            box_score_thresh=score_threshold,
            box_detections_per_img=max_detections,
            storage_options=weights_storage_options,
        ).to(self.device)
        self.model.eval()

    def predict(self, images: Sequence[np.ndarray | torch.Tensor]) -> list[Detections]:
        """RGB uint8 `[H, W, 3]` images → `Detections` per image (one forward pass for the whole list)."""
        return self.detections(self.forward(images), [image_size(img) for img in images])

    def forward(
        self,
        images: Sequence[np.ndarray | torch.Tensor],
        original_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """The model up to its mask head (`forward_to_mask_probs`), outputs left on the device. `original_sizes`:
        `(H, W)` of each image as decoded, where an image was already shrunk to the model's size on the read
        threads (`model.resize.shrink_for_model`); boxes come back at that size.

        Under fp16, autocast runs the convolutions and matrix products in half precision; torchvision keeps `nms`
        and `roi_align` in fp32 under autocast (casting the model itself with `.half()` would break `nms`).
        """
        tensors = [to_tensor(img, self.device) for img in images]
        with torch.inference_mode(), self._autocast():
            outputs = forward_to_mask_probs(
                self.model, tensors, original_sizes=list(original_sizes) if original_sizes else None
            )
        if self.precision == "bf16":
            # bfloat16 mask probabilities and boxes are cast back once here, so pasting, thresholds and RLE
            # encoding run the same fp32 code on every precision.
            outputs = [
                {k: v.float() if v.is_floating_point() else v for k, v in out.items()} for out in outputs
            ]
        return outputs

    def detections(
        self, outputs: list[dict[str, torch.Tensor]], image_sizes: list[tuple[int, int]]
    ) -> list[Detections]:
        """`forward` outputs → `Detections` (scores `>= score_threshold`), by this segmenter's mask route."""
        with torch.inference_mode():
            if self.mask_route == "batched":
                return detections_batched(
                    outputs, image_sizes=image_sizes, score_threshold=self.score_threshold
                )
            return [
                detections_from_mask_probs(out, image_size=size, score_threshold=self.score_threshold)
                for out, size in zip(outputs, image_sizes)
            ]

    def _autocast(self):
        return autocast(self.device.type, {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision))


def image_size(image: np.ndarray | torch.Tensor) -> tuple[int, int]:
    return int(image.shape[0]), int(image.shape[1])


def to_tensor(image: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 `[H, W, 3]` (an array, or a tensor, pinned for a fast copy to a GPU) → float `[3, H, W]` in 0–1 on
    `device` (the model's input contract). The uint8 image crosses to the device, a quarter of the float's bytes."""
    t = image if isinstance(image, torch.Tensor) else torch.from_numpy(image)
    t = t.to(device, non_blocking=True)
    return t.permute(2, 0, 1).float().div_(255.0)
