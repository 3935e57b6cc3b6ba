"""Output layout and per-unit commits: what appears under `--output`, and what a re-run reads to resume.

    <output>/
      images/part-<unit>.parquet       one file per work unit   (IMAGES_SCHEMA)
      detections/part-<unit>.parquet   one file per work unit   (DETECTIONS_SCHEMA)
      _committed/<unit>.json           completion record, written after both data files
      _plan/                           the work units (see pipeline.sources)
      _config.json                     resolved config (credentials redacted), model id, fingerprint
      _SUCCESS.json                    written last, only when every unit is committed: the run's summary

File names derive from the unit id, so a unit written twice replaces itself instead of duplicating rows. A data
file never appears half-written at its final name: local files are written to a hidden temporary name and renamed
(atomic on POSIX); object stores (S3) publish an object only when its upload completes. Readers (pyarrow, DuckDB,
pandas) skip names starting with `_` or `.`, so the bookkeeping files never mix with the data.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import posixpath
import uuid
from collections import Counter

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import retry
from pipeline.errors import JobError, describe_storage_error
from pipeline.schema import STATUS_OK, split_results

IMAGES_DIR = "images"
DETECTIONS_DIR = "detections"
COMMITTED_DIR = "_committed"
CONFIG_FILE = "_config.json"
SUCCESS_FILE = "_SUCCESS.json"
PLAN_DIR = "_plan"
OWNED = (IMAGES_DIR, DETECTIONS_DIR, COMMITTED_DIR, PLAN_DIR, CONFIG_FILE, SUCCESS_FILE)


class Output:
    """The output location: a local folder or an fsspec prefix."""

    def __init__(self, url: str, *, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
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
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        else:
            try:
                self._io(rel, self.fs.pipe_file, target, data)
            except FileNotFoundError as e:  # a write that finds no bucket is a failure like any other
                raise JobError(f"output: {describe_storage_error(self.url_of(rel), e)}") from None

    def write_json(self, rel: str, obj: dict) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))

    def read_json(self, rel: str) -> dict | None:
        try:
            return json.loads(self._io(rel, self.fs.cat_file, self.path(rel)))
        except FileNotFoundError:
            return None

    def exists(self, rel: str) -> bool:
        return self._io(rel, self.fs.exists, self.path(rel))

    def committed_units(self) -> set[str]:
        try:
            names = self._io(COMMITTED_DIR, self.fs.ls, self.path(COMMITTED_DIR), detail=False)
        except FileNotFoundError:
            return set()
        return {posixpath.basename(n)[: -len(".json")] for n in names if n.endswith(".json")}

    def clear(self) -> None:
        """Remove what a previous run wrote here (only the names this job owns)."""
        for name in OWNED:
            p = self.path(name)
            if self.exists(name):
                self._io(name, self.fs.rm, p, recursive=True)
        self.fs.invalidate_cache()

    def remove_stale_temporaries(self) -> int:
        """Delete the hidden `.<name>.<hex>.tmp` files that a process killed mid-write left in a local output (object
        stores publish nothing until an upload completes). Readers already skip them; this reclaims the space, and
        is safe because one output has one run at a time. Returns how many were removed."""
        if not self.local:
            return 0
        removed = 0
        for folder in ("", IMAGES_DIR, DETECTIONS_DIR, COMMITTED_DIR, PLAN_DIR):
            d = self.path(folder)
            names = os.listdir(d) if os.path.isdir(d) else []
            for name in names:
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


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


@dataclasses.dataclass
class UnitStats:
    unit_id: str
    images: int
    ok: int
    errors: int
    detections: int
    labels: dict[str, int]
    error_reasons: dict[str, int]


class UnitCommitter:
    """Buffers actor results per work unit and commits a unit once all of its inputs have arrived.

    Results of one unit arrive in any order and from any actor; a unit is complete when it holds one row for each
    index 0..total-1 (a tar shard's total is known from its last row). Duplicate rows of an index (a retried task)
    are ignored, so a unit's files hold each input exactly once; so are rows of a unit this run already committed
    (a task that Ray re-executes after losing a node can deliver them again), which would otherwise start the unit
    over, rewrite its files and count it twice in the summary.
    """

    def __init__(self, output: Output):
        self.output = output
        self._parts: dict[str, list[pa.Table]] = {}
        self._seen: dict[str, set[int]] = {}
        self._total: dict[str, int] = {}
        self._done: set[str] = set()

    def add(self, results: pa.Table) -> list[UnitStats]:
        committed = []
        for unit_id in pc.unique(results.column("unit_id")).to_pylist():
            if unit_id in self._done:
                continue
            part = results.filter(pc.equal(results.column("unit_id"), unit_id))
            seen = self._seen.setdefault(unit_id, set())
            indices = part.column("unit_index").to_pylist()
            fresh = [k for k, idx in enumerate(indices) if idx not in seen]
            if len(fresh) < len(indices):
                part = part.take(fresh)
            seen.update(indices)
            self._parts.setdefault(unit_id, []).append(part)
            total = max(self._total.get(unit_id, -1), pc.max(part.column("unit_total")).as_py() or -1)
            self._total[unit_id] = total
            if total >= 0 and len(seen) >= total:
                committed.append(self._commit(unit_id))
        return committed

    @property
    def pending_units(self) -> list[str]:
        return sorted(self._parts)

    def _commit(self, unit_id: str) -> UnitStats:
        results = pa.concat_tables(self._parts.pop(unit_id)).sort_by("unit_index")
        del self._seen[unit_id], self._total[unit_id]
        self._done.add(unit_id)
        images, detections = split_results(results)
        name = f"part-{unit_id}.parquet"
        self.output.write_bytes(posixpath.join(IMAGES_DIR, name), parquet_bytes(images))
        self.output.write_bytes(posixpath.join(DETECTIONS_DIR, name), parquet_bytes(detections))
        statuses = images.column("status").to_pylist()
        ok = sum(1 for s in statuses if s == STATUS_OK)
        errors = [e for e in images.column("error").to_pylist() if e is not None]
        stats = UnitStats(
            unit_id=unit_id,
            images=images.num_rows,
            ok=ok,
            errors=images.num_rows - ok,
            detections=detections.num_rows,
            labels=dict(Counter(detections.column("label_name").to_pylist())),
            error_reasons=dict(Counter(_reason_kind(e) for e in errors)),
        )
        # Written last: its presence is what says "this unit's rows are complete" to a re-run.
        self.output.write_json(posixpath.join(COMMITTED_DIR, f"{unit_id}.json"), dataclasses.asdict(stats))
        return stats


def _reason_kind(error: str) -> str:
    """Group error reasons for the summary: the text before the first ':' ("not an image", "read failed", ...)."""
    return error.split(":", 1)[0]
