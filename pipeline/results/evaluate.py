"""COCO box and mask AP of a segment job's results folder against COCO ground truth (pycocotools does the scoring).

Matching rules (documented in the README):
- an `image_uri` matches the ground-truth image whose `file_name` ends its path (`s3://b/val/000001.jpg` and
  `/data/val/000001.jpg` both match `000001.jpg` or `val/000001.jpg`; a tar member `<shard>#<member>` matches by the
  member's path). The longest matching suffix wins, so `a/x.jpg` and `b/x.jpg` stay apart when the GT names folders.
- a detection's `label_name` matches the category of the same name; detections of other names are counted and left
  out (a COCO-weights run scored against shapes ground truth has nothing to match, which is an error, not AP 0).
- every ground-truth image counts: one without a results row (or with an error row) is all misses, as COCO does.

Results hold only detections at or above the run's `model.score_threshold`; AP is comparable with published figures
when that threshold is low (torchvision evaluates at 0.05), so a higher one is reported as a warning.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from collections import Counter

import fsspec
import pyarrow.compute as pc

from model.coco_eval import evaluate
from pipeline.errors import JobError, describe_storage_error
from pipeline.results.open import Results

# torchvision's references evaluate with box_score_thresh=0.05; above it, low-score true positives are missing.
EVAL_SCORE_THRESHOLD = 0.05


@dataclasses.dataclass
class Evaluation:
    stats: dict[str, list[float]]  # {"bbox": COCOeval.stats, "segm": ...}
    predictions: list[dict]  # COCO results format (what `--predictions-json` writes)
    gt_images: int
    matched_images: int  # GT images with an ok results row
    missing_images: int  # GT images with no results row at all
    error_images: int  # GT images whose results row is an error
    unmatched_results: int  # results rows whose image_uri matches no GT file_name
    skipped_labels: dict[str, int]  # label_name -> detections with no GT category of that name
    warnings: list[str]

    def summary_line(self) -> str:
        return " ".join(f"{t}_AP={v[0]:.3f}" for t, v in self.stats.items())


def load_ground_truth(url: str, *, storage_options: dict | None = None) -> dict:
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            gt = json.load(f)
    except json.JSONDecodeError as e:
        raise JobError(f"{url}: not valid JSON ({e})") from None
    except Exception as e:  # noqa: BLE001  (storage failures: one line naming the URL)
        raise JobError(describe_storage_error(url, e)) from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt, dict) or not isinstance(gt.get(key), list):
            raise JobError(f"{url}: not a COCO instances file (no '{key}' list)")
    return gt


def _path_parts(uri: str) -> list[str]:
    # A tar member is "<shard>#<member>": the member's own path is what a GT file_name can name.
    path = uri.split("#", 1)[1] if "#" in uri else uri.split("://", 1)[-1]
    return [p for p in path.replace("\\", "/").split("/") if p]


def match_images(uris: list[str], file_names: dict[str, int]) -> dict[str, int]:
    """image_uri -> GT image id, by the longest GT `file_name` that ends the URI's path (whole components)."""
    by_name = {posixpath.normpath(name.lstrip("./")): image_id for name, image_id in file_names.items()}
    depth = max((name.count("/") + 1 for name in by_name), default=1)
    matched = {}
    for uri in uris:
        parts = _path_parts(uri)
        for k in range(min(depth, len(parts)), 0, -1):
            image_id = by_name.get("/".join(parts[-k:]))
            if image_id is not None:
                matched[uri] = image_id
                break
    return matched


def evaluate_results(results: Results, gt: dict, *, verbose: bool = True) -> Evaluation:
    """Score `results` against the COCO dict `gt`. Raises `JobError` when nothing can be matched."""
    warnings = []
    images = results.table("images", columns=["image_uri", "status"])
    file_names = {img["file_name"]: int(img["id"]) for img in gt["images"]}
    if len(file_names) != len(gt["images"]):
        raise JobError(
            "ground truth: two images share a file_name; results could not be matched unambiguously"
        )
    uris = images.column("image_uri").to_pylist()
    status = dict(zip(uris, images.column("status").to_pylist()))
    matched = match_images(uris, file_names)
    if not matched:
        example = uris[0] if uris else "(no images)"
        raise JobError(
            f"no results image matches a ground-truth file_name (e.g. {example!r} vs "
            f"{next(iter(file_names), '(no images)')!r}): is this the right annotations file?"
        )
    hits = Counter(matched.values())
    doubled = [i for i, n in hits.items() if n > 1]
    if doubled:
        raise JobError(
            f"{len(doubled)} ground-truth images match several results rows (e.g. id {doubled[0]})"
        )
    ok_ids = {image_id for uri, image_id in matched.items() if status[uri] == "ok"}

    config = results.config or {}
    threshold = (config.get("config") or {}).get("model", {}).get("score_threshold")
    if isinstance(threshold, (int, float)) and threshold > EVAL_SCORE_THRESHOLD:
        warnings.append(
            f"the run kept detections with score >= {threshold}; COCO AP is usually measured from "
            f"{EVAL_SCORE_THRESHOLD} (re-run with --set model.score_threshold={EVAL_SCORE_THRESHOLD}), "
            "so these figures read low"
        )

    cat_by_name = {c["name"]: int(c["id"]) for c in gt["categories"]}
    wanted = list(matched)
    det = results.table(
        "detections",
        columns=["image_uri", "label_name", "score", "bbox", "mask"],
        filter=pc.field("image_uri").isin(wanted),
    )
    predictions, skipped = [], Counter()
    for row in det.to_pylist():
        cat = cat_by_name.get(row["label_name"])
        if cat is None:
            skipped[row["label_name"]] += 1
            continue
        mask = row["mask"]
        predictions.append(
            {
                "image_id": matched[row["image_uri"]],
                "category_id": cat,
                "bbox": [float(v) for v in row["bbox"]],
                "score": float(row["score"]),
                "segmentation": {"size": [int(v) for v in mask["size"]], "counts": mask["counts"]},
            }
        )
    if skipped and not predictions:
        raise JobError(
            f"no detection's label_name is a ground-truth category: results have {sorted(skipped)[:5]}, "
            f"the ground truth {sorted(cat_by_name)[:5]}"
        )
    stats = evaluate(gt, predictions, verbose=verbose)
    gt_ids = {int(img["id"]) for img in gt["images"]}
    return Evaluation(
        stats=stats,
        predictions=predictions,
        gt_images=len(gt_ids),
        matched_images=len(ok_ids),
        missing_images=len(gt_ids - set(matched.values())),
        error_images=len({i for u, i in matched.items() if status[u] != "ok"}),
        unmatched_results=len(uris) - len(matched),
        skipped_labels=dict(skipped),
        warnings=warnings,
    )
