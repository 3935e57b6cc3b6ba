"""Storage: the one place that knows how this job writes and lists on a filesystem (local or an fsspec store).

- `publish(fs, path, data)`: a reader sees all of `data` or no file. Object stores publish an object only when its
  upload completes; local files go through a hidden temporary name and an atomic rename (POSIX).
- `is_local(fs)` / `protocols(fs)`: what kind of store a filesystem is (local outputs get a lock and temporary
  files; S3 gets conditional writes).
- `Output`: the `--output` location: publishing, reading, listing names, clearing what the job owns, every call
  retried on transient errors (`pipeline.retry`) and a permanent failure turned into one `JobError` line.

Names under the output are declared in `pipeline.segment.schema`; what they mean is in `docs/segment-job.md`.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Iterator

import fsspec

from pipeline import retry
from pipeline.errors import JobError, describe_storage_error
from pipeline.segment.schema import (
    COMMITTED_DIR,
    CONFIG_FILE,
    DETECTIONS_DIR,
    FAULTS_DIR,
    IMAGES_DIR,
    PLAN_DIR,
    STATS_DIR,
    SUCCESS_FILE,
)

# What `output.mode=overwrite` removes (never the lease, which the run holds while it clears).
OWNED = (IMAGES_DIR, DETECTIONS_DIR, COMMITTED_DIR, STATS_DIR, PLAN_DIR, FAULTS_DIR, CONFIG_FILE, SUCCESS_FILE)


def protocols(fs) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def is_local(fs) -> bool:
    return "file" in protocols(fs)


def url_for(fs, path: str) -> str:
    """A URL another process can open for `path`: the plain absolute path for local files, else protocol-qualified."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def publish(fs, path: str, data: bytes) -> None:
    """Write `path` so that a reader sees all of `data` or no file (retried on transient errors)."""
    if not is_local(fs):
        retry.call(fs.pipe_file, path, data)
        return
    folder = posixpath.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = posixpath.join(folder, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class Output:
    """The output location: a local folder or an fsspec prefix."""

    def __init__(self, url: str, *, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        # No listings cache: other processes (the actors) write here, so a cached listing would be stale.
        self.fs, self.root = fsspec.core.url_to_fs(self.url, use_listings_cache=False, **self.storage_options)
        self.local = is_local(self.fs)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url_of(self, *parts: str) -> str:
        """A URL workers can open (absolute path for local outputs)."""
        return url_for(self.fs, self.path(*parts))

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.local:
            publish(self.fs, self.path(rel), data)
            return
        try:
            self._io(rel, self.fs.pipe_file, self.path(rel), data)
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
        for folder in ("", IMAGES_DIR, DETECTIONS_DIR, COMMITTED_DIR, STATS_DIR, PLAN_DIR, FAULTS_DIR):
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
