"""Plan: the inputs behind `--input`, grouped into work units and stored under `<output>/_plan/`.

`--input` forms (any fsspec protocol; s3:// via s3fs):
- a folder / prefix: every image file (and `.tar` shard) below it, extensions matched case-insensitively; folders
  are listed `LIST_THREADS` at a time (an object store lists 1,000 keys per request, so one prefix at a time would
  hold a large archive's planning to a few thousand keys per second);
- a glob (`*`, `?`, `[`): the matching files (folders among them are walked);
- a `.tar` file, or `.tar` files found by the forms above: WebDataset-style shards, each image member one input;
- a manifest: any other single file. Text (one URL or path per line; `#` comments), CSV (`.csv`, `.tsv`, optionally
  `.gz`: a header naming a `url` / `uri` / `image_uri` / `path` column, or `bucket` and `key`), Parquet (`.parquet`,
  the same columns), or an S3 Inventory report's `manifest.json` (its CSV, Parquet or ORC parts). Manifests are read
  by Ray tasks, one per manifest file or inventory part, in parallel; relative paths are relative to the manifest's
  folder.

Naming (`image_uri`): the URL as the user addressed it — `s3://bucket/key` for object stores, and a local path stays
local (relative if the input was given relative). A tar member is `<shard uri>#<member name>`.

The plan is written once and reused by every re-run (which therefore never lists the input again):

    _plan/files-<source>-<seq>.parquet   loose files (read_url, image_uri); one row group per work unit
    _plan/tars-<source>-<seq>.parquet    tar shards (read_url, image_uri); each row is one work unit
    _plan/index.json                     written last: the unit size and the parts with their input and unit counts

A work unit is `unit_size` loose files (one row group of a files part) or one tar shard, and its id is its ordinal
in index order (`%08d`). The driver holds the parts, never the units: Ray Data expands the parts into units where
they are processed (`expand_part`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import json
import os
import posixpath
import re
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.utils import glob_translate

from pipeline import retry
from pipeline.errors import JobError, describe_storage_error, one_line, root_cause

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
TAR_EXTENSIONS = (".tar",)
TAR_MEMBER_SEP = "#"
INDEX = "index.json"
LIST_THREADS = 16  # folder listings in flight while planning
PART_UNITS = 32  # work units per files part: 65,536 rows at the default unit size
TAR_PART_ROWS = 4096  # shards per tars part
PLAN_SCHEMA = pa.schema([("read_url", pa.string()), ("image_uri", pa.string())])


@dataclasses.dataclass(frozen=True)
class InputRef:
    kind: str  # "file" | "tar"
    read_url: str  # absolute, protocol-qualified (plain absolute path for local files)
    image_uri: str  # as the user addressed it


@dataclasses.dataclass(frozen=True)
class PlanPart:
    name: str  # file name under _plan/
    kind: str  # "files" | "tars"
    inputs: int  # rows
    units: int  # work units it holds: ceil(inputs / unit_size) for files, inputs for tars
    first_unit: int = -1  # ordinal of its first unit (assigned by the index)


@dataclasses.dataclass(frozen=True)
class Plan:
    url: str  # the _plan/ folder (absolute path or protocol-qualified URL)
    unit_size: int
    parts: tuple[PlanPart, ...]
    skipped: dict[str, int]  # what planning left out, by reason (duplicate manifest lines, ...)

    @property
    def inputs(self) -> int:
        return sum(p.inputs for p in self.parts)

    @property
    def units(self) -> int:
        return sum(p.units for p in self.parts)

    def part_url(self, part: PlanPart) -> str:
        return f"{self.url}/{part.name}"


@dataclasses.dataclass(frozen=True)
class Unit:
    """One work unit, as Ray Data hands it to an inference actor."""

    ordinal: int
    unit_id: str
    kind: str  # "files" | "tar"
    location: str  # files: the plan part holding its list; tar: the shard's read URL
    index: int  # files: its row group in that part; tar: -1
    image_uri: str  # tar: the shard as the user addressed it; files: ""
    count: int  # files: number of inputs; tar: -1 (known once read)


def unit_id(ordinal: int) -> str:
    return f"{ordinal:08d}"


def is_image_name(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_tar_name(name: str) -> bool:
    return name.lower().endswith(TAR_EXTENSIONS)


def _has_magic(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _display_uri(fs, path: str, user_url: str) -> str:
    """How a listed path is named in outputs: protocol-qualified for remote stores, local paths as the user wrote."""
    if _is_local(fs):
        return os.path.relpath(path) if not os.path.isabs(user_url) and "://" not in user_url else path
    return fs.unstrip_protocol(path)


def _read_url(fs, path: str) -> str:
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def listing_fs(url: str, storage_options: dict | None):
    """(filesystem, path) for listing `url` without fsspec's listings cache: the cache would keep every folder
    ever listed, so planning a large archive would hold all of its names in memory."""
    return fsspec.core.url_to_fs(url, use_listings_cache=False, **(storage_options or {}))


# --- listing (the driver) ------------------------------------------------------------------------------------------


def iter_inputs(
    url: str,
    *,
    storage_options: dict | None = None,
    skipped: Counter | None = None,
    threads: int = LIST_THREADS,
) -> Iterator[InputRef]:
    """Yield the inputs behind `url` in a deterministic order, streaming: folders breadth first (each listing's
    files sorted, its sub-folders queued in sorted order), `threads` listings in flight.

    A manifest (any single file that is neither an image nor a tar) is read here one source after another; the job
    reads manifests with Ray tasks instead (`plan_manifest`). Each input comes once: a manifest naming a file twice
    (in any spelling: relative or absolute) skips the repeat and counts it in `skipped`.
    """
    skipped = Counter() if skipped is None else skipped
    fs, path = listing_fs(url, storage_options)
    if _has_magic(path):
        yield from _glob(fs, path, url, threads)
        return
    if fs.isdir(path):
        yield from _walk(fs, [path], url, threads)
    elif fs.isfile(path):
        name = posixpath.basename(path)
        if is_image_name(name) or is_tar_name(name):
            yield from _classify(fs, path, url)
        else:
            for source in manifest_sources(url, storage_options=storage_options):
                yield from read_manifest_source(source, storage_options=storage_options, skipped=skipped)
    else:
        raise FileNotFoundError(f"no such file, folder or prefix: {url}")


def is_manifest(url: str, *, storage_options: dict | None = None) -> bool:
    """Whether `url` names one file that is neither an image nor a tar shard (so: a manifest)."""
    fs, path = listing_fs(url, storage_options)
    if _has_magic(path):
        return False
    name = posixpath.basename(path)
    return not (is_image_name(name) or is_tar_name(name)) and not fs.isdir(path) and fs.isfile(path)


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


def _traverse(
    fs,
    roots: list[tuple[str, object]],
    visit: Callable[[str, object, list[str], list[str]], tuple[Iterable[InputRef], list[tuple[str, object]]]],
    threads: int,
    *,
    missing_ok: bool = False,
) -> Iterator[InputRef]:
    """Breadth-first over folders with `threads` listings in flight, in a deterministic order (queue order, not the
    order listings finish). `visit(folder, tag, files, subfolders)` returns the inputs to yield and the
    `(subfolder, tag)` pairs to list next. Memory: the queue of folder names and the listings in the window."""
    queue = collections.deque(roots)
    window: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="list") as pool:
        while queue or window:
            while queue and len(window) < 2 * max(1, threads):
                folder, tag = queue.popleft()
                window.append((folder, tag, pool.submit(_list, fs, folder)))
            folder, tag, listing = window.popleft()
            try:
                files, folders = listing.result()
            except FileNotFoundError:
                if not missing_ok:
                    raise
                continue  # a glob's root that does not exist, or a folder gone between two listings
            found, children = visit(folder, tag, files, folders)
            yield from found
            queue.extend(children)


def _walk(fs, roots: list[str], user_url: str, threads: int) -> Iterator[InputRef]:
    def visit(folder, tag, files, folders):
        return _classify_all(fs, files, user_url), [(d, None) for d in folders]

    yield from _traverse(fs, [(r, None) for r in roots], visit, threads)


def _glob(fs, pattern: str, user_url: str, threads: int) -> Iterator[InputRef]:
    """The inputs matching `pattern`, with fsspec's glob semantics (`*`, `?`, `[...]` within one path segment, `**`
    across segments) but listed with `_list`: never a silently skipped folder. A matched folder is walked whole.

    Listing starts at the deepest folder without magic characters and descends only into folders that can still
    match (`s3://b/2024-*/cam1/*.jpg` never lists `b/2023-01/`); from a `**` segment on, everything is listed. Once
    a folder matches, its contents come from its walk, so an input below it (`a/**` matches `a/x` and `a/x/y.jpg`)
    comes once.
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

    def visit(folder, level, files, folders):
        if level == "walk":
            return _classify_all(fs, files, user_url), [(d, "walk") for d in folders]
        found = _classify_all(fs, [f for f in files if full.match(f)], user_url)
        children = []
        for d in folders:  # d is at level + 1
            if full.match(d):
                children.append((d, "walk"))
            elif (deep is not None and level + 1 >= deep) or (level + 1 < depth and prefixes[level].match(d)):
                children.append((d, level + 1))
        return found, children

    yield from _traverse(fs, [(root, 0)], visit, threads, missing_ok=True)


def _classify_all(fs, paths: list[str], user_url: str) -> list[InputRef]:
    return [ref for p in paths for ref in _classify(fs, p, user_url)]


def _classify(fs, path: str, user_url: str) -> Iterator[InputRef]:
    name = posixpath.basename(path)
    if is_image_name(name):
        yield InputRef("file", _read_url(fs, path), _display_uri(fs, path, user_url))
    elif is_tar_name(name):
        yield InputRef("tar", _read_url(fs, path), _display_uri(fs, path, user_url))
    # other files met while walking (README, JSON annotations, ...) are not inputs


# --- manifests (Ray tasks, or `iter_inputs` without Ray) ------------------------------------------------------------

# Column names that hold an input's URL or path in CSV and Parquet manifests, in order of preference.
URL_COLUMNS = ("url", "uri", "image_uri", "path")


@dataclasses.dataclass(frozen=True)
class ManifestSource:
    """One file that lists inputs: a manifest, or one part of an S3 Inventory report."""

    url: str
    fmt: str  # "text" | "csv" | "parquet" | "orc"
    base: str  # the folder that relative paths are relative to (the manifest's own)
    user_url: str  # the manifest as the user named it (for naming relative entries)
    inventory: tuple[str, ...] = ()  # S3 Inventory: the CSV parts' column names (fileSchema); () otherwise


def manifest_sources(url: str, *, storage_options: dict | None = None) -> list[ManifestSource]:
    """The files to read for the manifest at `url`: itself, or the parts an S3 Inventory `manifest.json` lists."""
    fs, path = listing_fs(url, storage_options)
    name = posixpath.basename(path).lower()
    base = posixpath.dirname(path)
    if name.endswith(".json"):
        try:
            doc = json.loads(retry.call(fs.cat_file, path))
        except ValueError as e:
            raise JobError(
                f"input: {url}: a .json manifest must be an S3 Inventory manifest.json ({e})"
            ) from None
        if not (isinstance(doc, dict) and isinstance(doc.get("files"), list) and "fileFormat" in doc):
            raise JobError(
                f"input: {url}: not an S3 Inventory manifest.json (expected 'fileFormat' and 'files' keys); "
                "list inputs one per line in a text, CSV or Parquet manifest instead"
            )
        return _inventory_sources(fs, url, doc)
    fmt = "text"
    stem = name[: -len(".gz")] if name.endswith(".gz") else name
    if stem.endswith((".csv", ".tsv")):
        fmt = "csv"
    elif stem.endswith(".parquet"):
        fmt = "parquet"
    elif stem.endswith(".orc"):
        fmt = "orc"
    return [ManifestSource(url=_read_url(fs, path), fmt=fmt, base=base, user_url=url)]


def _inventory_sources(fs, url: str, doc: dict) -> list[ManifestSource]:
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
    sources = []
    for f in doc["files"]:
        part_url = (
            fs.unstrip_protocol(f"{bucket}/{f['key']}") if not _is_local(fs) else f"/{bucket}/{f['key']}"
        )
        sources.append(
            ManifestSource(url=part_url, fmt=fmt, base="", user_url=url, inventory=columns or ("-",))
        )
    return sources


def read_manifest_source(
    source: ManifestSource, *, storage_options: dict | None = None, skipped: Counter | None = None
) -> Iterator[InputRef]:
    """The inputs one manifest file lists, in its order; a file it names twice comes once (counted in `skipped`).

    S3 Inventory parts are listings of a whole bucket: their keys that are not images or tar shards are left out
    (counted), as are delete markers and non-current versions. Other manifests name their inputs on purpose, so
    every entry is an input (one that is not an image becomes an error row saying so).
    """
    skipped = Counter() if skipped is None else skipped
    fs, path = fsspec.core.url_to_fs(source.url, **(storage_options or {}))
    seen: set[str] = set()  # read URLs so far: one string per entry, held by this task while it plans
    for entry in _entries(fs, path, source):
        if source.inventory:
            if entry.endswith("/"):
                continue  # a "folder" object
            name = posixpath.basename(entry)
            if not (is_image_name(name) or is_tar_name(name)):
                skipped["inventory keys that are not images or .tar"] += 1
                continue
        ref = _ref_for_entry(fs, entry, source)
        if ref.read_url in seen:
            skipped["duplicate manifest lines"] += 1
            continue
        seen.add(ref.read_url)
        yield ref


def _ref_for_entry(fs, entry: str, source: ManifestSource) -> InputRef:
    kind = "tar" if is_tar_name(entry) else "file"
    if "://" in entry or entry.startswith("/"):
        # Entries on another store are read with the manifest's own credentials/endpoint.
        entry_fs, entry_path = fsspec.core.url_to_fs(entry, **dict(getattr(fs, "storage_options", {}) or {}))
        return InputRef(kind, _read_url(entry_fs, entry_path), entry)
    joined = posixpath.normpath(posixpath.join(source.base, entry))
    return InputRef(kind, _read_url(fs, joined), _display_uri(fs, joined, source.user_url))


def _entries(fs, path: str, source: ManifestSource) -> Iterator[str]:
    """The URL or path of each entry, as written (S3 Inventory: `s3://bucket/key`, key decoded)."""
    if source.fmt == "text":
        with fs.open(path, "rt", encoding="utf-8", compression="infer") as f:
            for raw in f:
                line = raw.strip()
                if line and not line.startswith("#"):
                    yield line
        return
    for batch in _record_batches(fs, path, source):
        yield from _batch_entries(batch, source)


def _record_batches(fs, path: str, source: ManifestSource) -> Iterator[pa.RecordBatch]:
    if source.fmt == "csv":
        import pyarrow.csv as pacsv

        delimiter = "\t" if path.lower().removesuffix(".gz").endswith(".tsv") else ","
        read = pacsv.ReadOptions(
            column_names=list(source.inventory) if source.inventory else None, block_size=4 << 20
        )
        convert = pacsv.ConvertOptions(
            column_types={c: pa.string() for c in source.inventory} if source.inventory else None,
            strings_can_be_null=False,
        )
        with fs.open(path, "rb", compression="infer") as f:
            reader = pacsv.open_csv(
                f,
                read_options=read,
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=convert,
            )
            yield from reader
    elif source.fmt == "parquet":
        with fs.open(path, "rb") as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=65_536)
    else:
        import pyarrow.orc as orc

        with fs.open(path, "rb") as f:
            yield from orc.ORCFile(f).read().to_batches(max_chunksize=65_536)


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "")


def _batch_entries(batch: pa.RecordBatch, source: ManifestSource) -> Iterator[str]:
    cols = {_norm(n): batch.column(i) for i, n in enumerate(batch.schema.names)}
    if "bucket" in cols and "key" in cols and not any(c in cols for c in URL_COLUMNS):
        keep = np.ones(batch.num_rows, dtype=bool)
        for flag, wanted in (("isdeletemarker", False), ("islatest", True)):
            if flag in cols:  # versioned inventories: only current, real objects
                values = np.array([str(v).lower() == "true" for v in cols[flag].to_pylist()])
                keep &= values == wanted
        buckets, keys = cols["bucket"].to_pylist(), cols["key"].to_pylist()
        for ok, bucket, key in zip(keep, buckets, keys):
            if ok and bucket and key:
                # S3 Inventory's CSV parts URL-encode keys (form encoding: '+' for a space); Parquet/ORC do not.
                if source.inventory and source.fmt == "csv":
                    key = urllib.parse.unquote_plus(key)
                yield f"s3://{bucket}/{key}"
        return
    column = next((cols[c] for c in URL_COLUMNS if c in cols), None)
    if column is None:
        raise JobError(
            f"input: {source.url}: manifest has no input column; name one of "
            f"{', '.join(URL_COLUMNS)}, or give 'bucket' and 'key' (columns found: {', '.join(batch.schema.names)})"
        )
    for value in column.to_pylist():
        if value is not None and str(value).strip():
            yield str(value).strip()


# --- writing and loading the plan ------------------------------------------------------------------------------------


class PlanWriter:
    """Groups inputs into parts under `plan_url` as they stream in; memory: one part's names.

    Files parts hold `unit_size * PART_UNITS` rows in row groups of `unit_size` (row group k = work unit k of the
    part, read by one ranged request); tars parts hold `TAR_PART_ROWS` shards, one unit each. `source` numbers the
    writer (one per manifest file read in parallel) so that parts from different writers never share a name.
    """

    def __init__(
        self, plan_url: str, *, unit_size: int, source: int = 0, storage_options: dict | None = None
    ):
        self.fs, self.root = fsspec.core.url_to_fs(plan_url, **(storage_options or {}))
        self.unit_size, self.source = unit_size, source
        self.parts: list[PlanPart] = []
        self._rows: dict[str, tuple[list[str], list[str]]] = {"files": ([], []), "tars": ([], [])}
        self._seq = 0
        if _is_local(self.fs):
            self.fs.makedirs(self.root, exist_ok=True)

    def add(self, ref: InputRef) -> None:
        kind = "tars" if ref.kind == "tar" else "files"
        urls, uris = self._rows[kind]
        urls.append(ref.read_url)
        uris.append(ref.image_uri)
        if len(urls) >= (TAR_PART_ROWS if kind == "tars" else self.unit_size * PART_UNITS):
            self._flush(kind)

    def close(self) -> list[PlanPart]:
        for kind in ("files", "tars"):
            self._flush(kind)
        return self.parts

    def _flush(self, kind: str) -> None:
        urls, uris = self._rows[kind]
        if not urls:
            return
        name = f"{kind}-{self.source:05d}-{self._seq:05d}.parquet"
        self._seq += 1
        table = pa.table({"read_url": pa.array(urls, pa.string()), "image_uri": pa.array(uris, pa.string())})
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=self.unit_size if kind == "files" else TAR_PART_ROWS)
        publish(self.fs, posixpath.join(self.root, name), buf.getvalue())
        units = -(-len(urls) // self.unit_size) if kind == "files" else len(urls)
        self.parts.append(PlanPart(name=name, kind=kind, inputs=len(urls), units=units))
        urls.clear()
        uris.clear()


def write_index(
    plan_url: str,
    parts: list[PlanPart],
    *,
    unit_size: int,
    skipped: dict[str, int],
    storage_options: dict | None = None,
) -> Plan:
    """Number the units (parts in name order) and publish the index: from now on the plan is what re-runs use."""
    fs, root = fsspec.core.url_to_fs(plan_url, **(storage_options or {}))
    numbered, first = [], 0
    for part in sorted(parts, key=lambda p: p.name):
        numbered.append(dataclasses.replace(part, first_unit=first))
        first += part.units
    doc = {
        "version": 2,
        "unit_size": unit_size,
        "inputs": sum(p.inputs for p in numbered),
        "units": first,
        "skipped": dict(skipped),
        "parts": [dataclasses.asdict(p) for p in numbered],
    }
    publish(fs, posixpath.join(root, INDEX), (json.dumps(doc, indent=1) + "\n").encode())
    return Plan(url=plan_url.rstrip("/"), unit_size=unit_size, parts=tuple(numbered), skipped=dict(skipped))


def load_plan(plan_url: str, *, storage_options: dict | None = None) -> Plan | None:
    """The plan at `plan_url`, or None when there is none yet (no index: planning never finished)."""
    fs, root = fsspec.core.url_to_fs(plan_url, **(storage_options or {}))
    try:
        doc = json.loads(retry.call(fs.cat_file, posixpath.join(root, INDEX)))
    except FileNotFoundError:
        return None
    parts = tuple(PlanPart(**p) for p in doc["parts"])
    return Plan(
        url=plan_url.rstrip("/"), unit_size=doc["unit_size"], parts=parts, skipped=doc.get("skipped", {})
    )


def clear_partial_plan(plan_url: str, *, storage_options: dict | None = None) -> None:
    """Remove the parts of a plan whose index was never written (a planning that was interrupted): nothing trusts
    them, and a new planning may name its parts differently."""
    fs, root = fsspec.core.url_to_fs(plan_url, **(storage_options or {}))
    try:
        names = retry.call(fs.ls, root, detail=False)
    except FileNotFoundError:
        return
    if names:
        retry.call(fs.rm, names)


def publish(fs, path: str, data: bytes) -> None:
    """Write `path` so that a reader sees all of `data` or no file: object stores publish an object only when its
    upload completes; local files go through a hidden temporary name and an atomic rename."""
    if not _is_local(fs):
        retry.call(fs.pipe_file, path, data)
        return
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plan_inputs(
    inputs: Iterable[InputRef], *, plan_url: str, unit_size: int, storage_options: dict | None = None
) -> list[PlanPart]:
    """Write the parts for `inputs` (the driver's listing) and return them; the caller writes the index."""
    writer = PlanWriter(plan_url, unit_size=unit_size, storage_options=storage_options)
    for ref in inputs:
        writer.add(ref)
    return writer.close()


def plan_manifest(
    sources: list[ManifestSource],
    *,
    plan_url: str,
    unit_size: int,
    manifest_options: dict | None,
    plan_options: dict | None,
    read_cpus: float,
) -> tuple[list[PlanPart], Counter]:
    """Read the manifest sources with one Ray task each, in parallel; each writes its own plan parts. Returns the
    parts and what was skipped. Needs a connected Ray."""
    import ray

    task = ray.remote(_plan_source).options(num_cpus=read_cpus, max_retries=3)
    refs = [
        task.remote(
            i,
            src,
            plan_url=plan_url,
            unit_size=unit_size,
            manifest_options=manifest_options,
            plan_options=plan_options,
        )
        for i, src in enumerate(sources)
    ]
    parts: list[PlanPart] = []
    skipped: Counter = Counter()
    for ref in refs:
        try:
            got_parts, got_skipped = ray.get(ref)
        except Exception as e:
            cause = root_cause(e)
            if isinstance(cause, JobError):  # the task's own one-line reason, without Ray's traceback
                raise JobError(one_line(cause)) from None
            raise
        parts += got_parts
        skipped.update(got_skipped)
    return parts, skipped


def _plan_source(
    i: int,
    source: ManifestSource,
    *,
    plan_url: str,
    unit_size: int,
    manifest_options: dict | None,
    plan_options: dict | None,
) -> tuple[list[PlanPart], dict[str, int]]:
    skipped: Counter = Counter()
    writer = PlanWriter(plan_url, unit_size=unit_size, source=i, storage_options=plan_options)
    try:
        for ref in read_manifest_source(source, storage_options=manifest_options, skipped=skipped):
            writer.add(ref)
        return writer.close(), dict(skipped)
    except JobError:
        raise
    except Exception as e:  # storage or format: one line naming the part
        raise JobError(f"input: {describe_storage_error(source.url, e)}") from None


# --- from parts to units (runs in Ray Data tasks) --------------------------------------------------------------------


def pending_parts(plan: Plan, done: np.ndarray) -> list[dict]:
    """One item per part that still has units to do, for Ray Data: the part and which of its units are done (a
    packed bitmap, 1 = done). `done` is a bool array indexed by unit ordinal."""
    items = []
    for part in plan.parts:
        mask = done[part.first_unit : part.first_unit + part.units]
        if mask.all():
            continue
        items.append({**dataclasses.asdict(part), "done": np.packbits(mask).tobytes()})
    return items


def expand_part(item: dict, *, plan_url: str, unit_size: int, plan_options: dict | None = None) -> list[dict]:
    """A `pending_parts` item → its units still to do, as `Unit` dicts (Ray Data's `flat_map`)."""
    part = PlanPart(**{k: item[k] for k in ("name", "kind", "inputs", "units", "first_unit")})
    done = np.unpackbits(np.frombuffer(item["done"], dtype=np.uint8), count=part.units).astype(bool)
    location = f"{plan_url}/{part.name}"
    units = []
    if part.kind == "files":
        for k in range(part.units):
            if not done[k]:
                count = min(unit_size, part.inputs - k * unit_size)
                o = part.first_unit + k
                units.append(dataclasses.asdict(Unit(o, unit_id(o), "files", location, k, "", count)))
        return units
    fs, path = fsspec.core.url_to_fs(location, **(plan_options or {}))
    table = pq.read_table(io.BytesIO(retry.call(fs.cat_file, path)))
    for k, (read_url, uri) in enumerate(
        zip(table.column("read_url").to_pylist(), table.column("image_uri").to_pylist())
    ):
        if not done[k]:
            o = part.first_unit + k
            units.append(dataclasses.asdict(Unit(o, unit_id(o), "tar", read_url, -1, uri, -1)))
    return units


def read_unit_list(unit: Unit, *, plan_options: dict | None = None) -> list[tuple[str, str]]:
    """A files unit's `(read_url, image_uri)` pairs: row group `unit.index` of its plan part."""
    fs, path = fsspec.core.url_to_fs(unit.location, **(plan_options or {}))

    def read() -> pa.Table:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).read_row_group(unit.index)

    table = retry.call(read)
    return list(zip(table.column("read_url").to_pylist(), table.column("image_uri").to_pylist()))
