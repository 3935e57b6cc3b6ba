"""Inputs: list an fsspec URL into work units, write the plan, and read a unit's bytes.

`--input` forms (any fsspec protocol; s3:// via s3fs):
- a folder / prefix: every image file below it, recursively; extensions matched case-insensitively;
- a glob (`*`, `?`, `[`): the matching files (folders among them are walked);
- a `.tar` file, or `.tar` files found by the forms above: WebDataset-style shards, each image member one input;
- any other single file: a manifest, one URL or path per line (blank lines and `#` comments skipped; relative
  paths are relative to the manifest's folder).

Naming (`image_uri`): the URL as the user addressed it — `s3://bucket/key` for object stores, and a local path stays
local (relative if the input was given relative). A tar member is `<shard uri>#<member name>`.

Work units are the commit granularity: up to `unit_size` loose files, or one tar shard. The plan is written under
`<output>/_plan/` as the listing streams, so the driver holds one small descriptor per unit, not one per image.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.utils import glob_translate

from pipeline import retry
from pipeline.errors import JobError, describe_storage_error

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
TAR_EXTENSIONS = (".tar",)
PLAN_DIR = "_plan"
PLAN_INDEX = "units.jsonl"
TAR_MEMBER_SEP = "#"
# Rows per Arrow table a read task yields: small enough to stream, large enough to amortise overhead.
READ_CHUNK_ROWS = 16


@dataclasses.dataclass(frozen=True)
class InputRef:
    kind: str  # "file" | "tar"
    read_url: str  # absolute, protocol-qualified (plain absolute path for local files)
    image_uri: str  # as the user addressed it


@dataclasses.dataclass(frozen=True)
class WorkUnit:
    unit_id: str  # zero-padded, stable for a given plan
    kind: str  # "files" | "tar"
    location: str  # the unit's plan file (files) or the shard's read URL (tar)
    image_uri: str  # tar: the shard as the user addressed it; files: ""
    count: int  # files: number of inputs; tar: -1 (known only once read)


def is_image_name(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_tar_name(name: str) -> bool:
    return name.lower().endswith(TAR_EXTENSIONS)


def _has_magic(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _display_uri(fs, path: str, user_url: str) -> str:
    """How a listed path is named in outputs: protocol-qualified for remote stores, local paths as the user wrote."""
    if _is_local(fs):
        return os.path.relpath(path) if not os.path.isabs(user_url) and "://" not in user_url else path
    return fs.unstrip_protocol(path)


def _read_url(fs, path: str) -> str:
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def iter_inputs(
    url: str, *, storage_options: dict | None = None, skipped: Counter | None = None
) -> Iterator[InputRef]:
    """Yield the inputs behind `url` in a deterministic order (sorted per folder), streaming folder by folder.

    Each input comes once: a manifest line naming a file an earlier line named (in any spelling: relative or
    absolute) is skipped and counted in `skipped["duplicate manifest lines"]`, since two rows for one image would
    break every join on `image_uri`. Folder walks and globs cannot repeat an input.
    """
    skipped = Counter() if skipped is None else skipped
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if _has_magic(path):
        for match, is_folder in _glob(fs, path):
            if is_folder:
                yield from _walk(fs, match, url)
            else:
                yield from _classify(fs, match, url, explicit=False)
        return
    if fs.isdir(path):
        yield from _walk(fs, path, url)
    elif fs.isfile(path):
        yield from _classify(fs, path, url, explicit=True, skipped=skipped)
    else:
        raise FileNotFoundError(f"no such file, folder or prefix: {url}")


def _list(fs, folder: str) -> tuple[list[str], list[str]]:
    """(files, subfolders) directly in `folder`, each sorted.

    Every listing of inputs goes through here, not through fsspec's `walk`/`find`/`glob`: those skip a folder whose
    listing fails without a word (`on_error="omit"`, and `"raise"` does not reach subfolders), so a 5xx on one
    listing would drop that folder's images from the job, which would still call itself complete. Here a transient
    listing error is retried (`pipeline.retry`) and any other is raised.
    """
    here = folder.rstrip("/")
    files, folders = [], []
    for info in retry.call(fs.ls, folder, detail=True):
        name = info["name"].rstrip("/")
        if info["type"] == "directory":
            if name != here:  # some stores list the folder itself
                folders.append(name)
        else:
            files.append(name)
    return sorted(files), sorted(folders)


def _walk(fs, root: str, user_url: str) -> Iterator[InputRef]:
    """The inputs below `root`, one folder listed at a time (memory follows the widest folder, not the archive):
    a folder's files in sorted order, then its subfolders, depth first, in sorted order."""
    stack = [root]
    while stack:
        files, folders = _list(fs, stack.pop())
        for path in files:
            yield from _classify(fs, path, user_url, explicit=False)
        stack.extend(reversed(folders))  # popped in sorted order


def _glob(fs, pattern: str) -> list[tuple[str, bool]]:
    """The (path, is_folder) pairs matching `pattern`, sorted, with fsspec's glob semantics (`*`, `?`, `[...]`
    within one path segment, `**` across segments) but listed with `_list`: never a silently skipped folder.

    Listing starts at the deepest folder without magic characters and descends only into folders that can still
    match (`s3://b/2024-*/cam1/*.jpg` never lists `b/2023-01/`); from a `**` segment on, everything is listed.
    """
    parts = pattern.rstrip("/").split("/")
    fixed = next(i for i, part in enumerate(parts) if _has_magic(part))
    root = "/".join(parts[:fixed]) or ("/" if pattern.startswith("/") else "")
    depth = len(parts) - fixed  # levels below root that the pattern spans
    # The level (1-based) of the first `**` segment; below it any folder may hold matches.
    deep = next((k for k, part in enumerate(parts[fixed:], 1) if "**" in part), None)
    # Above it, a folder at level k is worth listing only if it matches the pattern's first k segments.
    prefixes = [re.compile(glob_translate("/".join(parts[: fixed + k]))) for k in range(1, depth)]
    full = re.compile(glob_translate(pattern.rstrip("/")))
    matches: list[tuple[str, bool]] = []
    stack = [(root, 0)]
    while stack:
        folder, level = stack.pop()
        try:
            files, folders = _list(fs, folder)
        except FileNotFoundError:  # the root itself is missing, or a folder went away between two listings
            continue
        matches += [(f, False) for f in files if full.match(f)]
        matches += [(d, True) for d in folders if full.match(d)]
        for d in folders:  # d is at level + 1
            if (deep is not None and level + 1 >= deep) or (level + 1 < depth and prefixes[level].match(d)):
                stack.append((d, level + 1))
    # A path below a matched folder is that folder's walk's to yield (`a/**` matches `a/x` and `a/x/y.jpg`).
    folders = {m for m, is_folder in matches if is_folder}
    return sorted(m for m in matches if not any(a in folders for a in _ancestors(m[0], root)))


def _ancestors(path: str, root: str) -> Iterator[str]:
    while (path := posixpath.dirname(path)) and len(path) > len(root):
        yield path


def _classify(
    fs, path: str, user_url: str, *, explicit: bool, skipped: Counter | None = None
) -> Iterator[InputRef]:
    name = posixpath.basename(path)
    if is_image_name(name):
        yield InputRef("file", _read_url(fs, path), _display_uri(fs, path, user_url))
    elif is_tar_name(name):
        yield InputRef("tar", _read_url(fs, path), _display_uri(fs, path, user_url))
    elif explicit:  # the user named this one file: it is a manifest
        yield from _manifest(fs, path, user_url, skipped)
    # other files met while walking (README, JSON annotations, ...) are not inputs


def _manifest(fs, path: str, user_url: str, skipped: Counter) -> Iterator[InputRef]:
    base = posixpath.dirname(path)
    seen: set[str] = set()  # read URLs so far: the driver holds one string per manifest line while planning
    with fs.open(path, "rt", encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if "://" in line or line.startswith("/"):
                line_fs, line_path = fsspec.core.url_to_fs(line, **_opts_like(fs))
                read_url, shown = _read_url(line_fs, line_path), line
            else:
                joined = posixpath.normpath(posixpath.join(base, line))
                read_url, shown = _read_url(fs, joined), _display_uri(fs, joined, user_url)
            if read_url in seen:
                skipped["duplicate manifest lines"] += 1
                continue
            seen.add(read_url)
            kind = "tar" if is_tar_name(line) else "file"
            yield InputRef(kind, read_url, shown)


def _opts_like(fs) -> dict:
    # Lines of a manifest on S3 are read with the manifest's own credentials/endpoint.
    return dict(getattr(fs, "storage_options", {}) or {})


# --- the plan ------------------------------------------------------------------------------------------------------


def plan_units(
    inputs: Iterator[InputRef], *, plan_url: str, unit_size: int, storage_options: dict | None = None
) -> list[WorkUnit]:
    """Group inputs into work units, writing each files-unit's list under `plan_url` as the listing streams.

    Each unit file is TSV: `read_url<TAB>image_uri` per line. The index (`units.jsonl`) is written last, so a plan
    without an index is incomplete and is listed again.
    """
    fs, root = fsspec.core.url_to_fs(plan_url, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    units: list[WorkUnit] = []
    batch: list[InputRef] = []
    pending_writes: dict[str, bytes] = {}

    def flush_writes() -> None:
        if pending_writes:
            retry.call(fs.pipe, dict(pending_writes))  # s3fs sends these concurrently
            pending_writes.clear()

    def close_batch() -> None:
        if not batch:
            return
        unit_id = f"{len(units):06d}"
        path = posixpath.join(root, f"unit-{unit_id}.tsv")
        pending_writes[path] = "".join(f"{r.read_url}\t{r.image_uri}\n" for r in batch).encode("utf-8")
        units.append(WorkUnit(unit_id, "files", _read_url(fs, path), "", len(batch)))
        batch.clear()
        if len(pending_writes) >= 32:
            flush_writes()

    for ref in inputs:
        if "\t" in ref.read_url or "\n" in ref.read_url or "\t" in ref.image_uri or "\n" in ref.image_uri:
            raise JobError(f"input name with a tab or newline cannot be planned: {ref.image_uri!r}")
        if ref.kind == "tar":
            close_batch()
            units.append(WorkUnit(f"{len(units):06d}", "tar", ref.read_url, ref.image_uri, -1))
            continue
        batch.append(ref)
        if len(batch) >= unit_size:
            close_batch()
    close_batch()
    flush_writes()
    index = "".join(json.dumps(dataclasses.asdict(u)) + "\n" for u in units).encode("utf-8")
    _publish(fs, posixpath.join(root, PLAN_INDEX), index)
    return units


def _publish(fs, path: str, data: bytes) -> None:
    """Write `path` so that a reader sees all of `data` or no file. The plan index is what a re-run trusts: a driver
    killed while writing it must not leave half an index (cut at a line end, the re-run would silently drop the
    units after the cut and still call itself complete; cut mid-line, every re-run would fail). Object stores
    publish an object only when its upload completes; local files go through a hidden temporary name and an atomic
    rename."""
    if not _is_local(fs):
        retry.call(fs.pipe_file, path, data)
        return
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_plan(plan_url: str, *, storage_options: dict | None = None) -> list[WorkUnit] | None:
    """The units of a completed plan, or None when there is none (no index yet)."""
    fs, root = fsspec.core.url_to_fs(plan_url, **(storage_options or {}))
    index = posixpath.join(root, PLAN_INDEX)
    if not retry.call(fs.exists, index):
        return None
    lines = retry.call(fs.cat_file, index).decode("utf-8").splitlines()
    return [WorkUnit(**json.loads(line)) for line in lines if line.strip()]


# --- reading a unit (runs in Ray read tasks) -----------------------------------------------------------------------

READ_SCHEMA = pa.schema(
    [
        ("unit_id", pa.string()),
        ("unit_index", pa.int32()),  # position of the input within its unit
        ("unit_total", pa.int32()),  # inputs in the unit; -1 until known (set on a tar's last row)
        ("image_uri", pa.string()),
        ("data", pa.binary()),
        ("read_error", pa.string()),  # null when bytes were read
    ]
)


def _rows_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=READ_SCHEMA)


def read_unit(
    unit: WorkUnit, *, input_options: dict | None = None, plan_options: dict | None = None
) -> Iterator[pa.Table]:
    """Yield the unit's inputs as Arrow tables of `READ_SCHEMA`. Per-input failures become `read_error` rows.

    `input_options` are the storage options for the inputs, `plan_options` those of the output store holding the plan.
    """
    if unit.kind == "tar":
        yield from _read_tar(unit, input_options or {})
    else:
        yield from _read_files(unit, input_options or {}, plan_options or {})


def _read_files(unit: WorkUnit, input_options: dict, plan_options: dict) -> Iterator[pa.Table]:
    plan_fs, plan_path = fsspec.core.url_to_fs(unit.location, **plan_options)
    entries = [
        line.split("\t", 1)
        for line in retry.call(plan_fs.cat_file, plan_path).decode("utf-8").splitlines()
        if line
    ]
    total = len(entries)
    filesystems: dict[str, object] = {}
    for start in range(0, total, READ_CHUNK_ROWS):
        chunk = entries[start : start + READ_CHUNK_ROWS]
        fetched = _fetch([read_url for read_url, _ in chunk], input_options, filesystems)
        rows = []
        for offset, ((_, image_uri), got) in enumerate(zip(chunk, fetched)):
            row = dict(unit_id=unit.unit_id, unit_index=start + offset, unit_total=total, image_uri=image_uri)
            if isinstance(got, BaseException):
                row.update(data=None, read_error=f"read failed: {describe_storage_error(image_uri, got)}")
            else:
                row.update(data=bytes(got), read_error=None)
            rows.append(row)
        yield _rows_table(rows)


def _fetch(urls: list[str], options: dict, filesystems: dict) -> list[bytes | BaseException]:
    """Bytes of each URL, or the exception that reading it raised (never raises itself). Reads that failed with a
    transient error (throttling, 5xx, a dropped connection; see `pipeline.retry`) are tried again, backing off, so
    that a storage hiccup does not become a permanent `read failed` row."""
    out = _fetch_once(urls, options, filesystems)
    for attempt in range(retry.ATTEMPTS):
        again = [i for i, got in enumerate(out) if isinstance(got, BaseException) and retry.is_transient(got)]
        if not again:
            break
        time.sleep(retry.delay(attempt))
        for i, got in zip(again, _fetch_once([urls[i] for i in again], options, filesystems)):
            out[i] = got
    return out


def _fetch_once(urls: list[str], options: dict, filesystems: dict) -> list[bytes | BaseException]:
    out: list[bytes | BaseException] = [b""] * len(urls)
    groups: dict[str, list[int]] = {}
    for i, url in enumerate(urls):
        groups.setdefault(url.split("://", 1)[0] if "://" in url else "file", []).append(i)
    for protocol, idxs in groups.items():
        if protocol not in filesystems:
            filesystems[protocol] = fsspec.core.url_to_fs(urls[idxs[0]], **options)[0]
        fs = filesystems[protocol]
        paths = [fs._strip_protocol(urls[i]) for i in idxs]
        if getattr(fs, "async_impl", False) and not any(_has_magic(p) for p in paths):
            # One concurrent request batch on object stores; on_error="return" keeps failures per path.
            # (cat() expands glob characters, so names holding them take the one-by-one path below.)
            got = fs.cat(paths, on_error="return")
            for i, p in zip(idxs, paths):
                out[i] = got.get(p, FileNotFoundError(p)) if isinstance(got, dict) else got
            continue
        for i, p in zip(idxs, paths):
            try:
                out[i] = fs.cat_file(p)
            except Exception as e:  # per-input: becomes that input's error row
                out[i] = e
    return out


class _TransientTarError(Exception):
    """A shard read that failed on a transient storage error: `_read_tar` starts the shard again."""


def _read_tar(unit: WorkUnit, opts: dict) -> Iterator[pa.Table]:
    """The shard's rows; a transient storage error mid-shard (see `pipeline.retry`) re-reads it from the start,
    skipping the rows already yielded (a tar's member order is fixed), instead of ending the shard with an error."""
    done = 0  # rows yielded so far
    for attempt in range(retry.ATTEMPTS + 1):
        try:
            for table in _read_tar_once(unit, opts, retry_transient=attempt < retry.ATTEMPTS):
                if done:
                    table = table.filter(pc.greater_equal(table.column("unit_index"), done))
                if table.num_rows:
                    done = table.column("unit_index")[-1].as_py() + 1
                    yield table
            return
        except _TransientTarError:
            time.sleep(retry.delay(attempt))


def _read_tar_once(unit: WorkUnit, opts: dict, *, retry_transient: bool) -> Iterator[pa.Table]:
    rows: list[dict] = []
    held: dict | None = None  # the newest member is held back until we know whether it is the last
    index = 0
    error: str | None = None
    try:
        # Seekable mode ("r:"), not stream mode: fsspec files seek (s3fs reads ahead in blocks), and a known
        # size lets us tell a clean end of archive from a truncated one, which tarfile treats the same.
        with fsspec.open(unit.location, "rb", **opts) as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for member in tf:
                if not member.isfile() or not is_image_name(member.name):
                    continue
                row = dict(
                    unit_id=unit.unit_id,
                    unit_index=index,
                    unit_total=-1,
                    image_uri=f"{unit.image_uri}{TAR_MEMBER_SEP}{member.name}",
                )
                try:
                    extracted = tf.extractfile(member)
                    row.update(data=extracted.read() if extracted else b"", read_error=None)
                except (tarfile.TarError, OSError, EOFError) as e:
                    if retry.is_transient(e):
                        raise  # a storage hiccup, not a corrupt member: handled for the whole shard below
                    row.update(data=None, read_error=f"corrupt tar member: {type(e).__name__}: {e}")
                    error = f"corrupt tar shard after member {member.name!r}: {type(e).__name__}: {e}"
                if held is not None:
                    rows.append(held)
                held = row
                index += 1
                if len(rows) >= READ_CHUNK_ROWS:
                    yield _rows_table(rows)
                    rows = []
                if error:
                    break
            if error is None:
                error = _end_of_archive_problem(tf)
    except Exception as e:
        transient = retry.is_transient(e)  # also aiohttp's ClientPayloadError (a body cut short), no OSError
        if not transient and not isinstance(e, (tarfile.TarError, OSError, EOFError)):
            raise
        if transient and retry_transient:
            raise _TransientTarError from e
        error = f"corrupt or unreadable tar shard: {describe_storage_error(unit.image_uri, e)}"
    if error or held is None:
        # The shard itself gets a row when it ends early or holds no image: it is an input we could not fully read.
        if held is not None:
            rows.append(held)
        rows.append(
            dict(
                unit_id=unit.unit_id,
                unit_index=index,
                unit_total=index + 1,
                image_uri=unit.image_uri,
                data=None,
                read_error=error or "tar shard holds no image members",
            )
        )
    else:
        held["unit_total"] = index
        rows.append(held)
    yield _rows_table(rows)


def _end_of_archive_problem(tf: tarfile.TarFile) -> str | None:
    """tarfile stops silently at a truncated or corrupt header; a real archive ends with a zero block there."""
    tf.fileobj.seek(tf.offset)
    block = tf.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0"):
        return None
    what = "ends inside a header (truncated)" if len(block) < tarfile.BLOCKSIZE else "has a corrupt header"
    return f"corrupt tar shard: {what} at byte {tf.offset}"
