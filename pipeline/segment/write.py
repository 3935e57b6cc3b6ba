"""Write: what appears under `--output`, written by the inference actors unit by unit, and what a re-run reads.

    <output>/
      images/part-<unit>.parquet       one file per work unit   (IMAGES_SCHEMA)
      detections/part-<unit>.parquet   one file per work unit   (DETECTIONS_SCHEMA)
      _committed/<unit>.json           the unit's completion record (its counts), written after both data files
      _stats/<run>-<seq>.json          completion records rolled up by the driver: what summaries are made from
      _plan/                           the work units (see `pipeline.segment.plan`)
      _config.json                     resolved config (credentials redacted), model id, fingerprint
      _lease.json                      the live run's lease (see `pipeline.segment.lease`)
      _SUCCESS.json                    written last, only when every unit is committed: the run's summary

Exactly once: file names derive from the unit id, so a unit written twice (a retried task, a re-run after a crash)
replaces its files instead of adding rows, and only a completion record says a unit is done. A data file never
appears half-written at its final name: local files are written to a hidden temporary name and renamed (atomic on
POSIX); object stores (S3) publish an object only when its upload completes. A unit's rows are encoded in memory
(Parquet, zstd, row groups of up to `ROW_GROUP_ROWS`) and uploaded when the unit ends, so a writer killed at any
moment leaves at most data files without a record, which a re-run rewrites. Readers (pyarrow, DuckDB, pandas) skip
names starting with `_` or `.`, so the bookkeeping never mixes with the data.

A re-run learns what is done from one listing of `_committed/` (names, not contents) and the few `_stats/` files;
it reads a completion record only for units committed after the last roll-up (a driver killed in between).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import posixpath
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import retry
from pipeline.errors import JobError, describe_storage_error
from pipeline.segment.schema import (
    COMMITTED_DIR,
    CONFIG_FILE,
    DETECTIONS_DIR,
    DETECTIONS_SCHEMA,
    IMAGES_DIR,
    IMAGES_SCHEMA,
    PLAN_DIR,
    STATS_DIR,
    STATUS_ERROR,
    STATUS_OK,
    SUCCESS_FILE,
)

if TYPE_CHECKING:  # torch stays out of the readers' imports (jobs/query.py starts in well under a second)
    from model.postprocess import Detections

# What `output.mode=overwrite` removes (never the lease, which the run holds while it clears).
OWNED = (IMAGES_DIR, DETECTIONS_DIR, COMMITTED_DIR, STATS_DIR, PLAN_DIR, CONFIG_FILE, SUCCESS_FILE)
# Rows per Parquet row group: large enough for scan engines (DuckDB parallelises by row group), small enough that
# one unit's Arrow buffers stay small before they are encoded.
ROW_GROUP_ROWS = 131_072


class Output:
    """The output location: a local folder or an fsspec prefix."""

    def __init__(self, url: str, *, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        # No listings cache: other processes (the actors) write here, so a cached listing would be stale.
        self.fs, self.root = fsspec.core.url_to_fs(self.url, use_listings_cache=False, **self.storage_options)
        self.local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url_of(self, *parts: str) -> str:
        """A URL workers can open (absolute path for local outputs)."""
        p = self.path(*parts)
        return p if self.local else self.fs.unstrip_protocol(p)

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
        else:
            try:
                self._io(rel, self.fs.pipe_file, target, data)
            except FileNotFoundError as e:  # a write that finds no bucket is a failure like any other
                raise JobError(f"output: {describe_storage_error(self.url_of(rel), e)}") from None

    def write_all(self, files: dict[str, bytes]) -> None:
        """Write several files; on object stores concurrently (one round trip, not one per file)."""
        if self.local or len(files) == 1:
            for rel, data in files.items():
                self.write_bytes(rel, data)
            return
        first = next(iter(files))
        try:
            self._io(first, self.fs.pipe, {self.path(rel): data for rel, data in files.items()})
        except FileNotFoundError as e:
            raise JobError(f"output: {describe_storage_error(self.url_of(first), e)}") from None

    def write_json(self, rel: str, obj: dict) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))

    def read_json(self, rel: str) -> dict | None:
        try:
            return json.loads(self._io(rel, self.fs.cat_file, self.path(rel)))
        except FileNotFoundError:
            return None

    def read_many(self, rels: list[str]) -> Iterator[tuple[str, bytes]]:
        """`(rel, bytes)` of each file, fetched `chunk` at a time (concurrently on object stores)."""
        chunk = 256
        for start in range(0, len(rels), chunk):
            names = rels[start : start + chunk]
            paths = [self.path(r) for r in names]
            got = (
                self._io(names[0], self.fs.cat, paths)
                if len(paths) > 1
                else {paths[0]: self._io(names[0], self.fs.cat_file, paths[0])}
            )
            for rel, p in zip(names, paths):
                yield rel, got[p]

    def exists(self, rel: str) -> bool:
        return self._io(rel, self.fs.exists, self.path(rel))

    def names(self, rel: str) -> list[str]:
        """Names (not paths) of the files directly under `rel`; [] when it does not exist."""
        try:
            found = self._io(rel, self.fs.ls, self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return [posixpath.basename(p.rstrip("/")) for p in found]

    def clear(self) -> None:
        """Remove what a previous run wrote here (only the names this job owns)."""
        for name in OWNED:
            if self.exists(name):
                self._io(name, self.fs.rm, self.path(name), recursive=True)

    def remove_stale_temporaries(self) -> int:
        """Delete the hidden `.<name>.<hex>.tmp` files that a process killed mid-write left in a local output (object
        stores publish nothing until an upload completes). Readers already skip them; this reclaims the space, and
        is safe because the run holds the output's lease. Returns how many were removed."""
        if not self.local:
            return 0
        removed = 0
        for folder in ("", IMAGES_DIR, DETECTIONS_DIR, COMMITTED_DIR, STATS_DIR, PLAN_DIR):
            d = self.path(folder)
            for name in os.listdir(d) if os.path.isdir(d) else []:
                if name.startswith(".") and name.endswith(".tmp"):
                    os.remove(os.path.join(d, name))
                    removed += 1
        return removed

    def ensure_writable(self) -> None:
        """Local: create the folder. Object stores have no folders, and a bucket that does not exist is an error to
        report, not one to create (fsspec's makedirs would create it: a typo in --output would become a new bucket);
        the first write then fails with "bucket does not exist"."""
        if self.local:
            self.fs.makedirs(self.root, exist_ok=True)

    def _io(self, rel: str, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` on the store, retried on transient errors (`pipeline.retry`). A permanent failure is
        a `JobError` naming the URL and the cause; `FileNotFoundError` passes through (callers decide what absent
        means)."""
        try:
            return retry.call(fn, *args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise JobError(f"output: {describe_storage_error(self.url_of(rel), e)}") from None


# --- a unit's statistics ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class UnitStats:
    """What a unit's completion record says: counts only (the driver never sees rows)."""

    unit_id: str
    images: int
    ok: int
    errors: int
    detections: int
    labels: dict[str, int]
    error_reasons: dict[str, int]


STATS_SCHEMA = pa.schema(
    [
        ("unit_id", pa.string()),
        ("images", pa.int64()),
        ("ok", pa.int64()),
        ("errors", pa.int64()),
        ("detections", pa.int64()),
        ("labels", pa.string()),  # JSON object: label name -> count
        ("error_reasons", pa.string()),  # JSON object: reason kind -> count
    ]
)


def stats_table(stats: list[UnitStats]) -> pa.Table:
    """Units' stats as the Arrow rows the actors hand to Ray Data (one row per unit)."""
    rows = [
        {
            **dataclasses.asdict(s),
            "labels": json.dumps(s.labels),
            "error_reasons": json.dumps(s.error_reasons),
        }
        for s in stats
    ]
    return pa.Table.from_pylist(rows, schema=STATS_SCHEMA)


def stats_from_row(row: dict) -> UnitStats:
    return UnitStats(
        **{**row, "labels": json.loads(row["labels"]), "error_reasons": json.loads(row["error_reasons"])}
    )


def reason_kind(error: str) -> str:
    """Group error reasons for the summary: the text before the first ':' ("not an image", "read failed", ...)."""
    return error.split(":", 1)[0]


# --- one unit's files ------------------------------------------------------------------------------------------------


class UnitWriter:
    """Collects one unit's rows column by column and writes its two data files, then its completion record.

    `add(...)` takes each input once (in any order: rows are sorted by position at each row group); `commit()`
    encodes and uploads `images/` and `detections/` (together), then writes `_committed/<unit>.json` and returns
    the stats.
    Nothing reaches storage before `commit()`, so an abandoned writer (an exception, a killed process) leaves no
    trace that a re-run could trust.
    """

    def __init__(self, output: Output, unit_id: str, *, model_id: str, run_id: str, class_names: list[str]):
        self.output, self.unit_id = output, unit_id
        self.model_id, self.run_id = model_id, run_id
        self._names = np.array(list(class_names), dtype=object)
        self._images: dict[str, list] = {name: [] for name in _IMAGE_COLUMNS}
        self._order: list[int] = []
        self._dets: list[tuple[str, int, int, Detections]] = []  # (image_uri, height, width, detections)
        self._det_rows = 0
        self._files = {
            IMAGES_DIR: _ParquetBuffer(IMAGES_SCHEMA),
            DETECTIONS_DIR: _ParquetBuffer(DETECTIONS_SCHEMA),
        }
        self.images = self.ok = self.detections = 0
        self.labels: Counter = Counter()
        self.error_reasons: Counter = Counter()

    def add(
        self,
        index: int,
        image_uri: str,
        *,
        nbytes: int | None,
        height: int | None = None,
        width: int | None = None,
        decode_ms: float | None = None,
        infer_ms: float | None = None,
        detections: Detections | None = None,
        error: str | None = None,
    ) -> None:
        """One input: its detections (status ok), or the reason it has none (status error)."""
        n = 0 if detections is None else len(detections)
        values = (image_uri, STATUS_OK if error is None else STATUS_ERROR, error, height, width, n, nbytes)
        for name, value in zip(_IMAGE_COLUMNS, (*values, decode_ms, infer_ms)):
            self._images[name].append(value)
        self._order.append(index)
        self.images += 1
        if error is not None:
            self.error_reasons[reason_kind(error)] += 1
            return
        self.ok += 1
        if n:
            self._dets.append((image_uri, int(height), int(width), detections))
            self._det_rows += n
            self.detections += n
            values, counts = np.unique(detections.labels, return_counts=True)
            for label, count in zip(values.tolist(), counts.tolist()):
                self.labels[self._label_name(label)] += count
            if self._det_rows >= ROW_GROUP_ROWS:
                self._flush_detections()
        if len(self._order) >= ROW_GROUP_ROWS:
            self._flush_images()

    def commit(self) -> UnitStats:
        self._flush_images()
        self._flush_detections()
        name = f"part-{self.unit_id}.parquet"
        self.output.write_all(
            {
                posixpath.join(folder, name): self._files[folder].close()
                for folder in (IMAGES_DIR, DETECTIONS_DIR)
            }
        )
        stats = UnitStats(
            unit_id=self.unit_id,
            images=self.images,
            ok=self.ok,
            errors=self.images - self.ok,
            detections=self.detections,
            labels=dict(self.labels),
            error_reasons=dict(self.error_reasons),
        )
        # Written last: its presence is what says "this unit's rows are complete" to a re-run.
        self.output.write_json(
            posixpath.join(COMMITTED_DIR, f"{self.unit_id}.json"), dataclasses.asdict(stats)
        )
        return stats

    def _label_name(self, label: int) -> str:
        return self._names[label] if 0 <= label < len(self._names) else str(label)

    def _flush_images(self) -> None:
        if not self._order:
            return
        order = np.argsort(np.array(self._order), kind="stable")
        n = len(order)
        cols = {
            name: pa.array([values[i] for i in order], IMAGES_SCHEMA.field(name).type)
            for name, values in self._images.items()
        }
        cols["unit_id"] = pa.repeat(pa.scalar(self.unit_id, pa.string()), n)
        cols["model_id"] = pa.repeat(pa.scalar(self.model_id, pa.string()), n)
        cols["run_id"] = pa.repeat(pa.scalar(self.run_id, pa.string()), n)
        self._files[IMAGES_DIR].write(pa.table(cols).select(IMAGES_SCHEMA.names).cast(IMAGES_SCHEMA))
        self._images = {name: [] for name in _IMAGE_COLUMNS}
        self._order = []

    def _flush_detections(self) -> None:
        if not self._dets:
            return
        self._files[DETECTIONS_DIR].write(
            detections_table(self._dets, self._names, self.model_id, self.run_id)
        )
        self._dets, self._det_rows = [], 0


_IMAGE_COLUMNS = (
    "image_uri",
    "status",
    "error",
    "height",
    "width",
    "num_detections",
    "bytes",
    "decode_ms",
    "infer_ms",
)


def detections_table(
    images: list[tuple[str, int, int, Detections]], class_names: np.ndarray, model_id: str, run_id: str
) -> pa.Table:
    """Detections of several images → one `DETECTIONS_SCHEMA` table, built column by column (no per-row Python
    objects: at ~12 detections per image a unit of 2,048 images is ~25,000 rows)."""
    counts = np.array([len(d) for _, _, _, d in images], dtype=np.int64)
    total = int(counts.sum())
    labels = np.concatenate([d.labels for _, _, _, d in images]).astype(np.int64)
    in_range = (labels >= 0) & (labels < len(class_names))
    names = np.where(
        in_range, class_names[np.clip(labels, 0, max(len(class_names) - 1, 0))], labels.astype(str)
    )
    boxes = np.concatenate([d.boxes_xywh for _, _, _, d in images]).astype(np.float32).reshape(-1)
    sizes = np.repeat(np.array([[h, w] for _, h, w, _ in images], dtype=np.int32), counts, axis=0).reshape(-1)
    four = np.arange(0, 4 * total + 1, 4, dtype=np.int32)
    two = np.arange(0, 2 * total + 1, 2, dtype=np.int32)
    mask = pa.StructArray.from_arrays(
        [
            pa.ListArray.from_arrays(two, pa.array(sizes, pa.int32())),
            pa.array([r["counts"] for _, _, _, d in images for r in d.rles], pa.string()),
        ],
        names=["size", "counts"],
    )
    columns = {
        "image_uri": pa.array(
            np.repeat(np.array([u for u, _, _, _ in images], dtype=object), counts), pa.string()
        ),
        "instance": pa.array(np.concatenate([np.arange(n, dtype=np.int32) for n in counts]), pa.int32()),
        "label": pa.array(labels.astype(np.int32), pa.int32()),
        "label_name": pa.array(names.astype(object), pa.string()),
        "score": pa.array(
            np.concatenate([d.scores for _, _, _, d in images]).astype(np.float32), pa.float32()
        ),
        "bbox": pa.ListArray.from_arrays(four, pa.array(boxes, pa.float32())),
        "area": pa.array(np.concatenate([d.areas for _, _, _, d in images]).astype(np.int64), pa.int64()),
        "mask": mask,
        "model_id": pa.repeat(pa.scalar(model_id, pa.string()), total),
        "run_id": pa.repeat(pa.scalar(run_id, pa.string()), total),
    }
    return pa.table(columns).cast(DETECTIONS_SCHEMA)


def parquet_bytes(table: pa.Table) -> bytes:
    """`table` as the bytes of one Parquet file, encoded as the job encodes its data files."""
    buf = _ParquetBuffer(table.schema)
    buf.write(table)
    return buf.close()


class _ParquetBuffer:
    """A Parquet file encoded into memory, row group by row group; `close()` returns its bytes (a valid, empty
    file when nothing was written)."""

    def __init__(self, schema: pa.Schema):
        self._buf = io.BytesIO()
        self._writer = pq.ParquetWriter(self._buf, schema, compression="zstd")

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)

    def close(self) -> bytes:
        self._writer.close()
        return self._buf.getvalue()


# --- the driver's roll-ups of completion records ----------------------------------------------------------------------


class StatsLog:
    """The driver's record of units committed in this run, rolled up into `_stats/<run>-<seq>.json` every
    `every_units` units or `every_s` seconds (and by `flush()`), so that a re-run or a summary reads a few files
    instead of one completion record per unit."""

    def __init__(self, output: Output, run_id: str, *, every_units: int = 1024, every_s: float = 60.0):
        self.output, self.run_id = output, run_id
        self.every_units, self.every_s = every_units, every_s
        self._pending: list[UnitStats] = []
        self._seq = 0
        self._last = time.monotonic()

    def record(self, stats: UnitStats) -> None:
        self._pending.append(stats)
        if len(self._pending) >= self.every_units or time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        if not self._pending:
            return
        doc = {"run_id": self.run_id, "units": [dataclasses.asdict(s) for s in self._pending]}
        self.output.write_bytes(
            posixpath.join(STATS_DIR, f"{self.run_id}-{self._seq:05d}.json"), json.dumps(doc).encode("utf-8")
        )
        self._seq += 1
        self._pending = []


def committed_units(output: Output, units: int) -> np.ndarray:
    """Which of the plan's `units` have a completion record: one listing of `_committed/` (names only)."""
    done = np.zeros(units, dtype=bool)
    for name in output.names(COMMITTED_DIR):
        stem, ext = posixpath.splitext(name)
        if ext == ".json" and stem.isdigit() and int(stem) < units:
            done[int(stem)] = True
    return done


def committed_stats(output: Output, done: np.ndarray) -> Iterator[tuple[UnitStats, bool]]:
    """The stats of every done unit, once each: from the `_stats/` roll-ups, then, for units committed after the last
    roll-up, from their completion records. Yields `(stats, from_record)`; `from_record` units are not in any
    roll-up yet (the caller rolls them up, so the next re-run does not read them again)."""
    covered = np.zeros(len(done), dtype=bool)
    rollups = sorted(n for n in output.names(STATS_DIR) if n.endswith(".json") and not n.startswith("."))
    for _, blob in output.read_many([posixpath.join(STATS_DIR, n) for n in rollups]):
        for unit in json.loads(blob)["units"]:
            o = int(unit["unit_id"])
            if o < len(done) and done[o] and not covered[o]:
                covered[o] = True
                yield UnitStats(**unit), False
    missing = np.flatnonzero(done & ~covered)
    records = [posixpath.join(COMMITTED_DIR, f"{o:08d}.json") for o in missing]
    for _, blob in output.read_many(records):
        yield UnitStats(**json.loads(blob)), True
