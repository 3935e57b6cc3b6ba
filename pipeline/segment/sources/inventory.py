"""An S3 Inventory report's `manifest.json`: its data files (CSV gzipped, Parquet or ORC), one Ray task each.

An inventory lists a whole bucket: keys that are not images or `.tar` shards are left out (counted as skipped), as
are "folder" keys, delete markers and non-current versions. CSV parts URL-encode their keys.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from collections import Counter
from collections.abc import Iterator

import fsspec

from pipeline import retry
from pipeline.errors import JobError
from pipeline.segment.naming import is_image_name, is_tar_name
from pipeline.segment.sources.base import InputRef
from pipeline.segment.sources.manifest import bucket_key_urls, entry_ref, normalized_columns, record_batches
from pipeline.segment.storage import is_local


@dataclasses.dataclass(frozen=True)
class InventoryPart:
    url: str  # one data file of the report
    fmt: str  # "csv" | "parquet" | "orc"
    columns: tuple[str, ...]  # the CSV parts' column names (the report's fileSchema); () for Parquet/ORC

    def read(self, *, storage_options: dict | None = None, skipped: Counter) -> Iterator[InputRef]:
        fs, path = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        # Keys are unique within a report: no de-duplication to hold names for.
        for batch in record_batches(fs, path, self.fmt, list(self.columns) or None):
            cols = normalized_columns(batch)
            if "bucket" not in cols or "key" not in cols:
                raise JobError(
                    f"input: {self.url}: S3 Inventory data file has no Bucket and Key columns "
                    f"(columns found: {', '.join(batch.schema.names)})"
                )
            for url in bucket_key_urls(cols, unquote=self.fmt == "csv"):
                if url.endswith("/"):
                    continue  # a "folder" object
                name = posixpath.basename(url)
                if not (is_image_name(name) or is_tar_name(name)):
                    skipped["inventory keys that are not images or .tar"] += 1
                    continue
                yield entry_ref(fs, url, base="", user_url=url)


class Inventory:
    name = "S3 Inventory"

    def claims(self, target) -> bool:
        return target.path.lower().endswith(".json") and target.is_file

    def parts(self, target) -> list[InventoryPart]:
        url, fs = target.url, target.fs
        try:
            doc = json.loads(retry.call(fs.cat_file, target.path))
        except ValueError as e:
            raise JobError(
                f"input: {url}: a .json manifest must be an S3 Inventory manifest.json ({e})"
            ) from None
        if not (isinstance(doc, dict) and isinstance(doc.get("files"), list) and "fileFormat" in doc):
            raise JobError(
                f"input: {url}: not an S3 Inventory manifest.json (expected 'fileFormat' and 'files' keys); "
                "list inputs one per line in a text, CSV or Parquet manifest instead"
            )
        fmt = str(doc["fileFormat"]).lower()
        if fmt not in ("csv", "parquet", "orc"):
            raise JobError(
                f"input: {url}: S3 Inventory fileFormat {doc['fileFormat']!r} is not CSV, Parquet or ORC"
            )
        # The parts live in the destination bucket ("arn:aws:s3:::name"), under the keys the manifest lists.
        bucket = str(doc.get("destinationBucket", "")).rsplit(":", 1)[-1]
        if not bucket:
            raise JobError(f"input: {url}: S3 Inventory manifest has no destinationBucket")
        columns = tuple(c.strip() for c in str(doc.get("fileSchema", "")).split(",") if c.strip())
        if fmt == "csv" and not columns:
            raise JobError(f"input: {url}: S3 Inventory manifest has no fileSchema for its CSV parts")
        where = (
            (lambda key: f"/{bucket}/{key}")
            if is_local(fs)
            else (lambda key: fs.unstrip_protocol(f"{bucket}/{key}"))
        )
        return [
            InventoryPart(url=where(f["key"]), fmt=fmt, columns=columns if fmt == "csv" else ())
            for f in doc["files"]
        ]


SOURCE = Inventory()
