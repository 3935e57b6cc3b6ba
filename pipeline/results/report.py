"""A static HTML report of a results folder: one `index.html` plus its pictures, opened from disk without a server.

    write_report(results, "report/", sample=12, min_score=0.5) -> "report/index.html"

The page shows the run's summary (images ok / in error, detections per label, the score histogram, throughput when
the results record it, run and model ids and the architecture they name), a grid of overlays of the `sample` images whose best detection scores
highest (drawn by `render.draw_detections` with detections of `score >= min_score`), and a few example inputs for
every error reason. Charts are inline SVG drawn by the template from bar geometry computed here; pictures are JPEG
files under `images/`. Nothing is loaded from the network.

Everything a results folder holds is untrusted text (an `image_uri` or error message can contain `<script>`): the
template is rendered by Jinja2 with autoescaping on, and file names of the pictures are their rank, never the URI.
The results may be on S3 (read with the `Results`' storage options); the report is written to a local folder.
"""

from __future__ import annotations

import datetime
import importlib.resources
import os
import re
from collections.abc import Callable
from typing import Any

import jinja2

from model.architectures import architecture_of_model_id
from pipeline.results.common import QueryError
from pipeline.results.open import Results, open_results
from pipeline.results.render import draw_detections
from pipeline.results.sql import sql
from pipeline.results.summary import summary
from pipeline.segment.schema import STATUS_OK

TEMPLATE = "report.html.j2"
IMAGES_SUBDIR = "images"
THUMB_PX = 480  # longest side of a sample picture: sharp in a ~300 px grid cell on a 1.5x screen
JPEG_QUALITY = 88
ERROR_EXAMPLES = 3  # example inputs shown per error reason
MAX_REASONS = 20  # error reasons shown (by count); the rest are counted in one line
MAX_LABELS = 25  # bars in the per-label chart; the rest are counted in one line
CHART_W = 560


def write_report(
    results: Results | str,
    out_dir: str,
    *,
    sample: int = 12,
    min_score: float = 0.5,
    log: Callable[[str], None] = print,
    storage_options: dict | None = None,
) -> str:
    """Write `out_dir/index.html` and `out_dir/images/*.jpg`; return the path of `index.html`.

    `out_dir` is a local folder (created if needed; an earlier report there is overwritten). `sample` pictures at
    most (0: none); an image whose picture cannot be drawn now (moved, unreadable) gets a card with the reason
    instead, so the report is still written. `QueryError` for a remote `out_dir` or one that cannot be written.
    """
    if "://" in out_dir and not out_dir.startswith("file://"):
        raise QueryError(f"report: the output is a local folder, not {out_dir}")
    out_dir = out_dir.removeprefix("file://")
    if not isinstance(results, Results):
        results = open_results(results, storage_options=storage_options)
    s = summary(results)
    picks, eligible = top_images(results, sample, min_score=min_score)
    log(f"report: drawing {len(picks)} of {eligible} images with a detection >= {min_score:g}")
    try:
        _clear_pictures(os.path.join(out_dir, IMAGES_SUBDIR))
        cards = [_card(results, rank, pick, out_dir, min_score, log) for rank, pick in enumerate(picks)]
        html = render_html(
            run_summary=s,
            speed=timing(results),
            errors=error_examples(results),
            cards=cards,
            eligible=eligible,
            sample=sample,
            min_score=min_score,
            config=(results.config or {}).get("config") or {},
        )
        path = os.path.join(out_dir, "index.html")
        tmp = os.path.join(out_dir, ".index.html.tmp")  # a reader never sees half a page
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(html)
        os.replace(tmp, path)
    except OSError as e:
        raise QueryError(f"report: cannot write to {out_dir}: {e.strerror or e}") from None
    return path


# --- what the page shows --------------------------------------------------------------------------------------------


def top_images(results: Results, n: int, *, min_score: float) -> tuple[list[dict], int]:
    """The `n` ok images whose best detection scores highest (ties: more detections, then `image_uri`), each as
    `{"image_uri", "best", "count"}` (count of detections >= min_score), and how many images qualify at all."""
    if n <= 0:
        return [], 0
    table = sql(
        results,
        "SELECT d.image_uri, max(d.score) AS best, count(*) AS count, count(*) OVER () AS eligible "
        "FROM detections d JOIN images i USING (image_uri) "
        f"WHERE i.status = '{STATUS_OK}' AND d.score >= {float(min_score)!r} "
        "GROUP BY d.image_uri ORDER BY best DESC, count DESC, d.image_uri",
        limit=n,
    )
    rows = table.to_pylist()
    return [{k: r[k] for k in ("image_uri", "best", "count")} for r in rows], (
        rows[0]["eligible"] if rows else 0
    )


def error_examples(results: Results, per_reason: int = ERROR_EXAMPLES) -> list[dict]:
    """Every error reason (text before the first `:`, as in `summary`) by count: `{"reason", "count",
    "examples": [{"image_uri", "error"}, ...]}` with up to `per_reason` inputs each (first by `image_uri`)."""
    table = sql(
        results,
        "SELECT reason, n, image_uri, error FROM ("
        "  SELECT reason, image_uri, error, count(*) OVER (PARTITION BY reason) AS n,"
        "         row_number() OVER (PARTITION BY reason ORDER BY image_uri) AS k"
        f"  FROM (SELECT coalesce(split_part(error, ':', 1), 'unknown') AS reason, image_uri, error"
        f"        FROM images WHERE status <> '{STATUS_OK}'))"
        f" WHERE k <= {int(per_reason)} ORDER BY n DESC, reason, k",
    )
    out: list[dict] = []
    for row in table.to_pylist():
        if not out or out[-1]["reason"] != row["reason"]:
            out.append({"reason": row["reason"], "count": row["n"], "examples": []})
        out[-1]["examples"].append({"image_uri": row["image_uri"], "error": row["error"]})
    return out


def timing(results: Results) -> dict[str, Any]:
    """What the results record about speed: the last run's throughput from `_SUCCESS.json` (absent while a run is
    incomplete) and per-image means of the optional `decode_ms` / `infer_ms` columns (None where absent)."""
    row = sql(
        results,
        "SELECT avg(decode_ms) AS decode_ms, avg(infer_ms) AS infer_ms, sum(bytes)::BIGINT AS bytes "
        f"FROM images WHERE status = '{STATUS_OK}'",
    ).to_pylist()[0]
    done = results.success or {}
    run = None
    if done.get("seconds"):
        run = {
            "images": done.get("images_this_run"),
            "seconds": done["seconds"],
            "images_per_s": done.get("images_per_s"),
            "device": (done.get("resources") or {}).get("device"),
            "random_weights": bool(done.get("random_weights")),
        }
    return {"run": run, **row}


def _clear_pictures(folder: str) -> None:
    """Create `folder`, or empty it of an earlier report's pictures (only names this module writes), so a smaller
    sample leaves no stale picture behind."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if re.fullmatch(r"\d{3,}\.jpg", name):
            os.remove(os.path.join(folder, name))


def _card(
    results: Results, rank: int, pick: dict, out_dir: str, min_score: float, log: Callable[[str], None]
) -> dict:
    """Draw one sampled image into `images/<rank>.jpg`; a picture that cannot be drawn now is a card with the
    reason (the report is about the run, and one moved file must not cost the whole page)."""
    card = dict(pick, src=None, width=None, height=None, problem=None)
    try:
        picture, _ = draw_detections(results, pick["image_uri"], min_score=min_score)
    except QueryError as e:
        log(f"report: no picture of {pick['image_uri']}: {e}")
        card["problem"] = str(e)
        return card
    picture.thumbnail((THUMB_PX, THUMB_PX))
    name = f"{rank:03d}.jpg"
    picture.convert("RGB").save(
        os.path.join(out_dir, IMAGES_SUBDIR, name), format="JPEG", quality=JPEG_QUALITY
    )
    card.update(src=f"{IMAGES_SUBDIR}/{name}", width=picture.width, height=picture.height)
    return card


# --- charts: bar geometry for the template's inline SVG ------------------------------------------------------------


def hbar_chart(items: list[tuple[str, int]], *, label_w: int = 170, bar_h: int = 18, gap: int = 5) -> dict:
    """Horizontal bars, one per `(name, count)`, longest = the plot's width. Names stay text: the template escapes
    them (label names and error reasons come from the results)."""
    plot_w = CHART_W - label_w - 70  # room on the right for the count
    peak = max((v for _, v in items), default=0) or 1
    bars = [
        {
            "name": name,
            "short": name if len(name) <= 24 else name[:23] + "…",
            "value": value,
            "y": i * (bar_h + gap),
            "w": round(plot_w * value / peak, 1),
        }
        for i, (name, value) in enumerate(items)
    ]
    height = max(1, len(items)) * (bar_h + gap)
    return {"width": CHART_W, "height": height, "label_w": label_w, "bar_h": bar_h, "bars": bars}


def histogram_chart(counts: list[int], *, min_score: float, height: int = 170) -> dict:
    """Vertical bars over [0, 1] in `len(counts)` equal bins; bins at or above `min_score` (what the sample
    pictures draw) are marked, and a line shows the threshold itself."""
    left, bottom, top = 50, 22, 8
    plot_w, plot_h = CHART_W - left - 10, height - bottom - top
    step = plot_w / len(counts)
    peak = max(counts, default=0) or 1
    bars = []
    for i, n in enumerate(counts):
        h = round(plot_h * n / peak, 1)
        bars.append(
            {
                "x": round(left + i * step + 1, 1),
                "y": round(top + plot_h - h, 1),
                "w": round(step - 2, 1),
                "h": h,
                "value": n,
                "name": f"[{i / len(counts):.1f}, {(i + 1) / len(counts):.1f}{']' if i == len(counts) - 1 else ')'}",
                "drawn": (i + 1) / len(counts) > min_score,
            }
        )
    threshold_x = round(left + plot_w * min(max(min_score, 0.0), 1.0), 1)
    return {
        "width": CHART_W,
        "height": height,
        "left": left,
        "base": top + plot_h,
        "top": top,
        "peak": peak,
        "bars": bars,
        "threshold_x": threshold_x,
        # Bin edges, labelled under the axis (0.0 ... 1.0), so the threshold line meets its own value.
        "ticks": [(round(left + i * step, 1), f"{i / len(counts):.1f}") for i in range(len(counts) + 1)],
    }


def _capped(items: list[tuple[str, int]], cap: int) -> tuple[list[tuple[str, int]], int, int]:
    """The first `cap` items, and how many items and counts are left out."""
    rest = items[cap:]
    return items[:cap], len(rest), sum(v for _, v in rest)


# --- the page -------------------------------------------------------------------------------------------------------


def render_html(
    *,
    run_summary: dict,
    speed: dict,
    errors: list[dict],
    cards: list[dict],
    eligible: int,
    sample: int,
    min_score: float,
    config: dict,
) -> str:
    """The page from `summary()`, `timing()`, `error_examples()` and the picture cards."""
    labels, more_labels, more_label_count = _capped(list(run_summary["labels"].items()), MAX_LABELS)
    shown_errors = errors[:MAX_REASONS]
    env = jinja2.Environment(
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True
    )
    env.filters["num"] = lambda v: "-" if v is None else f"{v:,}"
    source = importlib.resources.files("pipeline.results").joinpath(TEMPLATE).read_text(encoding="utf-8")
    named = [architecture_of_model_id(m) for m in run_summary["model_ids"]]
    return env.from_string(source).render(
        s=run_summary,
        # Which architecture made the run, from the model ids; a checkpoint written before ids named it says None.
        architectures=sorted({a for a in named if a}),
        unnamed_architecture=None in named,
        timing=speed,
        errors=shown_errors,
        more_reasons=len(errors) - len(shown_errors),
        error_chart=hbar_chart([(e["reason"], e["count"]) for e in shown_errors]),
        label_chart=hbar_chart(labels),
        more_labels=more_labels,
        more_label_count=more_label_count,
        histogram=histogram_chart(run_summary["score_histogram"], min_score=min_score),
        # `random-init:...` is how the segment job names a model without weights (model.weights: none).
        random_weights=bool((speed["run"] or {}).get("random_weights"))
        or any(m.startswith("random-init") for m in run_summary["model_ids"]),
        cards=cards,
        eligible=eligible,
        sample=sample,
        min_score=min_score,
        score_threshold=(config.get("model") or {}).get("score_threshold"),
        input_url=(config.get("input") or {}).get("url"),
        generated=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
