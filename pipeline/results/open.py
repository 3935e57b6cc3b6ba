"""Reading a results folder back: the `images/` and `detections/` Parquet datasets a segment job wrote.

Shared by what `jobs/query.py` runs (`pipeline.results.sql`, `.summary`, `.render`, `.report`) and by
`pipeline.results.evaluate` (behind `jobs/evaluate.py`). Works on any fsspec URL (local, `s3://`): pyarrow reads the
Parquet files through the fsspec filesystem, so no DuckDB extension or AWS SDK of its own is needed. Names starting
with `_` or `.` (completion records, the plan, temporary files) are skipped, exactly as pyarrow's and DuckDB's
dataset readers skip them.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
from pycocotools import mask as mask_utils

from pipeline.errors import JobError, describe_storage_error
from pipeline.segment.schema import (
    CONFIG_FILE,
    DETECTIONS_DIR,
    DETECTIONS_SCHEMA,
    IMAGES_DIR,
    IMAGES_SCHEMA,
    SUCCESS_FILE,
)


@dataclasses.dataclass
class Results:
    """An opened results folder. Tables are read lazily through `dataset(name)`; `table(name)` loads one whole."""

    url: str
    fs: fsspec.AbstractFileSystem
    root: str
    # The options the folder was opened with; `pipeline.results.render` reuses them to re-read the inputs (`image_uri`)
    # and to write what it renders, so one `--endpoint-url` serves all three.
    storage_options: dict = dataclasses.field(default_factory=dict)

    def dataset(self, name: str) -> ds.Dataset:
        """`name` is `"images"` or `"detections"`: a pyarrow dataset over that folder's Parquet files."""
        schema = {IMAGES_DIR: IMAGES_SCHEMA, DETECTIONS_DIR: DETECTIONS_SCHEMA}.get(name)
        if schema is None:
            raise ValueError(f"results have the tables {IMAGES_DIR!r} and {DETECTIONS_DIR!r}, not {name!r}")
        files = self.parquet_files(name)
        # An explicit schema: a run with no detections at all still yields a typed, empty table.
        return ds.dataset(files, schema=schema, format="parquet", filesystem=self.fs)

    def table(self, name: str, *, columns: list[str] | None = None, filter=None) -> pa.Table:
        return self.dataset(name).to_table(columns=columns, filter=filter)

    def parquet_files(self, name: str) -> list[str]:
        base = posixpath.join(self.root, name)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            found = []
        return sorted(
            p
            for p in found
            if p.endswith(".parquet")
            and not any(part.startswith(("_", ".")) for part in posixpath.relpath(p, base).split("/"))
        )

    def read_json(self, name: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(posixpath.join(self.root, name)))
        except FileNotFoundError:
            return None

    @property
    def config(self) -> dict | None:
        """`_config.json`: the run's resolved config (credentials redacted), model id and fingerprint."""
        return self.read_json(CONFIG_FILE)

    @property
    def success(self) -> dict | None:
        """`_SUCCESS.json` (the run's summary), or None while the run is incomplete."""
        return self.read_json(SUCCESS_FILE)


def open_results(url: str, *, storage_options: dict | None = None) -> Results:
    """Open a results folder; a `JobError` naming the URL if it is unreachable or holds no results."""
    try:
        fs, root = fsspec.core.url_to_fs(url.rstrip("/"), **(storage_options or {}))
        has_images = fs.exists(posixpath.join(root, IMAGES_DIR))
    except Exception as e:  # noqa: BLE001  (any storage failure becomes one line)
        raise JobError(describe_storage_error(url, e)) from None
    if not has_images:
        raise JobError(f"{url}: no results here (no {IMAGES_DIR}/ folder; is this a segment job's --output?)")
    return Results(url=url, fs=fs, root=root, storage_options=dict(storage_options or {}))


def decode_mask(mask: dict) -> np.ndarray:
    """A `mask` cell (`{"size": [h, w], "counts": str}`) → bool array `[h, w]`."""
    counts = mask["counts"]
    rle = {
        "size": [int(v) for v in mask["size"]],
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }
    return mask_utils.decode(rle).astype(bool)
