"""A results folder as a COCO instances file for labelling tools: `export_coco(results, url, ...)`.

What `jobs/query.py RESULTS export --format coco` writes (docs/query.md, "Export for labelling tools"):

- `images`: the results' `status = 'ok'` images (error rows never: they have no size and no detections), narrowed by
  `where`, a DuckDB condition on the `images` table (it may use `detections` in a subquery). Each is
  `{"id", "file_name", "width", "height"}`; ids are 1, 2, ... in `image_uri` order (the same
  selection always gets the same ids).
- `file_name`: `image_uri` without the `images_root` prefix (a folder: `s3://b/photos` and `s3://b/photos/` are the
  same; an image outside it is an error), or the whole `image_uri` without `images_root`. A tar member
  `<shard>.tar#<member>` is named by its member path (`cat/001.jpg`), whatever the root: the name it has once the
  shards are unpacked into one folder, and the name `jobs/evaluate.py` matches it by. Two images with the same
  file_name (two shards holding the same member name) are an error.
- `categories`: every `label_name` in the results' detections (all of them, whatever `where` and `min_score` keep, so
  exports of one results folder share their ids). The id is the model's `label` index when every detection carries
  one, one per name, all >= 1 (for torchvision's COCO weights these are COCO's own category ids); otherwise 1..K in
  sorted name order (results from a tool without `label`).
- `annotations`: one per detection of an exported image with `score >= min_score`, in the order of the detections'
  files: `id` (1, 2, ...), `image_id`, `category_id`, `segmentation` (the stored COCO compressed RLE,
  `{"size": [h, w], "counts": str}`), `area` (mask pixels), `bbox` (`[x, y, w, h]`), `iscrowd` 0, `score`. Numbers
  are the stored float32 values, written as the shortest decimal that reads back as the same float32.

Memory stays flat in the number of detections. Three passes, each streamed: the label names (the detections' two
label columns), the images (one DuckDB query, fetched in batches, written as they come), then the annotations, from
the detections read in record batches through `pyarrow.dataset`, one file at a time, and formatted by Arrow's string
kernels. What is held is `ImageIds`, about 80 bytes per exported image. The file is published whole or not at all:
locally through a hidden temporary name and a rename, on object stores by completing the upload only after the last
byte (a failure aborts it).
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from json.encoder import encode_basestring_ascii as json_string
from typing import BinaryIO

import duckdb
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pycocotools import mask as mask_utils

from pipeline.errors import describe_storage_error
from pipeline.results.common import REQUIRED, QueryError, as_results, missing_column, options_for
from pipeline.results.open import Results
from pipeline.results.sql import connect, one_line
from pipeline.segment.naming import split_tar_member
from pipeline.segment.schema import DETECTIONS_DIR, IMAGES_DIR, STATUS_OK
from pipeline.segment.storage import is_local

FORMATS = ("coco",)
BATCH_ROWS = 8192  # detection rows per record batch
CATEGORY_IDS_LABEL = "label index"
CATEGORY_IDS_SORTED = "sorted names"
_DETECTION_COLUMNS = ["image_uri", "label_name", "score", "bbox", "area", "mask"]


@dataclasses.dataclass(frozen=True)
class Export:
    """What `export_coco` wrote."""

    url: str
    images: int
    annotations: int
    categories: int
    category_ids: str  # CATEGORY_IDS_LABEL or CATEGORY_IDS_SORTED
    error_images: int  # images in the selection left out for status != 'ok'
    below_min_score: int  # detections of exported images left out by min_score


def export_coco(
    results: Results | str,
    url: str,
    *,
    where: str | None = None,
    min_score: float = 0.0,
    images_root: str | None = None,
    storage_options: dict | None = None,
) -> Export:
    """Write the COCO instances file of `results` to `url` (local path or fsspec URL; see the module docstring).

    `storage_options` open the results (when given as a URL) and `url`. Raises `QueryError` (one line) for a bad
    `where`, a required column that is missing, an image outside `images_root`, a duplicate file_name, or a storage
    failure; nothing is left at `url` then.
    """
    results = as_results(results, storage_options)
    condition = f"({where})" if where and where.strip() else "true"
    root = None if images_root is None else _folder(images_root)
    with _arrow_memory_returned():
        return _export(results, url, condition, min_score, root, storage_options)


def _export(
    results: Results,
    url: str,
    condition: str,
    min_score: float,
    root: str | None,
    storage_options: dict | None,
) -> Export:
    categories, rule = _categories(results)
    with contextlib.ExitStack() as duckdb_open:
        con = duckdb_open.enter_context(connect(results))
        error_images, fill_sizes = _check_images(con, condition)
        with _published(url, storage_options) as f:
            f.write(_header(results, categories))
            f.write(b',\n"images": [')
            image_ids = _write_images(f, _select_images(con, condition, fill_sizes), root)
            # DuckDB's buffers (they grow with the files and images it scanned) go before the annotations pass,
            # which needs only the ids: with them kept, the peak RSS grew 13-15% from 10^5 to 10^6 detections,
            # without them 8% (bench/export.py, BENCHMARKS.md).
            duckdb_open.close()
            f.write(b'\n],\n"annotations": [')
            cat_ids = {c["name"]: c["id"] for c in categories}
            annotations, below = _write_annotations(f, results, image_ids, cat_ids, min_score)
            f.write(b"\n]}\n")
    return Export(
        url=url,
        images=len(image_ids),
        annotations=annotations,
        categories=len(categories),
        category_ids=rule,
        error_images=error_images,
        below_min_score=below,
    )


# --- categories and images --------------------------------------------------------------------------------------------


def _categories(results: Results) -> tuple[list[dict], str]:
    """`[{"id", "name"}, ...]` for every label_name of the detections, and which id rule applied."""
    labels: dict[str, set] = {}  # label_name -> the label indices it comes with (None: a row without one)
    for batch in _detection_batches(results, ["label_name", "label"]):
        pairs = (
            pa.Table.from_batches([batch]).group_by(["label_name", "label"], use_threads=False).aggregate([])
        )
        for name, label in zip(pairs.column(0).to_pylist(), pairs.column(1).to_pylist()):
            if name is None:
                raise missing_column(DETECTIONS_DIR, "label_name")
            labels.setdefault(name, set()).add(label)
    names = sorted(labels)
    ids = [next(iter(labels[name])) for name in names if len(labels[name]) == 1]
    # The model's own index only when it names each class unambiguously; torchvision's label 0 is the background.
    if len(ids) == len(names) and None not in ids and min(ids, default=1) >= 1 and len(set(ids)) == len(ids):
        return [{"id": i, "name": name} for i, name in sorted(zip(ids, names))], CATEGORY_IDS_LABEL
    return [{"id": i, "name": name} for i, name in enumerate(names, 1)], CATEGORY_IDS_SORTED


def _detection_batches(results: Results, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The detections' `columns` in record batches, in file order.

    One file at a time: the dataset's own scanner reads ahead of a slower consumer without bound (all of 600k
    detections were buffered when measured), a fragment only as far as its file.
    """
    dataset = results.dataset(DETECTIONS_DIR)
    for fragment in dataset.get_fragments():
        yield from fragment.to_batches(
            schema=dataset.schema,  # a column the file lacks reads as nulls
            columns=columns,
            batch_size=BATCH_ROWS,
            memory_pool=pa.default_memory_pool(),  # the reader's C++ default would be mimalloc whatever pyarrow's is
        )


def _check_images(con: duckdb.DuckDBPyConnection, condition: str) -> tuple[int, bool]:
    """One scan of the selected images: (rows in error, whether some ok row lacks its size). Runs the user's
    condition first, so a bad `--where` fails before anything is written."""
    query = (
        f"SELECT count(*) FILTER (WHERE status IS NULL), count(*) FILTER (WHERE image_uri IS NULL), "
        f"count(*) FILTER (WHERE status <> '{STATUS_OK}'), "
        f"count(*) FILTER (WHERE status = '{STATUS_OK}' AND (height IS NULL OR width IS NULL)) "
        f"FROM images WHERE {condition}"
    )
    try:
        no_status, no_uri, errors, unsized = con.sql(query).fetchall()[0]
    except duckdb.Error as e:
        raise QueryError(f"--where: {one_line(str(e))}") from None
    for column, nulls in (("status", no_status), ("image_uri", no_uri)):
        if nulls:
            raise missing_column(IMAGES_DIR, column)
    return errors, unsized > 0


def _select_images(con: duckdb.DuckDBPyConnection, condition: str, fill_sizes: bool) -> pa.RecordBatchReader:
    """`image_uri`, `height`, `width` of the selected ok images, in record batches, sorted by `image_uri`: image ids
    are then the same for the same selection, whatever the files' order or the plan DuckDB picks for a `--where`
    (a subquery makes a join, whose rows come in no set order). DuckDB sorts out of core, spilling to disk."""
    selected = f"SELECT image_uri, height, width FROM images WHERE status = '{STATUS_OK}' AND {condition}"
    if fill_sizes:
        # Results from another tool may lack height/width: a detection's mask is at full image resolution. A join's
        # rows come in no set order, so these are sorted.
        selected = (
            "SELECT i.image_uri, coalesce(i.height, s.h) AS height, coalesce(i.width, s.w) AS width "
            f"FROM ({selected}) i LEFT JOIN (SELECT image_uri, any_value(mask.size[1]) AS h, "
            "any_value(mask.size[2]) AS w FROM detections GROUP BY 1) s USING (image_uri)"
        )
    return con.sql(f"SELECT * FROM ({selected}) ORDER BY image_uri").to_arrow_reader(BATCH_ROWS)


def _folder(prefix: str) -> str:
    """`prefix` as a folder ending in `/`; a local one normalised (`./demo/val` holds `demo/val/x.jpg`)."""
    if "://" not in prefix:
        prefix = posixpath.normpath(prefix)
    return prefix.rstrip("/") + "/"


def file_name(image_uri: str, images_root: str | None) -> str:
    """The COCO `file_name` of an image (module docstring); `images_root` ends with `/` or is None."""
    member = split_tar_member(image_uri)
    if member is not None:
        return posixpath.normpath(member[1]).lstrip("/")  # the path `tar -x` gives it
    if images_root is None:
        return image_uri
    if not image_uri.startswith(images_root):
        raise QueryError(
            f"--images-root {images_root}: {image_uri} is not under it (leave it out with --where, or give a "
            "root that holds every exported image)"
        )
    return image_uri[len(images_root) :]


class ImageIds:
    """`image_uri` -> image id (1, 2, ... in the order added) for the exported images, in ~80 bytes an image.

    The URIs are kept in one Arrow array and their 64-bit hashes sorted in NumPy; a lookup is a binary search whose
    hit is checked against the URI itself (a hash collision cannot attach a detection to the wrong image). No Python
    object per image: a dict of URIs would take ~160 bytes an image (2 GB at 10^7 images), and Arrow's own hash
    kernels rebuild their table on every call (~12 MB each for 67k images, when measured).
    """

    def __init__(self) -> None:
        self._chunks: list[pa.Array] = []
        self._keys = array.array("q")
        self.uris = pa.array([], pa.string())
        self._order = self._sorted = np.zeros(0, np.int64)
        self._spill: dict[str, int] = {}  # URIs whose hash another one shares (about never)

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, uris: pa.Array, values: list[str]) -> None:
        """Give the next ids to `uris` (`values` is its `to_pylist()`)."""
        self._chunks.append(uris.cast(pa.string()))
        self._keys.extend(hash(v) for v in values)

    def freeze(self) -> None:
        """Build the lookup once every image is added; two of one URI are a `QueryError`."""
        self.uris = pa.chunked_array(self._chunks, pa.string()).combine_chunks()
        self._chunks = []
        keys = np.frombuffer(self._keys, np.int64)
        self._order = np.argsort(keys, kind="stable")
        self._sorted = keys[self._order]
        equal = np.flatnonzero(self._sorted[1:] == self._sorted[:-1])
        for position in self._order[np.union1d(equal, equal + 1)]:  # the images whose hash another one has
            uri = self.uris[int(position)].as_py()
            if uri in self._spill:  # one URI twice: the same hash, always
                raise QueryError(f"images: {uri} is in the results twice; cannot give it one id")
            self._spill[uri] = int(position) + 1

    def ids(self, uris: list[str]) -> np.ndarray:
        """The ids of `uris`, int64; 0 for a URI that is not exported."""
        if not len(self._sorted) or not uris:
            return np.zeros(len(uris), np.int64)
        keys = np.fromiter((hash(u) for u in uris), np.int64, len(uris))
        at = np.minimum(np.searchsorted(self._sorted, keys), len(self._sorted) - 1)
        position = self._order[at]
        same = pc.equal(self.uris.take(pa.array(position)), pa.array(uris, pa.string()))
        found = (self._sorted[at] == keys) & same.to_numpy(zero_copy_only=False)
        ids = np.where(found, position + 1, 0)
        if self._spill:
            for k, uri in enumerate(uris):
                ids[k] = self._spill.get(uri, ids[k])
        return ids


def _write_images(f: BinaryIO, batches: pa.RecordBatchReader, images_root: str | None) -> ImageIds:
    """Write the `images` entries; returns their ids. Only tar members can share a file_name (a prefix taken off
    distinct URIs leaves distinct names), so only theirs are checked."""
    ids = ImageIds()
    members = []  # file_names of tar members, one Arrow array per batch
    for batch in batches:
        uris = batch.column(0).to_pylist()
        ids.add(batch.column(0), uris)
        chunk, names = [], []
        first = len(ids) - len(uris) + 1
        for image_id, uri, height, width in zip(
            itertools.count(first), uris, *(batch.column(i).to_pylist() for i in (1, 2))
        ):
            if height is None or width is None:
                where = f" for {uri} (and no detection to read it from)"
                raise missing_column(IMAGES_DIR, "height" if height is None else "width", where)
            name = file_name(uri, images_root)
            if split_tar_member(uri) is not None:
                names.append(name)
            chunk.append(
                f'{"," if image_id > 1 else ""}\n{{"id": {image_id}, "file_name": {json_string(name)}, '
                f'"width": {int(width)}, "height": {int(height)}}}'
            )
        f.write("".join(chunk).encode("ascii"))
        members.append(pa.array(names, pa.string()))
    ids.freeze()
    _check_members(pa.chunked_array(members, pa.string()).combine_chunks(), ids, images_root)
    return ids


def _check_members(names: pa.Array, ids: ImageIds, images_root: str | None) -> None:
    """A `QueryError` for a tar member whose file_name another member or a plain file of the root has."""
    if not len(names):
        return
    ordered = names.take(pc.array_sort_indices(names))  # a sort, not a hash table: no memory reserved for it
    twice = np.flatnonzero(pc.equal(ordered[1:], ordered[:-1]).to_numpy(zero_copy_only=False))
    if len(twice):
        raise _same_name(ordered[int(twice[0])].as_py())
    for chunk in range(0, len(names), BATCH_ROWS):
        as_files = [(images_root or "") + n for n in names.slice(chunk, BATCH_ROWS).to_pylist()]
        hit = np.flatnonzero(ids.ids(as_files))
        if len(hit):
            raise _same_name(names[chunk + int(hit[0])].as_py())


def _same_name(name: str) -> QueryError:
    return QueryError(
        f"file_name {name!r} would name two images (a tar member is named by its member path): leave one out "
        "with --where"
    )


def _header(results: Results, categories: list[dict]) -> bytes:
    info = {
        "description": f"Mask R-CNN detections of {results.url} (jobs/query.py export)",
        "date_created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    text = f'{{"info": {json.dumps(info)},\n"licenses": [],\n"categories": {json.dumps(categories)}'
    return text.encode("ascii")


# --- annotations ------------------------------------------------------------------------------------------------------


def _write_annotations(
    f: BinaryIO, results: Results, image_ids: ImageIds, cat_ids: dict[str, int], min_score: float
) -> tuple[int, int]:
    """Write the `annotations` entries from the detections, batch by batch; returns (written, below min_score)."""
    written = below = 0
    if not len(image_ids):
        return written, below
    for batch in _detection_batches(results, _DETECTION_COLUMNS):
        lines, low = _annotation_lines(batch, image_ids, cat_ids, min_score, first_id=written + 1)
        below += low
        if len(lines):
            # Each line starts with ",\n"; the first of the file with "\n" only.
            _write_values(f, lines, skip=0 if written else 1)
            written += len(lines)
    return written, below


def _annotation_lines(
    batch: pa.RecordBatch,
    image_ids: ImageIds,
    cat_ids: dict[str, int],
    min_score: float,
    *,
    first_id: int,
) -> tuple[pa.Array, int]:
    """One batch's annotations as JSON text, one string per annotation starting with ",\n", formatted by Arrow's
    kernels (no Python object per detection: the speed, and memory that does not grow with the batches read); and
    how many detections of exported images fell below `min_score`."""
    for column in REQUIRED[DETECTIONS_DIR]:
        if batch.column(column).null_count:
            raise missing_column(DETECTIONS_DIR, column)
    uris = batch.column("image_uri").dictionary_encode()
    ids_of = image_ids.ids(uris.dictionary.to_pylist())
    image_id = ids_of[uris.indices.to_numpy(zero_copy_only=False)]
    exported = image_id > 0
    high = pc.greater_equal(batch.column("score"), pa.scalar(min_score, pa.float32()))
    high = high.to_numpy(zero_copy_only=False)
    keep = exported & high
    below = int((exported & ~high).sum())
    batch, image_id = batch.filter(pa.array(keep)), image_id[keep]
    n = batch.num_rows
    if n == 0:
        return pa.array([], pa.string()), below

    bbox, mask, score = batch.column("bbox"), batch.column("mask"), batch.column("score")
    sizes, counts = mask.field("size"), mask.field("counts")
    if counts.null_count:
        raise missing_column(DETECTIONS_DIR, "mask", f" (its counts) for {_first_uri(batch)}")
    if (
        pc.any(pc.not_equal(pc.list_value_length(bbox), 4)).as_py()
        or pc.any(pc.not_equal(pc.list_value_length(sizes), 2)).as_py()
    ):
        raise QueryError(
            f"detections of {_first_uri(batch)}: a bbox without 4 numbers or a mask size without 2"
        )
    box = pc.list_flatten(bbox).to_numpy(zero_copy_only=False).reshape(n, 4)
    if not (np.isfinite(box).all() and np.isfinite(score.to_numpy(zero_copy_only=False)).all()):
        raise QueryError(f"detections of {_first_uri(batch)}: a bbox or score that is not a finite number")
    hw = pc.list_flatten(sizes).to_numpy(zero_copy_only=False).reshape(n, 2)
    names = batch.column("label_name").dictionary_encode()
    cats_of = [cat_ids.get(name) for name in names.dictionary.to_pylist()]
    if None in cats_of:  # categories come from a scan before this one
        raise QueryError(
            f"label_name {names.dictionary[cats_of.index(None)]} appeared during the export: were the results "
            "still being written? Export again when the run is done"
        )
    category_id = np.array(cats_of, dtype=np.int64)[names.indices.to_numpy(zero_copy_only=False)]
    area = batch.column("area")
    if area.null_count:  # results from another tool: the mask's own pixel count, which is what `area` stores
        area = pa.array(
            [
                int(mask_utils.area({"size": [int(h), int(w)], "counts": c.encode("ascii")}))
                if a is None
                else a
                for a, (h, w), c in zip(area.to_pylist(), hw, counts.to_pylist())
            ],
            pa.int64(),
        )
    return pc.binary_join_element_wise(
        ',\n{"id": ', _text(np.arange(first_id, first_id + n)),
        ', "image_id": ', _text(image_id),
        ', "category_id": ', _text(category_id),
        ', "segmentation": {"size": [', _text(hw[:, 0]), ", ", _text(hw[:, 1]),
        '], "counts": ', _json_strings(counts),
        '}, "area": ', _text(area),
        ', "bbox": [', _text(box[:, 0]), ", ", _text(box[:, 1]), ", ", _text(box[:, 2]), ", ", _text(box[:, 3]),
        '], "iscrowd": 0, "score": ', _text(score),
        "}",
        "",  # the separator between those pieces
    ), below  # fmt: skip


def _text(values) -> pa.Array:
    """Numbers as JSON text. A float32 becomes the shortest decimal that reads back as the same float32 ("0.9", not
    "0.8999999761581421"), which is Arrow's float -> string cast."""
    return pc.cast(values if isinstance(values, pa.Array) else pa.array(values), pa.string())


def _json_strings(values: pa.Array) -> pa.Array:
    """Strings as JSON string literals. COCO RLE counts are ASCII 48..111, so `\\` is the one character to escape;
    anything else that JSON escapes (a quote, a control character) takes the exact, slower way."""
    if pc.any(pc.match_substring_regex(values, r'["\x00-\x1f]')).as_py():
        return pa.array([json_string(v) for v in values.to_pylist()], pa.string())
    return pc.binary_join_element_wise('"', pc.replace_substring(values, "\\", "\\\\"), '"', "")


def _write_values(f: BinaryIO, lines: pa.Array, *, skip: int = 0) -> None:
    """Write the values of a string array back to back, less the first `skip` bytes: its data buffer between the
    first and the last offset, with no copy."""
    offsets = np.frombuffer(lines.buffers()[1], np.int32, len(lines) + 1, lines.offset * 4)
    f.write(memoryview(lines.buffers()[2])[offsets[0] + skip : offsets[-1]])


def _first_uri(batch: pa.RecordBatch) -> str:
    return batch.column("image_uri")[0].as_py()


# --- output -----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _arrow_memory_returned() -> Iterator[None]:
    """Arrow's default memory pool, for the block, is one that gives freed memory back to the OS at once: jemalloc with
    no decay (the system allocator where pyarrow has no jemalloc).

    The export's Arrow working set is ~25 MB whatever the size of the results, but its buffers change size batch by
    batch, and mimalloc, pyarrow's default, kept the freed ones: the RSS grew with the batches read (peak RSS of an
    export in a fresh process, of `bench/export.py`'s 10^5 -> 10^6 detections, 2 cores: 255-285 -> 307-315 MiB
    with mimalloc, 214-217 -> 236-243 MiB like this). What pyarrow's C++ code allocates from its own default (the Parquet reader's I/O) stays
    on mimalloc; `ARROW_DEFAULT_MEMORY_POOL=jemalloc` in the environment moves that too (202 -> 214-217 MiB). The pool
    is process-wide: other threads' Arrow allocations use it too while the block runs, which changes nothing but
    where they live; jemalloc's decay stays 0 afterwards (pyarrow has no getter to restore it).
    """
    previous = pa.default_memory_pool()
    try:
        pool = pa.jemalloc_memory_pool()
        pa.jemalloc_set_decay_ms(0)
    except NotImplementedError:  # a pyarrow built without jemalloc
        pool = pa.system_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


@contextlib.contextmanager
def _published(url: str, storage_options: dict | None) -> Iterator[BinaryIO]:
    """A binary file for `url` (local path or fsspec URL; parent folders created) that appears whole when the block
    ends and not at all when it raises. Storage failures become one `QueryError` line naming the URL."""
    tmp = None  # the local file's temporary name
    try:
        fs, path = fsspec.core.url_to_fs(url, **options_for(url, storage_options))
        if is_local(fs):  # object stores have no folders to make (and s3fs's makedirs would create a bucket)
            parent = posixpath.dirname(path)
            os.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
            f = open(tmp, "wb")  # noqa: SIM115  (closed below, on both paths)
        else:
            # Not committed on close: the upload is completed by commit() and aborted by discard().
            f = fs.open(path, "wb", autocommit=False)
    except Exception as e:  # noqa: BLE001  (storage failures become one line)
        raise QueryError(f"output: {describe_storage_error(url, e)}") from None
    try:
        yield f
        f.close()
        if tmp is not None:
            os.replace(tmp, path)
        else:
            f.commit()
    except QueryError:
        _discard(f, tmp)
        raise
    except OSError as e:  # a write, the upload or the rename failed
        _discard(f, tmp)
        raise QueryError(f"output: {describe_storage_error(url, e)}") from None
    except BaseException:
        _discard(f, tmp)
        raise


def _discard(f, tmp: str | None) -> None:
    """Leave nothing behind: remove the temporary file, or abort the upload."""
    with contextlib.suppress(Exception):
        if tmp is not None:
            f.close()
            os.remove(tmp)
        else:
            f.discard()
            f.closed = True  # else the file's __del__ would close it, which starts an upload
