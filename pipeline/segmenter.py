"""The inference actor: holds the model once, turns a batch of input bytes into image rows with nested detections.

Callable without Ray (`Segmenter(...)(table)`), which is how the tests and the GPU benchmark drive it; under Ray
Data it is the class given to `map_batches` on an actor pool, one instance per actor (per GPU).

Per-image failures follow a named policy (`on_image_error`):
- `"record"` (default): the image becomes an `images` row with `status="error"` and the reason; the batch goes on.
- `"raise"`: the first bad image fails the job (for debugging a pipeline on known-good data).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from model.build import ModelSpec, load_model
from model.decode import DecodeError, decode_image
from model.postprocess import Detections, detections_from_mask_probs, forward_to_mask_probs
from pipeline.schema import RESULT_SCHEMA, STATUS_ERROR, STATUS_OK

ERROR_POLICIES = ("record", "raise")


class ImageError(RuntimeError):
    """Raised under the `"raise"` policy; names the input."""


class Segmenter:
    def __init__(
        self,
        *,
        spec: ModelSpec,
        score_threshold: float,
        max_detections: int = 100,
        device: str = "cpu",
        threads: int | None = None,
        max_pixels: int = 100_000_000,
        batch_size: int = 4,
        on_image_error: str = "record",
        run_id: str = "",
        weights_storage_options: dict | None = None,
    ):
        if on_image_error not in ERROR_POLICIES:
            raise ValueError(f"on_image_error must be one of {ERROR_POLICIES}, got {on_image_error!r}")
        if threads:
            # A deliberate thread count: the actor's CPU share, not every core of a shared node.
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.spec = spec
        self.score_threshold = score_threshold
        self.max_pixels = max_pixels
        self.batch_size = batch_size
        self.on_image_error = on_image_error
        self.run_id = run_id
        # The model's own score filter is set to ours so it never drops what we keep, nor keeps what we drop.
        self.model = load_model(
            spec,
            box_score_thresh=score_threshold,
            box_detections_per_img=max_detections,
            storage_options=weights_storage_options,
        ).to(self.device)
        self.model.eval()
        self.class_names = list(spec.class_names)

    # -- the Ray Data entry point ----------------------------------------------------------------------------------

    def __call__(self, batch: pa.Table | dict) -> pa.Table:
        """`batch`: `pipeline.sources.READ_SCHEMA` rows (Arrow table or dict of columns) → `RESULT_SCHEMA` table."""
        cols = batch.to_pydict() if isinstance(batch, pa.Table) else {k: list(v) for k, v in batch.items()}
        n = len(cols["image_uri"])
        rows: list[dict] = []
        decoded: list[tuple[int, np.ndarray]] = []
        for i in range(n):
            row = self._base_row(cols, i)
            rows.append(row)
            if cols["read_error"][i] is not None:
                self._fail(row, cols["read_error"][i])
                continue
            t0 = time.perf_counter()
            try:
                image = decode_image(cols["data"][i], max_pixels=self.max_pixels)
            except DecodeError as e:
                self._fail(row, e.reason)
                continue
            finally:
                row["decode_ms"] = (time.perf_counter() - t0) * 1e3
            row["height"], row["width"] = int(image.shape[0]), int(image.shape[1])
            problem = too_thin(row["height"], row["width"], self.spec.min_size, self.spec.max_size)
            if problem:
                self._fail(row, problem)
                continue
            decoded.append((i, image))
        for start in range(0, len(decoded), self.batch_size):
            chunk = decoded[start : start + self.batch_size]
            t0 = time.perf_counter()
            results = self._infer([img for _, img in chunk], [rows[i]["image_uri"] for i, _ in chunk])
            share_ms = (time.perf_counter() - t0) * 1e3 / len(chunk)
            for (i, _), result in zip(chunk, results):
                row = rows[i]
                row["infer_ms"] = share_ms
                if isinstance(result, Exception):
                    self._fail(row, f"inference failed: {type(result).__name__}: {result}")
                    continue
                row["status"] = STATUS_OK
                row["num_detections"] = len(result)
                row["detections"] = self._detection_structs(result)
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)

    # -- compute path ------------------------------------------------------------------------------------------------

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

    def _infer(self, images: list[np.ndarray], uris: list[str]) -> list[Detections | Exception]:
        try:
            return list(self.predict(images))
        except Exception as e:
            if len(images) == 1:
                if self.on_image_error == "raise":
                    raise ImageError(f"{uris[0]}: inference failed: {e}") from e
                return [e]
        # One image broke the batched forward pass (e.g. out of memory on a huge image): isolate it.
        out: list[Detections | Exception] = []
        for image, uri in zip(images, uris):
            out.extend(self._infer([image], [uri]))
        return out

    # -- rows --------------------------------------------------------------------------------------------------------

    def _base_row(self, cols: dict, i: int) -> dict:
        data = cols["data"][i]
        return {
            "image_uri": cols["image_uri"][i],
            "status": STATUS_ERROR,
            "error": None,
            "height": None,
            "width": None,
            "num_detections": 0,
            "bytes": None if data is None else len(data),
            "decode_ms": None,
            "infer_ms": None,
            "unit_id": cols["unit_id"][i],
            "model_id": self.spec.model_id,
            "run_id": self.run_id,
            "unit_index": cols["unit_index"][i],
            "unit_total": cols["unit_total"][i],
            "detections": [],
        }

    def _fail(self, row: dict, reason: str) -> None:
        if self.on_image_error == "raise":
            raise ImageError(f"{row['image_uri']}: {reason}")
        row["status"], row["error"] = STATUS_ERROR, reason

    def _detection_structs(self, det: Detections) -> list[dict]:
        names = self.class_names
        return [
            {
                "instance": k,
                "label": int(det.labels[k]),
                "label_name": names[det.labels[k]]
                if 0 <= det.labels[k] < len(names)
                else str(int(det.labels[k])),
                "score": float(det.scores[k]),
                "bbox": det.boxes_xywh[k].tolist(),
                "area": int(det.areas[k]),
                "mask": det.rles[k],
            }
            for k in range(len(det))
        ]


def too_thin(height: int, width: int, min_size: int, max_size: int) -> str | None:
    """The reason an image cannot be segmented at these sizes, or None.

    torchvision scales an image by `min(min_size / short side, max_size / long side)`; an extreme strip (e.g. 1×500
    under `max_size` 192) would shrink to under one pixel and fail inside the model with an opaque error.
    """
    short, long = min(height, width), max(height, width)
    scale = min(min_size / short, max_size / long)
    if int(short * scale) < 1:
        return (
            f"image too thin to segment: {width}x{height} would be resized to under 1 pixel "
            f"(short side scaled by {scale:.3g} to fit model max_size={max_size})"
        )
    return None


def to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 `[H, W, 3]` → float `[3, H, W]` in 0–1 on `device` (the model's input contract)."""
    t = torch.from_numpy(image).to(device, non_blocking=True)
    return t.permute(2, 0, 1).float().div_(255.0)
