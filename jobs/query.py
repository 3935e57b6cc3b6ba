"""Query a segment job's results (local folder or s3:// prefix): summary, SQL, overlays.

    python jobs/query.py RESULTS_URL summary [--json]
    python jobs/query.py RESULTS_URL sql "SELECT label_name, count(*) FROM detections GROUP BY 1"
                                         [--format table|csv|parquet] [--output URL] [--limit N]
    python jobs/query.py RESULTS_URL render IMAGE_URI --output FILE.png [--min-score S]
    python jobs/query.py RESULTS_URL render --sample N --output DIR [--min-score S]
    python jobs/query.py RESULTS_URL report --output DIR [--sample N] [--min-score S]
    python jobs/query.py RESULTS_URL export --format coco --output FILE.json [--where SQL] [--min-score S]
                                            [--images-root PREFIX]

SQL is DuckDB's, over the tables `images` and `detections` (columns in the README, "Output"). S3: the endpoint comes
from --endpoint-url or AWS_ENDPOINT_URL, credentials from the standard AWS sources. Exit status: 0 on success,
1 with one `error: ...` line when the query cannot be answered (no results at the URL, bad SQL, unknown image),
2 for bad arguments. `report` writes a static HTML page (DIR/index.html, pictures under DIR/images/; opens from
disk, nothing loaded from the network) to a local DIR, and prints its path last. `export` writes the ok images and
their detections as a COCO instances file for labelling tools (local or s3://), streamed, never all in memory.
"""

from __future__ import annotations

import argparse
import json
import sys

import _cli  # noqa: F401  (puts the repo root on sys.path)
from _cli import EXIT_OK, run_main

from pipeline.config import StorageConfig
from pipeline.results.export import FORMATS as EXPORT_FORMATS
from pipeline.results.export import export_coco
from pipeline.results.open import Results, open_results
from pipeline.results.render import render, render_sample
from pipeline.results.report import write_report
from pipeline.results.sql import FORMATS, sql, write_csv, write_table
from pipeline.results.summary import format_summary, summary

TABLE_ROWS = 100  # rows printed by `sql --format table` unless --limit says otherwise


def get_args_parser() -> argparse.ArgumentParser:
    # --endpoint-url is accepted before or after the command; SUPPRESS keeps a subparser's default from
    # overwriting a value given before the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--endpoint-url", default=argparse.SUPPRESS, help="S3 endpoint (default: $AWS_ENDPOINT_URL)"
    )
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common]
    )
    p.add_argument(
        "results", metavar="RESULTS_URL", help="the segment job's --output (folder or s3:// prefix)"
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "summary", parents=[common], help="counts, error reasons, labels, scores, run/model ids"
    )
    s.add_argument("--json", action="store_true", help="print the summary as JSON")

    q = sub.add_parser("sql", parents=[common], help="DuckDB SQL over the tables images and detections")
    q.add_argument("query", help='e.g. "SELECT label_name, count(*) FROM detections GROUP BY 1"')
    q.add_argument(
        "--format", choices=("table", *FORMATS), help="table (default without --output), csv, parquet"
    )
    q.add_argument(
        "--output", help="write the result to this path or URL (format from --format or its extension)"
    )
    q.add_argument(
        "--limit", type=int, help=f"at most N rows; 0 = all (--format table shows {TABLE_ROWS} by default)"
    )

    r = sub.add_parser("render", parents=[common], help="draw masks, boxes and labels on images, as PNG")
    r.add_argument("image_uri", nargs="?", metavar="IMAGE_URI", help="an image_uri as stored in the results")
    r.add_argument("--sample", type=int, metavar="N", help="render the N ok images with the most detections")
    r.add_argument("--output", required=True, help="FILE.png for one image, a folder for --sample")
    r.add_argument("--min-score", type=float, default=0.5, help="draw detections with score >= S (0.5)")

    h = sub.add_parser(
        "report", parents=[common], help="a static HTML report: summary, charts, sample, errors"
    )
    h.add_argument(
        "--output", required=True, metavar="DIR", help="local folder for index.html and its pictures"
    )
    h.add_argument(
        "--sample",
        type=int,
        default=12,
        metavar="N",
        help="overlays of the N images whose best detection scores highest (12; 0 = none)",
    )
    h.add_argument("--min-score", type=float, default=0.5, help="draw detections with score >= S (0.5)")

    e = sub.add_parser(
        "export",
        parents=[common],
        help="the ok images and their detections as a COCO file for labelling tools",
    )
    e.add_argument(
        "--format", choices=EXPORT_FORMATS, default="coco", help="coco: COCO instances JSON (default)"
    )
    e.add_argument(
        "--output", required=True, metavar="FILE.json", help="where to write it: a path or s3:// URL"
    )
    e.add_argument(
        "--where",
        metavar="SQL",
        help="DuckDB condition on the table images choosing the images, e.g. \"image_uri LIKE '%%/val/%%'\"",
    )
    e.add_argument("--min-score", type=float, default=0.0, help="only detections with score >= S (0: all)")
    e.add_argument(
        "--images-root",
        metavar="PREFIX",
        help="file_name is image_uri less this folder (default: the whole image_uri; tar members: member path)",
    )
    return p


def main() -> int:
    parser = get_args_parser()
    args = parser.parse_args()
    # The segment job's own rules: endpoint from the flag or AWS_ENDPOINT_URL, credentials from the AWS chain.
    storage = StorageConfig(endpoint_url=getattr(args, "endpoint_url", None)).options_for("s3://")
    _check_args(parser, args)  # before any storage access: a usage mistake is exit 2, whatever the URL
    results = open_results(args.results, storage_options=storage)  # one line, exit 1, if nothing is there

    if args.command == "summary":
        s = summary(results)
        print(json.dumps(s, indent=2) if args.json else "\n".join(format_summary(s)))
    elif args.command == "sql":
        _sql(args, results, storage)
    elif args.command == "report":
        print(write_report(results, args.output, sample=args.sample, min_score=args.min_score))
    elif args.command == "export":
        _export(args, results, storage)
    else:
        if args.sample is not None:
            done = render_sample(results, args.sample, args.output, min_score=args.min_score)
        else:
            done = [render(results, args.image_uri, args.output, min_score=args.min_score)]
        for d in done:
            print(
                f"{d['output']}  {d['width']}x{d['height']}  {d['instances']} instance(s)  {d['image_uri']}"
            )
    return EXIT_OK


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.command == "render":
        if (args.image_uri is None) == (args.sample is None):
            parser.error("render: give either IMAGE_URI or --sample N")
        if args.sample is not None and args.sample < 1:
            parser.error("render: --sample N needs N >= 1")
    elif args.command == "report":
        if args.sample < 0:
            parser.error("report: --sample N needs N >= 0")
        if not 0 <= args.min_score <= 1:  # also refuses nan, which no SQL comparison could use
            parser.error("report: --min-score S needs 0 <= S <= 1")
        if "://" in args.output and not args.output.startswith("file://"):
            parser.error(f"report: --output is a local folder, not {args.output}")
    elif args.command == "export":
        if not 0 <= args.min_score <= 1:
            parser.error("export: --min-score S needs 0 <= S <= 1")
    elif args.command == "sql":
        args.format = args.format or _format_of(args.output)
        if args.format is None:
            parser.error("sql: --output needs --format csv|parquet or a name ending in .csv or .parquet")
        if args.format == "table" and args.output is not None:
            parser.error("sql: --output writes csv or parquet, not table")
        if args.format == "parquet" and args.output is None:
            parser.error("sql: --format parquet needs --output")


def _sql(args: argparse.Namespace, results: Results, storage: dict) -> None:
    fmt = args.format
    limit = None if args.limit is not None and args.limit <= 0 else args.limit
    if fmt != "table":
        table = sql(results, args.query, limit=limit)
        if args.output is None:
            write_csv(table, sys.stdout.buffer)
        else:
            write_table(table, args.output, fmt=fmt, storage_options=storage)
            print(f"{table.num_rows} rows written to {args.output} ({fmt})")
        return
    shown = TABLE_ROWS if args.limit is None else limit
    # One row more than is shown tells whether the view was cut.
    table = sql(results, args.query, limit=None if shown is None else shown + 1)
    cut = shown is not None and table.num_rows > shown
    if cut:
        table = table.slice(0, shown)
    if table.num_columns == 0:
        print("(no result)")
        return
    if table.num_rows == 0:
        print("  ".join(table.column_names))
    else:
        # SQL's NULL rather than pandas' NaN/None; integer columns with nulls stay integers.
        df = table.to_pandas(integer_object_nulls=True)
        df = df.astype(object).where(df.notna(), "NULL")
        # Long cells (RLE counts) are cut to keep rows on screen; --output writes them whole.
        print(df.to_string(index=False, max_colwidth=60))
    more = "; more exist: --limit N, --limit 0 for all, or --output" if cut else ""
    print(f"({table.num_rows} row{'' if table.num_rows == 1 else 's'}{more})")


def _export(args: argparse.Namespace, results: Results, storage: dict) -> None:
    done = export_coco(
        results,
        args.output,
        where=args.where,
        min_score=args.min_score,
        images_root=args.images_root,
        storage_options=storage,
    )
    if done.error_images:
        print(f"{done.error_images} image(s) in error left out (only status = 'ok' images are exported)")
    if done.below_min_score:
        print(f"{done.below_min_score} detection(s) below --min-score {args.min_score:g} left out")
    print(
        f"{done.images} images, {done.annotations} annotations, {done.categories} categories "
        f"(ids: {done.category_ids}) written to {done.url} ({args.format})"
    )


def _format_of(output: str | None) -> str | None:
    if output is None:
        return "table"
    for fmt in FORMATS:
        if output.lower().endswith(f".{fmt}"):
            return fmt
    return None


if __name__ == "__main__":
    run_main(main)
