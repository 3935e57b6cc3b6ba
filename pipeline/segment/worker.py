"""The inference actor: one work unit per call — read → decode → infer → write — returning the unit's counts.

Under Ray Data it is the class given to `map_batches` on an actor pool, one instance per actor (per GPU). Callable
without Ray on a `units_table(...)` or one `Unit` at a time (`process`), which is how the tests drive it. Work overlaps on threads:
`pipeline.segment.read` fetches and decodes the next inputs on `io_threads` threads; the main thread runs the model
forward on a batch; on a GPU, one post-processing thread turns the previous batch's outputs into masks and RLE
strings and hands every row to the unit's writer (rows are stored by position, whatever order they come in).

Memory is bounded in bytes, not images (`pipeline.segment.memory`): one budget per actor for every decoded image it
holds (read ahead, waiting in a batch, or being post-processed). Batches group images of one orientation
(`pipeline.segment.batching`), so a batch is not padded to a square.

No idle between units: the actor runs two units at once (Ray Data's `max_concurrent_calls_per_actor=2`, set by
`pipeline.segment.run`), and the model runs one forward pass at a time, the older unit first (`_Turn`): while unit
k drains and commits, unit k+1 has been reading and decoding and takes the model at once. Each unit is still
committed on its own, exactly once, by its own call.

While a unit runs, its counts go to the driver's progress board a few times a second (`pipeline.segment.live`).

The actor writes the unit's files itself (`pipeline.segment.writer.UnitWriter`), so rows never travel to the
driver: it returns one small row of counts per unit.

Per-image failures follow the named policy `settings.on_image_error` (`pipeline.segment.settings.ERROR_POLICIES`);
what is an image's failure and what is the device's, and what each does, is `pipeline.segment.faults`.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from pipeline.segment import faults
from pipeline.segment.batching import ShapeBatcher
from pipeline.segment.faults import DeviceFailure, UnitFaults, describe, is_device_failure
from pipeline.segment.infer import Segmenter
from pipeline.segment.live import UnitReporter
from pipeline.segment.memory import ImageMemory, return_freed_memory
from pipeline.segment.read import Decoded, decoded_inputs
from pipeline.segment.settings import WorkerSettings
from pipeline.segment.storage import Output
from pipeline.segment.units import Unit, UnitStats, stats_table, units_from_table
from pipeline.segment.writer import UnitWriter

# The exit status of an actor that ends itself after a device failure (EX_TEMPFAIL: "try again"), so that Ray
# restarts it on a fresh process and CUDA context and runs its unit again.
DEVICE_FAILURE_EXIT = 75


class ImageError(RuntimeError):
    """Raised under the `"raise"` policy; names the input."""


class SegmentWorker:
    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        return_freed_memory()  # an actor's RSS is what it holds, not what glibc kept (memory.py)
        if settings.device == "cuda":
            faults.check_cuda(memory_fraction=settings.gpu_memory_fraction)
        self.segmenter = Segmenter(
            spec=settings.spec,
            score_threshold=settings.score_threshold,
            max_detections=settings.max_detections,
            device=settings.device,
            threads=settings.threads,
            precision=settings.precision,
            mask_route=settings.mask_route,
            weights_storage_options=settings.weights_options,
        )
        self.output = Output(settings.output_url, storage_options=settings.output_options)
        overlap = settings.overlap
        self.overlap = self.segmenter.device.type == "cuda" if overlap is None else overlap
        self.passes_ok = 0  # forward passes that succeeded in this process: evidence that the device works
        self.memory = ImageMemory(settings.image_memory_bytes)
        self._turn = _Turn()
        self._order = itertools.count()  # units in the order this actor started them: the older goes first
        self._local = threading.local()  # the unit (its place in that order) this thread works for
        self._records = threading.Lock()  # a failure record is written whole before this process may end

    def __call__(self, batch: pa.Table) -> pa.Table:
        """`UNIT_SCHEMA` rows → one `STATS_SCHEMA` row per unit, once it is committed. On a device failure this
        process ends (nothing of the unit committed): Ray restarts the actor and runs the unit again."""
        try:
            return stats_table([self.process(u) for u in units_from_table(batch)])
        except DeviceFailure as e:
            with self._records:  # never while the other unit in flight is writing its own failure record
                print(
                    f"device failure, ending this actor so that Ray restarts it: {e}",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(DEVICE_FAILURE_EXIT)

    def process(self, unit: Unit) -> UnitStats:
        """Segment every input of `unit` and commit its files; returns the unit's counts. Raises `DeviceFailure`
        (after recording it in `_faults/`) when the device fails, `DeviceGaveUp` when the unit has failed it
        `faults.MAX_ATTEMPTS` times."""
        record = faults.load(self.output, unit.unit_id)
        try:
            return self._process(unit, record)
        except DeviceFailure as e:
            # Evidence against one image only when the unit ran image by image on a device proven healthy in this
            # process (a failure in a batch, or of a canary, blames no image).
            if record.isolate and e.alone is not None and e.alone >= 0 and self.passes_ok > 0:
                record.suspects[e.alone] = record.suspects.get(e.alone, 0) + 1
            record.attempts += 1
            record.last_error = str(e)
            try:
                with self._records:
                    faults.save(self.output, record)
            except Exception as save_error:  # noqa: BLE001  (the unit is retried either way; the count is lost)
                print(f"could not record the device failure: {save_error}", file=sys.stderr, flush=True)
            if record.attempts >= faults.MAX_ATTEMPTS:
                raise faults.DeviceGaveUp(
                    f"unit {unit.unit_id}: the device failed {record.attempts} times on it "
                    f"(last: {record.last_error}); committed units are kept: fix the device, then run the same "
                    "command again to resume"
                ) from None
            raise

    def _process(self, unit: Unit, record: UnitFaults) -> UnitStats:
        s = self.settings
        self._local.order = next(self._order)
        reporter = UnitReporter(s.progress_board, unit.ordinal)
        writer = UnitWriter(
            self.output,
            unit.unit_id,
            model_id=s.spec.model_id,
            run_id=s.run_id,
            class_names=list(s.spec.class_names),
            on_row=lambda w: reporter.update(w.images, w.images - w.ok, w.detections),
        )
        with self.memory.unit() as memory:
            stats = self._run(unit, record, writer, memory)
        reporter.finish()
        return stats

    def _run(self, unit: Unit, record: UnitFaults, writer: UnitWriter, memory) -> UnitStats:
        s = self.settings
        # After repeated device failures the unit runs image by image, its suspects last (after a healthy pass).
        batch_size, overlap = (1, False) if record.isolate else (s.batch_size, self.overlap)
        inputs = decoded_inputs(
            unit,
            input_options=s.input_options,
            plan_options=s.output_options,
            max_pixels=s.max_pixels,
            min_size=s.spec.min_size,
            max_size=s.spec.max_size,
            threads=s.io_threads,
            depth=max(2 * s.io_threads, 2 * batch_size),
            pin_memory=self.segmenter.device.type == "cuda",
            memory=memory,
        )
        batcher = ShapeBatcher(batch_size)
        suspects: list[Decoded] = []
        if record.isolate and self.passes_ok == 0:
            self._canary()
        # On a GPU, one post-processing thread: the model (main thread) goes on with the next batch while the last
        # one is turned into masks and strings, and rows reach the writer in the order they were submitted. On a CPU
        # both would share the same cores (and the GIL) for nothing: measured 11% slower on 2 cores
        # (bench/scale.py), so there everything runs here, in order.
        with ThreadPoolExecutor(1, thread_name_prefix="post") if overlap else _Inline() as post:
            pending: list[Future] = []
            for item in inputs:
                if item.error is not None:
                    pending.append(post.submit(self._fail, writer, item, item.error))
                elif record.blamed(item.index):
                    item.drop_image()
                    pending.append(post.submit(self._fail, writer, item, _blame(record, item.index)))
                elif record.isolate and item.index in record.suspects:
                    suspects.append(item)
                else:
                    for batch in batcher.add(item):
                        pending.append(self._infer(post, writer, batch))
                pending = self._collect(pending, writer)
            for batch in batcher.flush():
                pending.append(self._infer(post, writer, batch))
            for item in suspects:  # last: a device they fail has served the others first
                pending.append(self._infer(post, writer, [item]))
            self._collect(pending, writer, wait=True)
        return writer.commit()

    def _infer(self, post, writer: UnitWriter, batch: list[Decoded]) -> Future:
        """The forward pass here; masks, strings and rows on the post thread. A batch whose forward pass fails
        for a reason of its images (e.g. out of memory on a huge image) is run again image by image here, on the
        main thread, after the failed pass's memory is released."""
        t0 = time.perf_counter()
        message = None
        try:
            outputs = self._forward(batch)
        except DeviceFailure:
            raise
        except Exception as e:  # noqa: BLE001  (an image's failure: keep the message, not the exception)
            message = describe(e)
        if message is not None:
            self._isolate(post, writer, batch, message)
            return post.submit(lambda: None)
        return post.submit(self._finish, writer, batch, outputs, time.perf_counter() - t0)

    def _forward(self, batch: list[Decoded]):
        """`Segmenter.forward`, with a device failure turned into `DeviceFailure` (naming the image if alone)."""
        device_failure = None
        try:
            with self._turn(getattr(self._local, "order", 0)):
                outputs = self.segmenter.forward(
                    [item.image for item in batch], [(item.height, item.width) for item in batch]
                )
        except Exception as e:
            if not is_device_failure(e):
                raise
            device_failure = describe(e)
        if device_failure is not None:
            raise DeviceFailure(device_failure, alone=batch[0].index if len(batch) == 1 else None)
        self.passes_ok += 1
        return outputs

    def _detections(self, batch: list[Decoded], outputs):
        device_failure = None
        try:
            return self.segmenter.detections(outputs, [(item.height, item.width) for item in batch])
        except Exception as e:
            if not is_device_failure(e):
                raise
            device_failure = describe(e)
        raise DeviceFailure(device_failure, alone=batch[0].index if len(batch) == 1 else None)

    def _finish(self, writer: UnitWriter, batch: list[Decoded], outputs, forward_s: float) -> None:
        """On the post thread: masks and strings, then rows. An image's failure here is handed back to the main
        thread (`_NeedsIsolation`), which runs the batch again image by image."""
        t0 = time.perf_counter()
        try:
            results = self._detections(batch, outputs)
        except DeviceFailure:
            raise
        except Exception as e:  # noqa: BLE001
            raise _NeedsIsolation(batch, describe(e)) from None
        share_ms = (forward_s + time.perf_counter() - t0) * 1e3 / len(batch)
        for item, result in zip(batch, results):
            item.drop_image()  # the pixels are done with; the unit's writer keeps only results
            _add(writer, item, infer_ms=share_ms, detections=result)

    def _isolate(self, post, writer: UnitWriter, batch: list[Decoded], message: str) -> None:
        """Run `batch` again image by image on this (the main) thread, once the post thread is idle and the failed
        pass's memory is released; an image that fails alone gets an error row with its own message."""
        _drain(post)
        self._release()
        if len(batch) == 1:
            batch[0].drop_image()
            self._fail(writer, batch[0], f"inference failed: {message}")
            return
        for item in batch:
            t0 = time.perf_counter()
            failure = None
            try:
                results = self._detections([item], self._forward([item]))
            except DeviceFailure:
                raise
            except Exception as e:  # noqa: BLE001
                failure = describe(e)
            infer_ms = (time.perf_counter() - t0) * 1e3
            item.drop_image()
            if failure is None:
                _add(writer, item, infer_ms=infer_ms, detections=results[0])
            else:
                self._release()
                self._fail(writer, item, f"inference failed: {failure}", infer_ms=infer_ms)

    def _collect(self, pending: list[Future], writer: UnitWriter, *, wait: bool = False) -> list[Future]:
        """The futures still running (all done when `wait`); a finished one that failed raises now (the "raise"
        policy, a writer error, a device failure), or, for an image's failure on the post thread, has its batch
        run again image by image here."""
        left = []
        for f in pending:
            if not (wait or f.done()):
                left.append(f)
                continue
            try:
                f.result()
            except _NeedsIsolation as e:
                self._isolate(_NO_POST, writer, e.batch, e.message)
        return left

    def _canary(self) -> None:
        """One forward pass on a small blank image: proof that the device works in this process, so that a failure
        of an image run alone after it is that image's (a dead device fails the canary itself)."""
        blank = Decoded(-1, "canary", image=np.full((64, 64, 3), 114, dtype=np.uint8))
        blank.columns.update(height=64, width=64)
        self._forward([blank])

    def _release(self) -> None:
        """Free what a failed pass left (the exception is gone by now; its tensors go with it)."""
        gc.collect()
        if self.segmenter.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _fail(self, writer: UnitWriter, item: Decoded, reason: str, *, infer_ms: float | None = None) -> None:
        if self.settings.on_image_error == "raise":
            raise ImageError(f"{item.image_uri}: {reason}")
        _add(writer, item, infer_ms=infer_ms, error=reason)


class _Turn:
    """The model, one forward pass at a time, granted to the oldest unit that asks (units run two at once in an
    actor: the newer one reads ahead and uses the model only when the older one is not waiting for it)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._busy = False
        self._waiting: list[int] = []  # a heap of unit orders

    @contextlib.contextmanager
    def __call__(self, order: int):
        with self._cv:
            heapq.heappush(self._waiting, order)
            while self._busy or self._waiting[0] != order:
                self._cv.wait()
            heapq.heappop(self._waiting)
            self._busy = True
        try:
            yield
        finally:
            with self._cv:
                self._busy = False
                self._cv.notify_all()


class _NeedsIsolation(Exception):
    """Raised on the post thread: this batch's masks failed for a reason of its images; the main thread isolates."""

    def __init__(self, batch: list[Decoded], message: str):
        super().__init__(message)
        self.batch, self.message = batch, message


def _blame(record: UnitFaults, index: int) -> str:
    return (
        f"inference failed: the device failed on this image alone {record.suspects[index]} times, each after a "
        f"pass that succeeded (last: {record.last_error})"
    )


class _Inline:
    """An executor that runs each task at once on the calling thread (`submit` returns its finished future)."""

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001  (raised by the caller's f.result(), like a pool's)
            future.set_exception(e)
        return future

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc) -> None:
        pass


_NO_POST = _Inline()  # for isolating from `_collect`, which runs when the post thread has nothing pending


def _drain(post) -> None:
    """Wait until the post thread has finished what it was given (no other work on the device meanwhile)."""
    post.submit(lambda: None).result()


def _add(writer: UnitWriter, item: Decoded, **outcome) -> None:
    writer.add(item.index, item.image_uri, **item.columns, **outcome)
