"""A results folder written from rows, as the segment job lays it out, for tests of the readers and tools."""

from __future__ import annotations

import pyarrow as pa

from pipeline.segment.schema import DETECTIONS_SCHEMA, IMAGES_SCHEMA
from pipeline.segment.storage import Output
from pipeline.segment.writer import parquet_bytes


def write_units(
    output_url: str,
    units: dict[str, tuple[list[dict], list[dict]]],
    *,
    storage_options: dict | None = None,
    committed: bool = False,
) -> Output:
    """`units`: unit id → (`images` rows, `detections` rows); `committed` also writes each unit's record."""
    out = Output(output_url, storage_options=storage_options)
    for unit, (images, detections) in units.items():
        out.write_bytes(
            f"images/part-{unit}.parquet", parquet_bytes(pa.Table.from_pylist(images, IMAGES_SCHEMA))
        )
        out.write_bytes(
            f"detections/part-{unit}.parquet",
            parquet_bytes(pa.Table.from_pylist(detections, DETECTIONS_SCHEMA)),
        )
        if committed:
            out.write_json(f"_committed/{unit}.json", {"unit_id": unit})
    return out
