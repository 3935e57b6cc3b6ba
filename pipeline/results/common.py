"""What the questions asked of a results folder share (`sql`, `summary`, `render`): the one-line `QueryError`, the
columns they cannot do without, and how they open the results and write an output.

Every question takes a `Results` (from `pipeline.results.open.open_results`) or a results URL (local or `s3://`),
which `as_results` opens.

Results written by another tool may lack columns: pyarrow reads a column a Parquet file lacks as nulls. Only
`REQUIRED` columns are needed; a null there is a `QueryError` naming the column. Every other column has a fallback
(see `pipeline.results.render`).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from typing import BinaryIO

import fsspec

from pipeline.errors import JobError, describe_storage_error
from pipeline.results.open import Results, open_results
from pipeline.segment.schema import DETECTIONS_DIR, IMAGES_DIR

# The columns these queries cannot do without (README, "Output"); the rest are optional, see the module docstring.
REQUIRED = {
    IMAGES_DIR: ("image_uri", "status"),
    DETECTIONS_DIR: ("image_uri", "label_name", "score", "bbox", "mask"),
}


class QueryError(JobError):
    """A query that cannot be answered (bad SQL, unknown image, unreadable image): one line for the user."""


def missing_column(table: str, column: str, where: str = "") -> QueryError:
    """The one-line error for a required column that is absent (read as null) or null."""
    return QueryError(
        f"{table}.{column} is missing{where}: a required column of the results (README, Output); "
        "were they written by another tool?"
    )


def require(rows: list[dict], table: str, where: str = "") -> None:
    """`missing_column`'s error for the first `REQUIRED` column of `table` that is null in any of `rows`."""
    for column in REQUIRED[table]:
        if any(row.get(column) is None for row in rows):
            raise missing_column(table, column, where)


def as_results(results: Results | str, storage_options: dict | None) -> Results:
    """`results` itself, or the results folder at that URL opened with `storage_options`."""
    return results if isinstance(results, Results) else open_results(results, storage_options=storage_options)


def options_for(url: str, storage_options: dict | None) -> dict:
    """The storage options apply to remote URLs only; a local path takes none."""
    return dict(storage_options or {}) if "://" in url and not url.startswith("file://") else {}


def write_output(url: str, storage_options: dict | None, write: Callable[[BinaryIO], None]) -> None:
    """Open `url` (local path or fsspec URL; parent folders created) as a binary file and hand it to `write`.
    Storage failures become one `QueryError` line naming the URL."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **options_for(url, storage_options))
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "wb") as f:
            write(f)
    except QueryError:
        raise
    except Exception as e:  # noqa: BLE001  (storage failures become one line)
        raise QueryError(f"output: {describe_storage_error(url, e)}") from None
