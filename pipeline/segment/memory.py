"""Memory: the inference actor's byte budget for decoded images.

What an actor holds at once is not its model (a few hundred MB) but pixels: images decoded ahead of the model,
images waiting in a batch, and images whose outputs are being turned into masks. Counting them would bound nothing
(one 100-megapixel photo is 300 MB decoded, 1,000 thumbnails are not), so they are counted in bytes against one
budget per actor process (`compute.image_memory_mb`, default from the node's memory per actor:
`pipeline.segment.settings.image_memory_for`), shared by the units the actor runs at once.

A read thread reserves an image's decode cost (`DECODE_BYTES_PER_PIXEL` x its header's pixels) before it decodes a
pixel, waits while the budget is spent, and keeps only what it hands on (the decoded, possibly shrunk, array); the
worker releases that when it drops the image. Two rules keep a budget from deadlocking its own unit:
- the input the unit's consumer waits for next is always admitted (images already taken into a batch cannot be
  released until the batch is complete, so the head of the line must never wait on them); so the most held is the
  budget plus one image per unit in flight;
- a unit that ends (done, failed, killed by an exception) returns everything it still holds (`UnitMemory.close`).
"""

from __future__ import annotations

import threading

# Bytes a decode holds per pixel at its peak: PIL's RGB image (stored as 4 bytes per pixel) and the NumPy copy we
# keep (3; `model.decode` copies band by band, so no third full copy). An EXIF rotation adds a second PIL image
# (4 more) for a moment, which this does not count.
DECODE_BYTES_PER_PIXEL = 7


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Make glibc's malloc serve every allocation of `threshold` bytes or more with its own mapping, returned to the
    system when freed (`mallopt(M_MMAP_THRESHOLD)`); True where that was done (Linux with glibc).

    Decoding images on many threads allocates and frees hundreds of MB per image in blocks (PIL's are 16 MB). glibc
    raises its mmap threshold after each large free (up to 32 MB), so those blocks come to be served from per-thread
    heaps that keep the freed memory: an actor's RSS then grows far past what it holds. A fixed threshold keeps RSS
    at what is held, for the cost of one mapping per large allocation (small beside decoding it).
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # not glibc (e.g. musl): its own behaviour stands
        return False


M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>


class Stopped(Exception):
    """Raised in a read thread waiting for memory when its unit has ended: the read is abandoned."""


class ImageMemory:
    """One actor's budget of decoded-image bytes (thread-safe). `peak` is the most held at once."""

    def __init__(self, limit_bytes: int):
        self.limit = int(limit_bytes)
        self.held = 0
        self.peak = 0
        self._cv = threading.Condition()

    def unit(self) -> UnitMemory:
        return UnitMemory(self)


class UnitMemory:
    """One unit's share of an `ImageMemory`: what it holds, and which of its inputs its consumer wants next."""

    def __init__(self, memory: ImageMemory):
        self.memory = memory
        self.held = 0
        self.next_index = 0
        self.closed = False

    def reserve(self, index: int, nbytes: int) -> None:
        """Take `nbytes` for input `index`, waiting while the budget is spent (unless `index` is the one the consumer
        waits for). Raises `Stopped` if the unit ends meanwhile."""
        m = self.memory
        with m._cv:
            while not self.closed and m.held > 0 and m.held + nbytes > m.limit and index != self.next_index:
                m._cv.wait(timeout=0.5)
            if self.closed:
                raise Stopped
            m.held += nbytes
            self.held += nbytes
            m.peak = max(m.peak, m.held)

    def release(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        m = self.memory
        with m._cv:
            nbytes = min(nbytes, self.held)
            m.held -= nbytes
            self.held -= nbytes
            m._cv.notify_all()

    def consumed(self, index: int) -> None:
        """The consumer has taken input `index`: the next one is now the head of the line."""
        m = self.memory
        with m._cv:
            self.next_index = index + 1
            m._cv.notify_all()

    def close(self) -> None:
        """The unit has ended: return all it holds and stop its waiting reads."""
        m = self.memory
        with m._cv:
            m.held -= self.held
            self.held = 0
            self.closed = True
            m._cv.notify_all()

    def __enter__(self) -> UnitMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
