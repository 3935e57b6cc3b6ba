"""SQL over a results folder: `sql(results, query)` → a `pyarrow.Table`, and writing a table out as CSV or Parquet.

DuckDB runs the query in-process with the two datasets bound as the tables `images` and `detections`. They are
registered as pyarrow datasets read through fsspec, so results on S3 need neither DuckDB's httpfs extension
(downloaded at run time, impossible offline) nor an AWS SDK of DuckDB's own; DuckDB still pushes column projections
and filters down into the Parquet scan.
"""

from __future__ import annotations

import json
from typing import BinaryIO

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.results.common import QueryError, as_results, write_output
from pipeline.results.open import Results
from pipeline.segment.schema import DETECTIONS_DIR, IMAGES_DIR

FORMATS = ("csv", "parquet")


def connect(results: Results) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with `images` and `detections` bound to the results' Parquet datasets.

    The caller closes it (`with connect(r) as con: ...`). Registration is lazy: nothing is read until a query runs,
    and then only the columns and row groups the query needs.
    """
    con = duckdb.connect()
    con.register(IMAGES_DIR, results.dataset(IMAGES_DIR))
    con.register(DETECTIONS_DIR, results.dataset(DETECTIONS_DIR))
    return con


def sql(
    results: Results | str, query: str, *, limit: int | None = None, storage_options: dict | None = None
) -> pa.Table:
    """Run DuckDB SQL over the tables `images` and `detections`; the result as a `pyarrow.Table`.

    `limit` caps the rows of any query (applied around it, so the query itself need not say LIMIT). A statement
    without a result (e.g. `SET threads = 2`) yields an empty table. Bad SQL raises `QueryError` (one line).
    """
    results = as_results(results, storage_options)
    with connect(results) as con:
        try:
            rel = con.sql(query)
            if rel is None:
                return pa.table({})
            if limit is not None:
                rel = rel.limit(limit)
            return rel.to_arrow_table()
        except duckdb.Error as e:
            raise QueryError(f"SQL: {one_line(str(e))}") from None


def one_line(message: str) -> str:
    # DuckDB's messages point at the error with a `LINE 1: ...` excerpt and a row of carets: useless on one line.
    lines = [ln.strip() for ln in message.splitlines()]
    kept = [ln for ln in lines if ln and not ln.startswith("LINE ") and set(ln) != {"^"}]
    return "; ".join(kept)


def write_table(table: pa.Table, url: str, *, fmt: str, storage_options: dict | None = None) -> None:
    """Write `table` to `url` (local path or fsspec URL) as `csv` or `parquet`.

    CSV has no nested types: list and struct columns (`bbox`, `mask`) are written as JSON text.
    """
    if fmt not in FORMATS:
        raise QueryError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "parquet":
        write_output(url, storage_options, lambda f: pq.write_table(table, f, compression="zstd"))
    else:
        write_output(url, storage_options, lambda f: write_csv(table, f))


def write_csv(table: pa.Table, f: BinaryIO) -> None:
    """CSV with a header row to a binary file object; list and struct cells as JSON text."""
    for i, field in enumerate(table.schema):
        if pa.types.is_nested(field.type):
            text = [None if v is None else json.dumps(v) for v in table.column(i).to_pylist()]
            table = table.set_column(i, field.name, pa.array(text, pa.string()))
    pacsv.write_csv(table, f)
