"""COCO run-length encoding without per-mask Python: run lengths of many masks at once → their compressed strings.

A COCO RLE of an `H×W` mask lists run lengths over the mask read column by column (Fortran order), starting with a
run of zeros (0 when the first pixel is set). Its compressed string (`counts` in JSON, what `pycocotools.mask.encode`
returns) stores each run length as a sequence of 5-bit groups, least significant first, each as one ASCII character
(`48 + group`, plus 32 when more groups follow); from the fourth run on, the run minus the run two before it is
stored instead, sign included (pycocotools' `rleToString`). `encode_counts` does that for all runs of many masks in
a few NumPy passes, bit-identical to pycocotools (tests/model/test_rle.py), and needs neither pycocotools nor a
loop over masks or runs: the host work left when a GPU has found the runs.
"""

from __future__ import annotations

import numpy as np

_GROUPS = 7  # 5-bit groups enough for any run of a 2^31-pixel image, and its difference from another


def encode_counts(counts: np.ndarray, lengths: np.ndarray) -> list[str]:
    """COCO compressed RLE strings of several masks.

    `counts`: int64 `[sum(lengths)]`, the masks' run lengths one mask after another; `lengths`: int `[n]`, how many
    runs each mask has. Returns n ASCII strings, equal to `pycocotools.mask.encode(...)["counts"].decode()`.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return []
    if (lengths < 1).any():
        raise ValueError("every mask has at least one run (an empty mask is one run of zeros)")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    # Position of each run within its mask: from the fourth run (index 3) on, the run minus the one two before.
    pos = np.arange(len(counts)) - np.repeat(starts, lengths)
    x = counts.copy()
    later = pos > 2
    x[later] -= counts[np.flatnonzero(later) - 2]
    chars = np.zeros((_GROUPS, len(x)), dtype=np.uint8)
    emitted = np.zeros((_GROUPS, len(x)), dtype=bool)
    active = np.ones(len(x), dtype=bool)
    for k in range(_GROUPS):
        group = x & 0x1F
        x = x >> 5  # arithmetic shift: negative differences stay negative, as in C
        more = np.where(group & 0x10, x != -1, x != 0)
        chars[k] = (group | (more << 5)) + 48
        emitted[k] = active
        active = active & more
        if not active.any():
            break
    # Characters run by run (the groups of a run in order), then cut into one string per mask.
    text = chars.T[emitted.T].tobytes().decode("ascii")
    ends = np.cumsum(emitted.sum(axis=0))[starts + lengths - 1].tolist()
    return [text[a:b] for a, b in zip([0, *ends[:-1]], ends)]


def runs_from_changes(changes: np.ndarray, lengths: np.ndarray, pixels: int) -> np.ndarray:
    """Run lengths from the positions where masks change value.

    `changes`: int64, for each mask in turn the sorted Fortran-order positions `p` where pixel `p` differs from pixel
    `p - 1` (pixel `-1` counting as 0), `lengths[i]` of them for mask i; `pixels` = H·W. Returns the run lengths,
    mask after mask: `lengths[i] + 1` runs for mask i (`[p1, p2 - p1, ..., pixels - pk]`).
    """
    changes = np.asarray(changes, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    # Each mask's positions framed by 0 before and `pixels` after; runs are the gaps.
    framed_len = lengths + 2
    framed = np.empty(int(framed_len.sum()), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(framed_len)[:-1]]) if n else np.zeros(0, np.int64)
    framed[starts] = 0
    framed[starts + framed_len - 1] = pixels
    inner = np.ones(len(framed), dtype=bool)
    inner[starts] = False
    inner[starts + framed_len - 1] = False
    framed[inner] = changes
    gaps = np.diff(framed)
    # Drop the gap between one mask's end and the next mask's start.
    keep = np.ones(len(gaps), dtype=bool)
    keep[(starts + framed_len - 1)[:-1]] = False
    return gaps[keep]
