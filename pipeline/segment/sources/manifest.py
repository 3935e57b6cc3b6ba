"""A manifest: any other single file, listing inputs. Read by Ray tasks (one per file).

- text (one URL or path per line, `#` comments; `.gz` too);
- CSV / TSV (`.csv`, `.tsv`, optionally `.gz`) and Parquet (`.parquet`) or ORC (`.orc`): a column named `url`,
  `uri`, `image_uri` or `path` (case, spaces and underscores ignored), or `bucket` and `key` (→ `s3://bucket/key`).

Relative paths are relative to the manifest's folder, except in an `image_uri` column: that is the segment job's
own naming (a results table written as a manifest), where a relative local path is relative to the working
directory the job runs in, as the job resolved it. A tar member `<shard>.tar#<member>` is read from its shard.
A file named twice in one manifest (in any spelling) is processed once and counted as skipped.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from collections import Counter
from collections.abc import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import JobError
from pipeline.segment.naming import TAR_MEMBER_SEP, is_tar_name, split_tar_member
from pipeline.segment.sources._listing import display_uri
from pipeline.segment.sources.base import InputRef
from pipeline.segment.storage import url_for
from pipeline.segment.units import Kind

# Column names (normalised: lower case, no spaces or underscores) that hold an input, in order of preference.
URL_COLUMNS = ("url", "uri", "imageuri", "path")
RESULTS_COLUMN = (
    "imageuri"  # the results' own naming: relative local paths are relative to the working directory
)


def norm(name: str) -> str:
    return name.strip().lower().replace("_", "").replace(" ", "")


def file_format(path: str) -> str:
    """ "text" | "csv" | "parquet" | "orc", by the file's name."""
    name = posixpath.basename(path).lower()
    stem = name[: -len(".gz")] if name.endswith(".gz") else name
    if stem.endswith((".csv", ".tsv")):
        return "csv"
    if stem.endswith(".parquet"):
        return "parquet"
    if stem.endswith(".orc"):
        return "orc"
    return "text"


@dataclasses.dataclass(frozen=True)
class ManifestPart:
    url: str  # read URL of the manifest file
    fmt: str  # "text" | "csv" | "parquet" | "orc"
    base: str  # the folder that relative paths are relative to (the manifest's own)
    user_url: str  # the manifest as the user named it (for naming relative entries)
    cwd: str  # the driver's working directory (for relative paths in an `image_uri` column)

    def read(self, *, storage_options: dict | None = None, skipped: Counter) -> Iterator[InputRef]:
        fs, path = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        seen: set[str] = set()  # read URLs so far: one string per entry, held by this task while it plans
        for entry, column in self._entries(fs, path):
            ref = entry_ref(
                fs,
                entry,
                base=self.base,
                user_url=self.user_url,
                cwd=self.cwd if column == RESULTS_COLUMN else None,
            )
            if ref.read_url in seen:
                skipped["duplicate manifest lines"] += 1
                continue
            seen.add(ref.read_url)
            yield ref

    def _entries(self, fs, path: str) -> Iterator[tuple[str, str | None]]:
        """`(entry as written, the normalised column it came from or None)`."""
        if self.fmt == "text":
            with fs.open(path, "rt", encoding="utf-8", compression="infer") as f:
                for raw in f:
                    line = raw.strip()
                    if line and not line.startswith("#"):
                        yield line, None
            return
        for batch in record_batches(fs, path, self.fmt):
            cols = normalized_columns(batch)
            if "bucket" in cols and "key" in cols and not any(c in cols for c in URL_COLUMNS):
                for url in bucket_key_urls(cols, unquote=False):
                    yield url, None
                continue
            name = next((c for c in URL_COLUMNS if c in cols), None)
            if name is None:
                raise JobError(
                    f"input: {self.url}: manifest has no input column; name one of url, uri, image_uri, path, or "
                    f"give 'bucket' and 'key' (columns found: {', '.join(batch.schema.names)})"
                )
            for value in cols[name].to_pylist():
                if value is not None and str(value).strip():
                    yield str(value).strip(), name


def entry_ref(fs, entry: str, *, base: str, user_url: str, cwd: str | None = None) -> InputRef:
    """A manifest entry → its `InputRef`. URLs and absolute paths are read as written (an entry on another store
    with the manifest's own credentials and endpoint); relative paths from `cwd` when given, else from `base`."""
    member = split_tar_member(entry)
    location, suffix = (member[0], TAR_MEMBER_SEP + member[1]) if member else (entry, "")
    kind = Kind.TARS if not member and is_tar_name(entry) else Kind.FILES
    if "://" in location or location.startswith("/"):
        entry_fs, entry_path = fsspec.core.url_to_fs(
            location, **dict(getattr(fs, "storage_options", {}) or {})
        )
        return InputRef(kind, url_for(entry_fs, entry_path) + suffix, entry)
    if cwd is not None:
        return InputRef(kind, os.path.normpath(os.path.join(cwd, location)) + suffix, entry)
    joined = posixpath.normpath(posixpath.join(base, location))
    return InputRef(kind, url_for(fs, joined) + suffix, display_uri(fs, joined, user_url) + suffix)


def record_batches(
    fs, path: str, fmt: str, column_names: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """A CSV/TSV (gzipped or not), Parquet or ORC file as record batches; `column_names` for headerless CSV."""
    if fmt == "csv":
        import pyarrow.csv as pacsv

        delimiter = "\t" if path.lower().removesuffix(".gz").endswith(".tsv") else ","
        read = pacsv.ReadOptions(column_names=column_names, block_size=4 << 20)
        convert = pacsv.ConvertOptions(
            column_types={c: pa.string() for c in column_names} if column_names else None,
            strings_can_be_null=False,
        )
        with fs.open(path, "rb", compression="infer") as f:
            yield from pacsv.open_csv(
                f,
                read_options=read,
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=convert,
            )
    elif fmt == "parquet":
        with fs.open(path, "rb") as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=65_536)
    else:
        import pyarrow.orc as orc

        with fs.open(path, "rb") as f:
            yield from orc.ORCFile(f).read().to_batches(max_chunksize=65_536)


def normalized_columns(batch: pa.RecordBatch) -> dict[str, pa.Array]:
    return {norm(n): batch.column(i) for i, n in enumerate(batch.schema.names)}


def bucket_key_urls(cols: dict[str, pa.Array], *, unquote: bool) -> Iterator[str]:
    """`s3://bucket/key` per row of `bucket` and `key` columns; versioned listings keep only current, real objects.
    `unquote`: keys are form-URL-encoded (S3 Inventory's CSV parts: '+' for a space)."""
    import urllib.parse

    keep = np.ones(len(cols["key"]), dtype=bool)
    for flag, wanted in (("isdeletemarker", False), ("islatest", True)):
        if flag in cols:
            values = np.array([str(v).lower() == "true" for v in cols[flag].to_pylist()])
            keep &= values == wanted
    for ok, bucket, key in zip(keep, cols["bucket"].to_pylist(), cols["key"].to_pylist()):
        if ok and bucket and key:
            yield f"s3://{bucket}/{urllib.parse.unquote_plus(key) if unquote else key}"


class Manifest:
    name = "manifest"

    def claims(self, target) -> bool:
        return target.is_file

    def parts(self, target) -> list[ManifestPart]:
        return [
            ManifestPart(
                url=url_for(target.fs, target.path),
                fmt=file_format(target.path),
                base=posixpath.dirname(target.path),
                user_url=target.url,
                cwd=os.getcwd(),
            )
        ]


SOURCE = Manifest()
