"""Writer: one work unit's two Parquet files (`images/`, `detections/`) and its completion record, written by the
inference actor that ran the unit.

Exactly once: file names derive from the unit id, so a unit written twice (a retried task, a re-run after a crash)
replaces its files instead of adding rows, and only a completion record says a unit is done
(`pipeline.segment.ledger`). A unit's rows are encoded in memory (Parquet, zstd, row groups of up to
`ROW_GROUP_ROWS`) and published when the unit ends (`pipeline.segment.storage`: never half-written at the final
name), so a writer killed at any moment leaves at most data files without a record, which a re-run rewrites.

Columns are declared once, in `pipeline.segment.schema`, and filled by name: an input's own values (`bytes`,
`height`, `source_version`, ...) arrive as keywords named after their columns.
"""

from __future__ import annotations

import dataclasses
import io
import posixpath
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.segment.ledger import record_name
from pipeline.segment.schema import (
    DETECTIONS_DIR,
    DETECTIONS_SCHEMA,
    FILE_COLUMNS,
    IMAGES_DIR,
    IMAGES_SCHEMA,
    INPUT_COLUMNS,
    STATUS_ERROR,
    STATUS_OK,
)
from pipeline.segment.storage import Output
from pipeline.segment.units import UnitStats

if TYPE_CHECKING:  # torch stays out of the readers' imports (jobs/query.py starts in well under a second)
    from model.postprocess import Detections

# Rows per Parquet row group: large enough for scan engines (DuckDB parallelises by row group), small enough that
# one unit's Arrow buffers stay small before they are encoded.
ROW_GROUP_ROWS = 131_072


# --- one unit's files ------------------------------------------------------------------------------------------------


class UnitWriter:
    """Collects one unit's rows column by column and writes its two data files, then its completion record.

    `add(...)` takes each input once (in any order: rows are sorted by position at each row group); `commit()`
    encodes and uploads `images/` and `detections/` (together), then writes `_committed/<unit>.json` and returns
    the stats.
    Nothing reaches storage before `commit()`, so an abandoned writer (an exception, a killed process) leaves no
    trace that a re-run could trust.
    """

    def __init__(
        self,
        output: Output,
        unit_id: str,
        *,
        model_id: str,
        run_id: str,
        class_names: list[str],
        on_row: Callable[[UnitWriter], None] | None = None,
    ):
        self.output, self.unit_id = output, unit_id
        self.on_row = on_row  # called after each input's row (live progress: `pipeline.segment.live`)
        self.model_id, self.run_id = model_id, run_id
        self._names = np.array(list(class_names), dtype=object)
        self._images: dict[str, list] = {name: [] for name in _ROW_COLUMNS}
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
        detections: Detections | None = None,
        error: str | None = None,
        **values,
    ) -> None:
        """One input: its detections (status ok), or the reason it has none (status error). `values` are the
        input's own columns by name (`INPUT_COLUMNS`: `bytes`, `height`, `width`, `decode_ms`, `infer_ms`,
        `source_version`, ...); one not given is null."""
        unknown = values.keys() - INPUT_COLUMNS
        if unknown:
            raise KeyError(
                f"not images columns an input fills: {sorted(unknown)} (declared: {sorted(INPUT_COLUMNS)})"
            )
        n = 0 if detections is None else len(detections)
        row = {
            **values,
            "image_uri": image_uri,
            "status": STATUS_OK if error is None else STATUS_ERROR,
            "error": error,
            "num_detections": n,
        }
        for name, column in self._images.items():
            column.append(row.get(name))
        self._order.append(index)
        self.images += 1
        if error is not None:
            self.error_reasons[reason_kind(error)] += 1
            self._row_added()
            return
        self.ok += 1
        if n:
            height, width = values["height"], values["width"]
            self._dets.append((image_uri, int(height), int(width), detections))
            self._det_rows += n
            self.detections += n
            labels, counts = np.unique(detections.labels, return_counts=True)
            for label, count in zip(labels.tolist(), counts.tolist()):
                self.labels[self._label_name(label)] += count
            if self._det_rows >= ROW_GROUP_ROWS:
                self._flush_detections()
        if len(self._order) >= ROW_GROUP_ROWS:
            self._flush_images()
        self._row_added()

    def _row_added(self) -> None:
        if self.on_row is not None:
            self.on_row(self)

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
        self.output.write_json(record_name(self.unit_id), dataclasses.asdict(stats))
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
        self._images = {name: [] for name in _ROW_COLUMNS}
        self._order = []

    def _flush_detections(self) -> None:
        if not self._dets:
            return
        self._files[DETECTIONS_DIR].write(
            detections_table(self._dets, self._names, self.model_id, self.run_id)
        )
        self._dets, self._det_rows = [], 0


# The columns that vary per input (the unit's, model's and run's ids are the same on every row of a file).
_ROW_COLUMNS = tuple(n for n in IMAGES_SCHEMA.names if n not in FILE_COLUMNS)


def reason_kind(error: str) -> str:
    """Group error reasons for the summary: the text before the first ':' ("not an image", "read failed", ...)."""
    return error.split(":", 1)[0]


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
