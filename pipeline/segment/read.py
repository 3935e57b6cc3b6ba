"""Read: a work unit's inputs as bytes, then decoded, ahead of the model and off its thread.

Runs inside the inference actor. `decoded_inputs(unit, ...)` yields one `Decoded` per input of the unit, in the
unit's order, while `io_threads` threads fetch and decode the next ones: object-store reads take tens of
milliseconds each and need many in flight, and PIL decodes with the GIL released, so neither holds up the model
on the actor's main thread. At most `depth` inputs are fetched or decoded ahead, and their pixels are bounded in
bytes by the actor's `pipeline.segment.memory.ImageMemory` (a decode reserves its cost before it starts). An image
far larger than the model's input is shrunk to it here, in 8 bits (`model.resize.shrink_for_model`), so its
full-resolution pixels live only for the moment of its decode.

Per-input failures are data, never exceptions: a read that fails after retries, bytes that are not an image, an
image too thin for the model's sizes each become a `Decoded` with `error` set (and the same reasons as the
`images.error` column documents). A unit whose list cannot be read at all (storage down) raises.
"""

from __future__ import annotations

import dataclasses
import datetime
import queue
import tarfile
import threading
import time
from collections.abc import Callable, Iterator

import fsspec
import numpy as np
import torch

from model.decode import DecodeError, decode_image
from model.resize import shrink_for_model
from pipeline import retry
from pipeline.errors import describe_storage_error
from pipeline.segment.memory import DECODE_BYTES_PER_PIXEL, ImageMemory, UnitMemory
from pipeline.segment.naming import is_image_name, member_uri, read_member, split_tar_member
from pipeline.segment.units import Kind, Unit, read_unit_list


@dataclasses.dataclass
class Decoded:
    """One input of a unit, read and decoded (or the reason it could not be)."""

    index: int  # position within the unit
    image_uri: str
    image: np.ndarray | torch.Tensor | None = None  # RGB uint8 [H, W, 3], upright (a pinned tensor for GPUs)
    error: str | None = None
    # The input's own `images` columns, by name (`pipeline.segment.schema.INPUT_COLUMNS`): bytes, source_version,
    # decode_ms, height, width. A column added to the schema is filled here, where its value is known.
    columns: dict = dataclasses.field(default_factory=dict)
    # The bytes of `image` counted against the actor's memory budget, returned by `drop_image`.
    reserved: int = 0
    # The unit's share of the budget (not a field: `dataclasses.asdict` and comparisons leave it out).
    memory = None  # UnitMemory | None

    def drop_image(self) -> None:
        """The pixels are done with: free them and return their bytes to the budget."""
        self.image = None
        if self.memory is not None:
            self.memory.release(self.reserved)
        self.reserved = 0

    @property
    def height(self) -> int | None:
        return self.columns.get("height")

    @property
    def width(self) -> int | None:
        return self.columns.get("width")


def object_version(info: dict) -> str | None:
    """An object's identity as its store reports it (`fs.info`): `etag=<ETag>` where there is one (S3 and other
    object stores), else `size=<bytes> mtime=<ISO-8601 UTC>` (local files)."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag={etag}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if isinstance(mtime, (int, float)):
        mtime = (
            datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc).isoformat().replace("+00:00", "Z")
        )
    elif isinstance(mtime, datetime.datetime):
        mtime = mtime.astimezone(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
    if info.get("size") is None and mtime is None:
        return None
    return f"size={info.get('size')} mtime={mtime}"


def decoded_inputs(
    unit: Unit,
    *,
    input_options: dict | None = None,
    plan_options: dict | None = None,
    max_pixels: int,
    min_size: int,
    max_size: int,
    threads: int = 16,
    depth: int | None = None,
    pin_memory: bool = False,
    memory: UnitMemory | None = None,
) -> Iterator[Decoded]:
    """The unit's inputs, decoded, in order; `threads` fetch and decode ahead, at most `depth` (default
    `2 * threads`) inputs in flight and their pixels within `memory` (default: no byte bound). `pin_memory`: images
    up to `PIN_MAX_BYTES` come as page-locked uint8 tensors (for a GPU, which copies them without staging; the copy
    into pinned memory happens here, on the read threads)."""
    memory = memory or ImageMemory(1 << 62).unit()
    check = _Checks(
        max_pixels=max_pixels, min_size=min_size, max_size=max_size, pin_memory=pin_memory, memory=memory
    )
    jobs = _jobs(unit, input_options or {}, plan_options or {}, check.decode)
    for item in _run_ahead(jobs, threads=threads, depth=depth or 2 * threads):
        memory.consumed(item.index)
        yield item


def _jobs(unit: Unit, input_options: dict, plan_options: dict, finish: Callable) -> Iterator[Callable]:
    """Callables that each produce one input's result:
    `finish(index, image_uri, bytes or None, error or None, source_version or None)`."""
    if unit.kind is Kind.TARS:
        for index, image_uri, data, error, version in _tar_members(unit, input_options):
            yield lambda i=index, u=image_uri, d=data, e=error, v=version: finish(i, u, d, e, v)
    else:
        yield from _file_jobs(unit, input_options, plan_options, finish)


# --- the pipeline ----------------------------------------------------------------------------------------------------

_END = object()


def _run_ahead(jobs: Iterator[Callable[[], Decoded]], *, threads: int, depth: int) -> Iterator[Decoded]:
    """Run `jobs` on a thread pool, yielding their results in order with at most `depth` in flight.

    The `jobs` iterator itself runs on a producer thread, because producing a job may mean reading (a tar shard is
    read member by member); the consumer only waits for results. An exception in the producer or in a job is
    raised to the consumer; a consumer that stops early stops the producer.
    """
    pool = _pool(threads)
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for job in jobs:
                item = pool.submit(job)
                while not stop.is_set():
                    try:
                        slots.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(_END)
        except BaseException as e:  # noqa: BLE001  (handed to the consumer, which raises it)
            slots.put(e)

    producer = threading.Thread(target=produce, name="read-ahead", daemon=True)
    producer.start()
    try:
        while True:
            item = slots.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item.result()
    finally:
        stop.set()
        while producer.is_alive():  # drain so a blocked producer sees the stop
            try:
                slots.get(timeout=0.05)
            except queue.Empty:
                pass
        pool.shutdown(wait=True, cancel_futures=True)


def _pool(threads: int):
    import concurrent.futures

    return concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="read")


# Images up to this size are pinned for a GPU. Larger ones stay in pageable memory: torch's caching host allocator
# rounds a pinned block up to a power of two and keeps it for the life of the process (a 300 MB photo would hold
# 512 MB of page-locked memory for good), and the copy of a rare huge image gains little from pinning.
PIN_MAX_BYTES = 64 << 20


def pin(image: np.ndarray) -> np.ndarray | torch.Tensor:
    """`image` as a page-locked tensor where that is worth it and possible; the array itself otherwise. A failed
    pin (page-locked memory is a limited resource of the node: `cudaHostAlloc` fails with a plain `RuntimeError`)
    falls back to pageable memory: slower to copy, never a failed unit."""
    if image.nbytes > PIN_MAX_BYTES:
        return image
    try:
        return torch.from_numpy(image).pin_memory()
    except RuntimeError:
        return image


@dataclasses.dataclass(frozen=True)
class _Checks:
    max_pixels: int
    min_size: int
    max_size: int
    pin_memory: bool = False
    memory: UnitMemory | None = None

    def decode(
        self,
        index: int,
        image_uri: str,
        data: bytes | None,
        read_error: str | None,
        version: str | None = None,
    ) -> Decoded:
        """Bytes (or the reason there are none) → `Decoded`."""
        if read_error is not None:
            return Decoded(index, image_uri, error=read_error, columns={"source_version": version})
        item = Decoded(index, image_uri, columns={"bytes": len(data), "source_version": version})
        item.memory = self.memory
        reserved = 0

        def reserve(width: int, height: int) -> None:
            nonlocal reserved
            nbytes = width * height * DECODE_BYTES_PER_PIXEL
            self.memory.reserve(index, nbytes)
            reserved = nbytes

        t0 = time.perf_counter()
        try:
            try:
                image = decode_image(data, max_pixels=self.max_pixels, before_pixels=reserve)
            except DecodeError as e:
                item.error = e.reason
                return item
            finally:
                item.columns["decode_ms"] = (time.perf_counter() - t0) * 1e3
            del data  # the encoded bytes are no longer needed
            item.columns.update(height=int(image.shape[0]), width=int(image.shape[1]))
            item.error = too_thin(item.height, item.width, self.min_size, self.max_size)
            if item.error is None:
                image = shrink_for_model(image, min_size=self.min_size, max_size=self.max_size)
                item.image = pin(image) if self.pin_memory else image
                item.reserved = min(image.nbytes, reserved)
        finally:
            self.memory.release(reserved - item.reserved)  # keep only what is handed on
        return item


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


# --- loose files -----------------------------------------------------------------------------------------------------


def _file_jobs(unit: Unit, input_options: dict, plan_options: dict, finish: Callable) -> Iterator[Callable]:
    entries = read_unit_list(unit, plan_options=plan_options)
    filesystems: dict[str, object] = {}
    lock = threading.Lock()

    def fs_for(url: str):
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        with lock:
            if protocol not in filesystems:
                filesystems[protocol] = fsspec.core.url_to_fs(url, **input_options)[0]
            return filesystems[protocol]

    def job(index: int, read_url: str, image_uri: str) -> Decoded:
        member = split_tar_member(read_url)
        fs = fs_for(member[0] if member else read_url)
        try:
            # Retried on transient errors (throttling, 5xx, a dropped connection or a body cut short: see
            # `pipeline.retry`), so that a storage hiccup does not become a permanent `read failed` row.
            if member:
                data, version = retry.call(_read_member, fs, fs._strip_protocol(member[0]), member[1])
            else:
                data, version = _read_object(fs, fs._strip_protocol(read_url))
        except Exception as e:  # per input: becomes that input's error row
            return finish(index, image_uri, None, f"read failed: {describe_storage_error(image_uri, e)}")
        return finish(index, image_uri, bytes(data), None, version)

    for index, (read_url, image_uri) in enumerate(entries):
        yield lambda i=index, r=read_url, u=image_uri: job(i, r, u)


def _read_object(fs, path: str) -> tuple[bytes, str | None]:
    """An object's bytes and its identity (`object_version`) as of the same moment: its metadata (one HEAD on an
    object store), then exactly that many bytes (one ranged GET). A plain `cat_file` would ask for the size itself
    (s3fs does, to decide on a concurrent download), so this costs no request more than it."""
    info = retry.call(fs.info, path)
    size = info.get("size")
    if size == 0:
        return b"", object_version(info)
    data = (
        retry.call(fs.cat_file, path, start=0, end=size)
        if size is not None
        else retry.call(fs.cat_file, path)
    )
    return data, object_version(info)


def _read_member(fs, shard_path: str, member: str) -> tuple[bytes, str | None]:
    """One member of a shard (named on its own by a manifest: the shard is scanned up to it) and the shard's
    identity."""
    with fs.open(shard_path, "rb") as f:
        return read_member(f, member), object_version(getattr(f, "details", None) or fs.info(shard_path))


# --- tar shards ------------------------------------------------------------------------------------------------------


class _TransientTarError(Exception):
    """A shard read that failed on a transient storage error: `_tar_members` starts the shard again."""


def _tar_members(unit: Unit, opts: dict) -> Iterator[tuple[int, str, bytes | None, str | None, str | None]]:
    """`(index, image_uri, bytes or None, read error or None, the shard's version)` per image member; a transient storage error
    mid-shard (see `pipeline.retry`) re-reads the shard from the start, skipping the members already yielded (a
    tar's member order is fixed), instead of ending the shard with an error."""
    done = 0
    for attempt in range(retry.ATTEMPTS + 1):
        try:
            for item in _tar_members_once(unit, opts, retry_transient=attempt < retry.ATTEMPTS):
                if item[0] >= done:
                    done = item[0] + 1
                    yield item
            return
        except _TransientTarError:
            time.sleep(retry.delay(attempt))


def _tar_members_once(unit: Unit, opts: dict, *, retry_transient: bool) -> Iterator[tuple]:
    index = 0
    error: str | None = None
    version: str | None = None
    try:
        # Seekable mode ("r:"), not stream mode: fsspec files seek (s3fs reads ahead in blocks), and a known
        # size lets us tell a clean end of archive from a truncated one, which tarfile treats the same.
        shard = fsspec.open(unit.location, "rb", **opts)
        with shard as f, tarfile.open(fileobj=f, mode="r:") as tf:
            # An object store's file knows its object (fetched when it opened); a local one asks the filesystem.
            version = object_version(getattr(f, "details", None) or shard.fs.info(shard.path))
            for member in tf:
                if not member.isfile() or not is_image_name(member.name):
                    continue
                image_uri = member_uri(unit.shard_uri, member.name)
                try:
                    extracted = tf.extractfile(member)
                    item = (index, image_uri, extracted.read() if extracted else b"", None, version)
                except (tarfile.TarError, OSError, EOFError) as e:
                    if retry.is_transient(e):
                        raise  # a storage hiccup, not a corrupt member: handled for the whole shard below
                    item = (index, image_uri, None, f"corrupt tar member: {type(e).__name__}: {e}", version)
                    error = f"corrupt tar shard after member {member.name!r}: {type(e).__name__}: {e}"
                index += 1
                yield item
                if error:
                    break
            if error is None:
                error = _end_of_archive_problem(tf)
    except Exception as e:
        transient = retry.is_transient(e)  # also aiohttp's ClientPayloadError (a body cut short), no OSError
        if not transient and not isinstance(e, (tarfile.TarError, OSError, EOFError)):
            raise
        if transient and retry_transient:
            raise _TransientTarError from e
        error = f"corrupt or unreadable tar shard: {describe_storage_error(unit.shard_uri, e)}"
    if error or index == 0:
        # The shard itself gets a row when it ends early or holds no image: an input we could not fully read.
        yield (index, unit.shard_uri, None, error or "tar shard holds no image members", version)


def _end_of_archive_problem(tf: tarfile.TarFile) -> str | None:
    """tarfile stops silently at a truncated or corrupt header; a real archive ends with a zero block there."""
    tf.fileobj.seek(tf.offset)
    block = tf.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0"):
        return None
    what = "ends inside a header (truncated)" if len(block) < tarfile.BLOCKSIZE else "has a corrupt header"
    return f"corrupt tar shard: {what} at byte {tf.offset}"
