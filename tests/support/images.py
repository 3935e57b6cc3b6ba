"""Small encoded inputs for tests: random-noise JPEGs, PNGs of given arrays, `.tar` shards."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def jpeg_bytes(h: int = 72, w: int = 96, seed: int = 0, **save) -> bytes:
    """A JPEG of uniform random RGB noise, `h`×`w` pixels; `save` goes to PIL's `Image.save`."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **save)
    return buf.getvalue()


def png_bytes(arr: np.ndarray, mode: str | None = None, **save) -> bytes:
    """A PNG of `arr` (`[H, W]` or `[H, W, C]`, read as PIL's `mode` where given); `save` goes to `Image.save`."""
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG", **save)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """A `.tar` shard (WebDataset style) holding `members` (name → bytes), in that order."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()
