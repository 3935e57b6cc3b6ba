"""The output contract: Arrow schemas of `images/` and `detections/` (documented in the README).

`images/`: one row per input. `detections/`: one row per instance with score >= model.score_threshold.
Masks are COCO compressed RLE of the full image (`size` = [height, width], `counts` ASCII), decodable with
`pycocotools.mask.decode({"size": size, "counts": counts})`. Boxes are COCO `[x, y, w, h]` in image pixels of the
image as a viewer shows it (EXIF orientation applied).
"""

from __future__ import annotations

import pyarrow as pa

# The names under --output (what each holds: docs/segment-job.md, "Output layout").
IMAGES_DIR = "images"
DETECTIONS_DIR = "detections"
COMMITTED_DIR = "_committed"
STATS_DIR = "_stats"
PLAN_DIR = "_plan"
CONFIG_FILE = "_config.json"
SUCCESS_FILE = "_SUCCESS.json"
LEASE_FILE = "_lease.json"
FAULTS_DIR = "_faults"  # per-unit records of device failures (pipeline.segment.faults)

STATUS_OK = "ok"
STATUS_ERROR = "error"

MASK_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])

IMAGES_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("status", pa.string()),  # "ok" | "error"
        ("error", pa.string()),  # reason, null when ok
        ("height", pa.int32()),  # null when the image could not be decoded
        ("width", pa.int32()),
        ("num_detections", pa.int32()),  # rows in detections/ for this image (0 on error)
        ("bytes", pa.int64()),  # size of the encoded input, null when it could not be read
        # The input object's identity when it was read, as the store reports it: `etag=<ETag>` (S3 and other stores
        # with ETags), else `size=<bytes> mtime=<ISO-8601 UTC>` (local files); a tar member carries its shard's.
        # Null when the input could not be read, and in files written before the column existed.
        ("source_version", pa.string()),
        ("decode_ms", pa.float32()),
        ("infer_ms", pa.float32()),  # this image's share of its batch's model + postprocess time
        ("unit_id", pa.string()),  # the work unit (commit granularity) this input belongs to
        ("model_id", pa.string()),
        ("run_id", pa.string()),
    ]
)

# Set by the writer, the same on every row of one file.
FILE_COLUMNS = ("unit_id", "model_id", "run_id")
# What an input fills by name (`pipeline.segment.writer.UnitWriter.add`); the writer sets the rest (its uri, status,
# error, detection count and FILE_COLUMNS).
INPUT_COLUMNS = frozenset(IMAGES_SCHEMA.names) - {
    "image_uri",
    "status",
    "error",
    "num_detections",
    *FILE_COLUMNS,
}

DETECTION_FIELDS = [
    ("instance", pa.int32()),  # 0-based index within the image, score-descending
    ("label", pa.int32()),
    ("label_name", pa.string()),
    ("score", pa.float32()),
    ("bbox", pa.list_(pa.float32())),  # [x, y, w, h]
    ("area", pa.int64()),  # mask pixels
    ("mask", MASK_TYPE),
]

DETECTIONS_SCHEMA = pa.schema(
    [("image_uri", pa.string()), *DETECTION_FIELDS, ("model_id", pa.string()), ("run_id", pa.string())]
)
