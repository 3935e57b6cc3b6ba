"""An S3 Inventory report as S3 delivers one, for the tests and benchmarks that plan from it: gzipped CSV parts
without a header (keys URL-encoded, form style) and a `manifest.json` listing them."""

from __future__ import annotations

import csv
import gzip
import io
import json
import urllib.parse

SCHEMA = "Bucket, Key, Size, IsDeleteMarker"


def write_inventory(
    fs, bucket: str, rows: list[list[str]], *, parts: int = 2, encode_keys: bool = True
) -> str:
    """Write the report of `rows` (`[bucket, key, size, is_delete_marker]`, keys as stored) into `bucket` with
    the s3fs filesystem `fs`, `rows` dealt round-robin into `parts` parts. Returns the manifest's URL."""
    files = []
    for p in range(parts):
        text = io.StringIO()
        writer = csv.writer(text, quoting=csv.QUOTE_ALL)
        for b, key, *rest in rows[p::parts]:
            writer.writerow([b, urllib.parse.quote_plus(key, safe="/") if encode_keys else key, *rest])
        key = f"inventory/{bucket}/daily/data/part-{p:03d}.csv.gz"
        fs.pipe_file(f"{bucket}/{key}", gzip.compress(text.getvalue().encode()))
        files.append({"key": key, "size": 0, "MD5checksum": "-"})
    manifest = {
        "sourceBucket": bucket,
        "destinationBucket": f"arn:aws:s3:::{bucket}",
        "version": "2016-11-30",
        "fileFormat": "CSV",
        "fileSchema": SCHEMA,
        "files": files,
    }
    path = f"{bucket}/inventory/{bucket}/daily/2026-11-29T00-00Z/manifest.json"
    fs.pipe_file(path, json.dumps(manifest).encode())
    return f"s3://{path}"
