"""Infer: the model, loaded once per actor, on batches of decoded images → `Detections` per image.

`Segmenter` is the compute path of the inference actor and nothing else: no storage, no Ray. That makes it the seam
the tests compare with torchvision called directly, and what a GPU benchmark drives.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.build import ModelSpec, load_model
from model.postprocess import Detections, detections_from_mask_probs, forward_to_mask_probs


class Segmenter:
    def __init__(
        self,
        *,
        spec: ModelSpec,
        score_threshold: float,
        max_detections: int = 100,
        device: str = "cpu",
        threads: int | None = None,
        weights_storage_options: dict | None = None,
    ):
        if threads:
            # A deliberate thread count: the actor's CPU share, not every core of a shared node.
            torch.set_num_threads(threads)
        self.device = torch.device(device)
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

    def predict(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """RGB uint8 `[H, W, 3]` images → `Detections` per image (one forward pass for the whole list).

        The model runs up to its RoI heads; each kept mask is then pasted, thresholded and RLE-encoded within its
        box (`model.postprocess`), never on a full-image canvas per detection as torchvision's own forward does.
        Same detections, same RLE strings; one code path on CPU and GPU.
        """
        tensors = [to_tensor(img, self.device) for img in images]
        with torch.inference_mode():
            outputs = forward_to_mask_probs(self.model, tensors)
            return [
                detections_from_mask_probs(
                    out,
                    image_size=(int(img.shape[0]), int(img.shape[1])),
                    score_threshold=self.score_threshold,
                )
                for out, img in zip(outputs, images)
            ]

    def predict_each(self, images: Sequence[np.ndarray]) -> list[Detections | Exception]:
        """`predict`, but an image that breaks the batch (e.g. out of memory on a huge image) is isolated: the
        batch is retried image by image, and the one that still fails gets its exception instead of detections."""
        try:
            return list(self.predict(images))
        except Exception as e:
            if len(images) == 1:
                return [e]
        return [r for image in images for r in self.predict_each([image])]


def to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 `[H, W, 3]` → float `[3, H, W]` in 0–1 on `device` (the model's input contract)."""
    t = torch.from_numpy(image).to(device, non_blocking=True)
    return t.permute(2, 0, 1).float().div_(255.0)
