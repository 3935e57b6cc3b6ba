"""The batched mask route (`model.postprocess`'s third route): all kept masks of a batch pasted, thresholded and turned
into run boundaries in a few tensor operations on the masks' device (no Python loop over masks, one copy to the host
per chunk), and the COCO strings made on the host from the run lengths (`model.rle`). What the segment job runs on
GPUs, where a loop of small kernels per mask would hold the GPU up. Pure functions, like the rest of `model/`.
"""

from __future__ import annotations

import numpy as np
import torch

from model.postprocess import MASK_THRESHOLD, Detections, paste_boxes, xyxy_to_xywh

# Elements (masks x crop rows x crop columns) of one chunk of the batched paste: bounds its memory (~0.5 GB of
# float32 intermediates at 2^25) whatever the number and size of the boxes.
CHUNK_ELEMENTS = 1 << 25


def detections_batched(
    outputs: list[dict[str, torch.Tensor]],
    *,
    image_sizes: list[tuple[int, int]],
    score_threshold: float,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> list[Detections]:
    """`forward_to_mask_probs` outputs of a batch → `Detections` per image, masks handled for the whole batch at once
    (see the module docstring). The outputs may live on any device."""
    kept = []
    for out in outputs:
        keep = out["scores"] >= score_threshold
        kept.append({k: out[k][keep] for k in ("boxes", "labels", "scores", "masks")})
    masks = torch.cat([k["masks"] for k in kept]) if kept else torch.zeros(0, 1, 28, 28)
    boxes = torch.cat([k["boxes"] for k in kept]) if kept else torch.zeros(0, 4)
    per_image = [len(k["scores"]) for k in kept]
    sizes = torch.tensor([s for s, n in zip(image_sizes, per_image) for _ in range(n)], dtype=torch.int64)
    rles, areas = masks_to_rle(masks, boxes, sizes.reshape(-1, 2), chunk_elements=chunk_elements)
    # One copy of the small per-detection tensors to the host.
    meta = (
        torch.cat([boxes.float(), torch.cat([k["scores"] for k in kept]).float()[:, None]], dim=1)
        .cpu()
        .numpy()
        if kept and len(boxes)
        else np.zeros((0, 5), np.float32)
    )
    labels = torch.cat([k["labels"] for k in kept]).cpu().numpy() if kept else np.zeros(0, np.int64)
    out, start = [], 0
    for (h, w), n in zip(image_sizes, per_image):
        sl = slice(start, start + n)
        out.append(
            Detections(
                boxes_xywh=xyxy_to_xywh(meta[sl, :4]),
                labels=labels[sl].astype(np.int64),
                scores=meta[sl, 4].astype(np.float32),
                rles=[{"size": [h, w], "counts": c} for c in rles[sl]],
                areas=areas[sl],
            )
        )
        start += n
    return out


def masks_to_rle(
    masks: torch.Tensor, boxes: torch.Tensor, sizes: torch.Tensor, *, chunk_elements: int = CHUNK_ELEMENTS
) -> tuple[list[str], np.ndarray]:
    """Soft masks `[N, 1, M, M]` and their float xyxy boxes `[N, 4]` (image pixels), each in an image of size
    `sizes[i] = (H, W)` (int64 `[N, 2]`, on the CPU) → the COCO compressed RLE string of each mask pasted into its
    image and thresholded at `MASK_THRESHOLD`, and its area (int64 `[N]`): `mask_changes` on the masks' device,
    then `rle_strings` on the host."""
    changes, lengths, areas = mask_changes(masks, boxes, sizes, chunk_elements=chunk_elements)
    return rle_strings(changes, lengths, (sizes[:, 0] * sizes[:, 1]).numpy()), areas


def mask_changes(
    masks: torch.Tensor, boxes: torch.Tensor, sizes: torch.Tensor, *, chunk_elements: int = CHUNK_ELEMENTS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The device part of `masks_to_rle`, a chunk of masks at a time: each mask is pasted only over the part of its
    expanded box that lies in the image (torchvision's paste arithmetic: `expand_masks`, `expand_boxes`, bilinear
    with `align_corners=False`), thresholded, and the positions where the mask changes value along its
    column-major (Fortran) order are found. Chunks group crops of similar size (`chunk_plan`). Returns, on the host
    (one copy per chunk), in the masks' own order: the change positions of all masks one mask after another (int64),
    how many each mask has, and each mask's area."""
    from torchvision.models.detection.roi_heads import expand_masks

    n = len(masks)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    device = masks.device
    padded, _ = expand_masks(masks.float(), padding=1)
    padded = padded[:, 0]  # [N, S, S], S = M + 2
    sizes = sizes.to(device)
    box, x0, y0, ch, cw = _crop_windows(boxes, sizes, masks.shape[-1])
    bh = (box[:, 3] - box[:, 1] + 1).clamp(min=1)
    bw = (box[:, 2] - box[:, 0] + 1).clamp(min=1)
    # One device → host copy of the crop sizes: the plan is made on the host.
    plan = chunk_plan(torch.stack([ch, cw], dim=1).cpu().numpy(), chunk_elements)
    changes, lengths, areas = [], [], []
    for which in plan:
        # A plan in the masks' own order (everything in one chunk) is sliced; a sorted one is gathered.
        sl = slice(None) if len(plan) == 1 else torch.from_numpy(which).to(device)
        binary = _paste_chunk(padded[sl], box[sl], bh[sl], bw[sl], x0[sl], y0[sl], ch[sl], cw[sl])
        chunk_changes, chunk_lengths = _changes(binary, x0[sl], y0[sl], sizes[sl])
        # The one device → host copy of the chunk (it also waits for the chunk's kernels).
        host = torch.cat([chunk_lengths, binary.sum(dim=(1, 2)), chunk_changes]).cpu().numpy()
        k = len(which)
        lengths.append(host[:k])
        areas.append(host[k : 2 * k])
        changes.append(host[2 * k :])
    order = np.concatenate(plan)
    return _unpermute(np.concatenate(changes), np.concatenate(lengths), np.concatenate(areas), order)


def chunk_plan(crop_hw: np.ndarray, chunk_elements: int, *, by_size: bool = True) -> list[np.ndarray]:
    """Crop sizes (rows, columns; int `[N, 2]`) → the masks of each chunk (int64 index arrays that together hold
    every index once), so that each chunk's padded tensor (count x its largest rows x its largest columns) stays
    within `chunk_elements` (a crop larger than that alone gets a chunk of its own).

    A chunk's tensor is padded to its largest crop, so one large crop among small ones pads every one of them to
    its size. With `by_size` the masks are taken by their crops' longer side (then area), so that a chunk holds
    crops of similar size: on 400 crops of log-uniform sizes this padded 1.6-2x their own area, against 2-2.4x
    sorted by area (a tall and a wide crop of one area pad to a square) and 4-5x in the masks' own order (score
    order, `by_size=False`). Where all crops fit in one chunk the order cannot change its size, and the masks stay
    in their own order.
    """
    hw = np.maximum(np.asarray(crop_hw, dtype=np.int64).reshape(-1, 2), 1)  # an empty crop still takes a row
    n = len(hw)
    if n == 0:
        return []
    if not by_size or n * int(hw[:, 0].max()) * int(hw[:, 1].max()) <= chunk_elements:
        order = np.arange(n)
    else:
        order = np.lexsort((hw[:, 0] * hw[:, 1], hw.max(axis=1)))
    plan, start, max_h, max_w = [], 0, 0, 0
    for at, i in enumerate(order):
        h, w = max(max_h, hw[i, 0]), max(max_w, hw[i, 1])
        if at > start and (at - start + 1) * h * w > chunk_elements:
            plan.append(order[start:at])
            start, h, w = at, hw[i, 0], hw[i, 1]
        max_h, max_w = h, w
    plan.append(order[start:])
    return plan


def padded_elements(crop_hw: np.ndarray, plan: list[np.ndarray]) -> int:
    """Elements of the tensors that `plan`'s chunks paste into (the sum of count x largest rows x largest columns):
    the work and memory a plan costs."""
    hw = np.maximum(np.asarray(crop_hw, dtype=np.int64).reshape(-1, 2), 1)
    return sum(len(c) * int(hw[c, 0].max()) * int(hw[c, 1].max()) for c in plan if len(c))


def crop_sizes(boxes: torch.Tensor, sizes: torch.Tensor, mask_size: int = 28) -> np.ndarray:
    """Float xyxy boxes `[N, 4]` in images of `sizes` (int64 `[N, 2]`, (H, W)) → the rows and columns (int64
    `[N, 2]`, on the host) of the part of each expanded box that lies in its image: what `mask_changes` pastes."""
    _, _, _, ch, cw = _crop_windows(boxes, sizes.to(boxes.device), mask_size)
    return torch.stack([ch, cw], dim=1).cpu().numpy()


def _crop_windows(boxes: torch.Tensor, sizes: torch.Tensor, mask_size: int):
    """The expanded int64 box torchvision pastes into `[N, 4]`, and its part in the image: top-left `x0`, `y0`,
    `rows`, `cols` (each int64 `[N]`, 0 rows or columns for a box that misses the image)."""
    box = paste_boxes(boxes.float(), mask_size)
    x0 = box[:, 0].clamp(min=0)
    y0 = box[:, 1].clamp(min=0)
    cw = (torch.minimum(box[:, 2] + 1, sizes[:, 1]) - x0).clamp(min=0)
    ch = (torch.minimum(box[:, 3] + 1, sizes[:, 0]) - y0).clamp(min=0)
    return box, x0, y0, ch, cw


def _unpermute(changes: np.ndarray, lengths: np.ndarray, areas: np.ndarray, order: np.ndarray):
    """`mask_changes`' per-chunk results, whose masks came in `order` (mask `order[k]` k-th), back in the masks'
    own order: lengths and areas scattered, and each mask's stretch of `changes` moved to its place."""
    if np.array_equal(order, np.arange(len(order))):
        return changes, lengths, areas.astype(np.int64)
    own_lengths = np.empty_like(lengths)
    own_lengths[order] = lengths
    own_areas = np.empty(len(areas), np.int64)
    own_areas[order] = areas
    # Where each mask's stretch starts in the chunk order, and where it goes in the masks' own order.
    starts = np.zeros(len(order), np.int64)
    starts[order] = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    own_starts = np.concatenate([[0], np.cumsum(own_lengths)[:-1]])
    take = np.repeat(starts - own_starts, own_lengths) + np.arange(int(own_lengths.sum()))
    return changes[take], own_lengths, own_areas


def rle_strings(changes: np.ndarray, lengths: np.ndarray, pixels: np.ndarray) -> list[str]:
    """The host part of `masks_to_rle`: COCO strings from `mask_changes`' positions, for masks whose images have
    `pixels[i]` = H·W pixels (grouped by image size, a few NumPy passes per group; `model.rle`)."""
    from model.rle import encode_counts, runs_from_changes

    out: list[str | None] = [None] * len(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for size in np.unique(pixels):
        which = np.flatnonzero(pixels == size)
        parts = [changes[offsets[i] : offsets[i + 1]] for i in which]
        runs = runs_from_changes(np.concatenate(parts), lengths[which], int(size))
        for i, s in zip(which, encode_counts(runs, lengths[which] + 1)):
            out[i] = s
    return out


def _source_index(local: torch.Tensor, out_size: torch.Tensor, in_size: int):
    """`F.interpolate(mode="bilinear", align_corners=False)`'s sample positions and weights: for output positions
    `local` `[n, k]` of outputs `out_size` `[n]` long, resized from `in_size`: (i0, i1, w0, w1)."""
    scale = torch.tensor(float(in_size), device=local.device) / out_size.to(torch.float32)
    src = (scale[:, None] * (local.to(torch.float32) + 0.5) - 0.5).clamp(min=0.0)
    i0 = src.floor().to(torch.int64).clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    w1 = (src - i0.to(torch.float32)).clamp(0.0, 1.0)
    return i0, i1, 1.0 - w1, w1


def _paste_chunk(padded, box, bh, bw, x0, y0, ch, cw) -> torch.Tensor:
    """bool `[n, Hc, Wc]`: each mask resized to its box and thresholded, over its crop (top-left `(x0, y0)`, `ch`
    rows, `cw` columns, the rest False)."""
    n, size = len(padded), padded.shape[-1]
    hc, wc = max(int(ch.max()), 1), max(int(cw.max()), 1)
    rows = torch.arange(hc, device=padded.device)
    cols = torch.arange(wc, device=padded.device)
    # Crop row r of mask i is box-local row (y0 - box top) + r; likewise for columns.
    iy0, iy1, wy0, wy1 = _source_index((y0 - box[:, 1])[:, None] + rows[None], bh, size)
    ix0, ix1, wx0, wx1 = _source_index((x0 - box[:, 0])[:, None] + cols[None], bw, size)
    top = padded.gather(1, iy0[:, :, None].expand(n, hc, size))  # [n, Hc, S]
    bottom = padded.gather(1, iy1[:, :, None].expand(n, hc, size))
    left, right = ix0[:, None, :].expand(n, hc, wc), ix1[:, None, :].expand(n, hc, wc)
    wx0, wx1 = wx0[:, None, :], wx1[:, None, :]
    value = wy0[:, :, None] * (wx0 * top.gather(2, left) + wx1 * top.gather(2, right))
    value = value + wy1[:, :, None] * (wx0 * bottom.gather(2, left) + wx1 * bottom.gather(2, right))
    inside = (rows[None, :, None] < ch[:, None, None]) & (cols[None, None, :] < cw[:, None, None])
    return (value >= MASK_THRESHOLD) & inside


def _changes(binary: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, sizes: torch.Tensor):
    """Positions (Fortran order in each mask's image) where each mask changes value, sorted within each mask and
    concatenated, and how many each mask has; both int64 on the device.

    Outside its crop a mask is 0, so changes happen only down its crop's columns: between the row above the crop
    and its first row, between its rows, and between its last row and the row below. A crop as tall as the image has
    no row above or below; there the change "below" one column and the change "above" the next fall on the same
    position and cancel, which is why positions seen an even number of times are dropped (and the change below
    the image's last column falls past its end).
    """
    n, hc, wc = binary.shape
    framed = torch.zeros((n, hc + 2, wc), dtype=torch.bool, device=binary.device)
    framed[:, 1 : hc + 1] = binary
    flips = framed[:, 1:] != framed[:, :-1]  # [n, Hc + 1, Wc]: change at crop row r (r = Hc: below the crop)
    i, r, c = flips.nonzero(as_tuple=True)
    height, width = sizes[:, 0], sizes[:, 1]
    pos = (x0[i] + c) * height[i] + (y0[i] + r)
    # A change "below" the image's last pixel is past the end of the mask, not a change.
    inside = pos < height[i] * width[i]
    i, pos = i[inside], pos[inside]
    stride = int((height * width).max()) + 1
    keys, seen = torch.unique_consecutive(torch.sort(i * stride + pos).values, return_counts=True)
    keys = keys[seen % 2 == 1]
    owner = keys // stride
    lengths = torch.bincount(owner, minlength=n)
    return keys - owner * stride, lengths
