"""The inference actor: one work unit per call — read → decode → infer → write — returning the unit's counts.

Under Ray Data it is the class given to `map_batches` on an actor pool, one instance per actor (per GPU). Callable
without Ray on a `units_table(...)` or one `Unit` at a time (`process`), which is how the tests drive it. Work overlaps on threads:
`pipeline.segment.read` fetches and decodes the next inputs on `io_threads` threads; the main thread runs the model
forward on a batch; on a GPU, one post-processing thread turns the previous batch's outputs into masks and RLE
strings and hands every row to the unit's writer, in input order.

The actor writes the unit's files itself (`pipeline.segment.writer.UnitWriter`), so rows never travel to the
driver: it returns one small row of counts per unit.

Per-image failures follow the named policy `settings.on_image_error` (`pipeline.segment.settings.ERROR_POLICIES`).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa

from pipeline.segment.infer import Segmenter
from pipeline.segment.read import Decoded, decoded_inputs
from pipeline.segment.settings import WorkerSettings
from pipeline.segment.storage import Output
from pipeline.segment.units import Unit, UnitStats, stats_table, units_from_table
from pipeline.segment.writer import UnitWriter


class ImageError(RuntimeError):
    """Raised under the `"raise"` policy; names the input."""


class SegmentWorker:
    def __init__(self, settings: WorkerSettings):
        self.settings = settings
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

    def __call__(self, batch: pa.Table) -> pa.Table:
        """`UNIT_SCHEMA` rows → one `STATS_SCHEMA` row per unit, once it is committed."""
        return stats_table([self.process(u) for u in units_from_table(batch)])

    def process(self, unit: Unit) -> UnitStats:
        """Segment every input of `unit` and commit its files; returns the unit's counts."""
        s = self.settings
        writer = UnitWriter(
            self.output,
            unit.unit_id,
            model_id=s.spec.model_id,
            run_id=s.run_id,
            class_names=list(s.spec.class_names),
        )
        inputs = decoded_inputs(
            unit,
            input_options=s.input_options,
            plan_options=s.output_options,
            max_pixels=s.max_pixels,
            min_size=s.spec.min_size,
            max_size=s.spec.max_size,
            threads=s.io_threads,
            depth=max(2 * s.io_threads, 2 * s.batch_size),
            pin_memory=self.segmenter.device.type == "cuda",
        )
        # On a GPU, one post-processing thread: the model (main thread) goes on with the next batch while the last
        # one is turned into masks and strings, and rows reach the writer in the order they were submitted. On a CPU
        # both would share the same cores (and the GIL) for nothing: measured 11% slower on 2 cores
        # (bench/scale.py), so there everything runs here, in order.
        with ThreadPoolExecutor(1, thread_name_prefix="post") if self.overlap else _Inline() as post:
            pending: list[Future] = []
            batch: list[Decoded] = []
            for item in inputs:
                if item.error is not None:
                    pending.append(post.submit(self._fail, writer, item, item.error))
                else:
                    batch.append(item)
                if len(batch) >= s.batch_size:
                    pending.append(self._infer(post, writer, batch))
                    batch = []
                pending = _raise_done(pending)
            if batch:
                pending.append(self._infer(post, writer, batch))
            for f in pending:
                f.result()  # a policy error or a writer failure surfaces here, in input order
        return writer.commit()

    def _infer(self, post: ThreadPoolExecutor, writer: UnitWriter, batch: list[Decoded]) -> Future:
        """The forward pass here; masks, strings and rows on the post thread (a batch that breaks the forward pass,
        e.g. out of memory on a huge image, is retried there image by image)."""
        t0 = time.perf_counter()
        try:
            outputs = self.segmenter.forward([item.image for item in batch])
        except Exception:
            return post.submit(self._isolate, writer, batch)
        return post.submit(self._finish, writer, batch, outputs, time.perf_counter() - t0)

    def _finish(self, writer: UnitWriter, batch: list[Decoded], outputs, forward_s: float) -> None:
        t0 = time.perf_counter()
        try:
            results = self.segmenter.detections(outputs, [(item.height, item.width) for item in batch])
        except Exception:
            return self._isolate(writer, batch)
        share_ms = (forward_s + time.perf_counter() - t0) * 1e3 / len(batch)
        self._record(writer, batch, results, share_ms)

    def _isolate(self, writer: UnitWriter, batch: list[Decoded]) -> None:
        t0 = time.perf_counter()
        results = self.segmenter.predict_each([item.image for item in batch])
        self._record(writer, batch, results, (time.perf_counter() - t0) * 1e3 / len(batch))

    def _record(self, writer: UnitWriter, batch: list[Decoded], results: list, share_ms: float) -> None:
        for item, result in zip(batch, results):
            item.image = None  # the pixels are done with; the unit's writer keeps only results
            if isinstance(result, Exception):
                self._fail(
                    writer, item, f"inference failed: {type(result).__name__}: {result}", infer_ms=share_ms
                )
            else:
                _add(writer, item, infer_ms=share_ms, detections=result)

    def _fail(self, writer: UnitWriter, item: Decoded, reason: str, *, infer_ms: float | None = None) -> None:
        if self.settings.on_image_error == "raise":
            raise ImageError(f"{item.image_uri}: {reason}")
        _add(writer, item, infer_ms=infer_ms, error=reason)


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


def _raise_done(pending: list[Future]) -> list[Future]:
    """The futures still running; a finished one that failed raises now (the "raise" policy, a writer error)."""
    left = []
    for f in pending:
        if f.done():
            f.result()
        else:
            left.append(f)
    return left


def _add(writer: UnitWriter, item: Decoded, **outcome) -> None:
    writer.add(item.index, item.image_uri, **item.columns, **outcome)
