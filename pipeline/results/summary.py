"""The summary of a results folder: `summary(results)` → a dict (counts, error reasons, labels, score distribution,
run and model ids); `format_summary` turns it into the lines `jobs/query.py summary` prints.
"""

from __future__ import annotations

from typing import Any

from pipeline.results.common import as_results, missing_column
from pipeline.results.open import Results
from pipeline.results.sql import connect
from pipeline.segment.schema import DETECTIONS_DIR, IMAGES_DIR, STATUS_OK

TOP_ERRORS = 5
SCORE_BINS = 10  # histogram bins of width 0.1 over [0, 1]


def summary(results: Results | str, *, storage_options: dict | None = None) -> dict[str, Any]:
    """Counts over the whole results folder, computed by DuckDB scans (memory does not grow with the archive).

    Keys: `url`, `complete` (whether `_SUCCESS.json` exists), `images`, `ok`, `errors`, `error_reasons` (the top 5
    kinds, i.e. the text before the first `:` as in the segment job's own summary, with counts), `detections`,
    `labels` (label_name → count, most frequent first), `score` (`min`, `q1`, `median`, `q3`, `max`, or None
    without detections), `score_histogram` (10 counts for the bins [0, 0.1), ..., [0.9, 1.0]), `run_ids`, `model_ids`.
    """
    results = as_results(results, storage_options)
    with connect(results) as con:
        # One scan of each table for the grouped counts, one more for the quantiles.
        img_groups = con.sql(
            "SELECT status, split_part(error, ':', 1) AS reason, model_id, run_id, count(*) AS n "
            "FROM images GROUP BY ALL"
        ).fetchall()
        # Scores are float32: 0.9 is stored as 0.89999998. Rounded to float32's 6 decimals first, a score shown
        # as 0.9 falls in [0.9, 1.0] as a reader expects, not in [0.8, 0.9).
        det_groups = con.sql(
            f"SELECT label_name, floor(round(score::DOUBLE, 6) * {SCORE_BINS})::INTEGER "
            "AS bin, model_id, run_id, count(*) AS n FROM detections GROUP BY ALL"
        ).fetchall()
        stats = con.sql(
            "SELECT min(score), quantile_cont(score, [0.25, 0.5, 0.75]), max(score) FROM detections"
        ).fetchall()[0]

    reasons: dict[str, int] = {}
    labels: dict[str, int] = {}
    histogram = [0] * SCORE_BINS
    ok = errors = 0
    run_ids, model_ids = set(), set()
    for status, reason, model_id, run_id, n in img_groups:
        if status is None:  # else every row would count as an error of reason "unknown"
            raise missing_column(IMAGES_DIR, "status")
        if status == STATUS_OK:
            ok += n
        else:
            errors += n
            key = reason if reason is not None else "unknown"
            reasons[key] = reasons.get(key, 0) + n
        run_ids.add(run_id)
        model_ids.add(model_id)
    for label_name, bin_, model_id, run_id, n in det_groups:
        if label_name is None or bin_ is None:
            raise missing_column(DETECTIONS_DIR, "label_name" if label_name is None else "score")
        labels[label_name] = labels.get(label_name, 0) + n
        # Clamped here, not by SQL's least(), which ignores a null (a missing score would land in the top bin).
        # 1.0 belongs to the last bin; a negative score cannot come from the model, kept countable anyway.
        histogram[min(max(0, bin_), SCORE_BINS - 1)] += n
        run_ids.add(run_id)
        model_ids.add(model_id)
    lo, quartiles, hi = stats
    values = [] if lo is None else [round(float(v), 6) for v in (lo, *quartiles, hi)]
    score = dict(zip(("min", "q1", "median", "q3", "max"), values)) or None
    return {
        "url": results.url,
        "complete": results.success is not None,
        "images": ok + errors,
        "ok": ok,
        "errors": errors,
        "error_reasons": dict(_most_common(reasons)[:TOP_ERRORS]),
        "detections": sum(labels.values()),
        "labels": dict(_most_common(labels)),
        "score": score,
        "score_histogram": histogram,
        "run_ids": sorted(v for v in run_ids if v is not None),
        "model_ids": sorted(v for v in model_ids if v is not None),
    }


def _most_common(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))


def format_summary(s: dict[str, Any]) -> list[str]:
    """The lines `jobs/query.py summary` prints for a `summary()` dict."""
    out = [f"results: {s['url']}" + ("" if s["complete"] else "   (incomplete: no _SUCCESS.json yet)")]
    out.append(f"images: {s['images']} ({s['ok']} ok, {s['errors']} error)   detections: {s['detections']}")
    if s["error_reasons"]:
        out.append("top error reasons: " + ", ".join(f"{k}={v}" for k, v in s["error_reasons"].items()))
    if s["labels"]:
        out.append("detections per label:")
        width = max(len(str(k)) for k in s["labels"])
        out += [f"  {str(k):<{width}}  {v}" for k, v in s["labels"].items()]
    if s["score"]:
        q = s["score"]
        out.append(
            f"score: min {q['min']:.3f}  q1 {q['q1']:.3f}  median {q['median']:.3f}  q3 {q['q3']:.3f}  "
            f"max {q['max']:.3f}"
        )
        peak = max(s["score_histogram"]) or 1
        for i, n in enumerate(s["score_histogram"]):
            close = "]" if i == SCORE_BINS - 1 else ")"  # the last bin holds 1.0 itself
            bin_name = f"[{i / SCORE_BINS:.1f}, {(i + 1) / SCORE_BINS:.1f}{close}"
            out.append(f"  {bin_name} {n:>8}  {'#' * round(40 * n / peak)}")
    out.append(f"run: {', '.join(s['run_ids']) or '-'}   model: {', '.join(s['model_ids']) or '-'}")
    return out
