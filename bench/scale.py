"""The data plane at scale, measured where it shows on a CPU machine: every figure of the scale-out issue in one run.

    python bench/scale.py [--quick] [--images 1000] [--inputs 100000] [--query-rows 10000000] [--append-inputs 100000]
                          [--only NAMES]

A 2-second CPU forward pass hides every cost around the model, so each part measures the data plane on its own or
with the real model at a tiny size (`model.min_size` 64), where the pipeline's own costs show:

- pipeline: `--images` JPEGs of 96–144 px; the segment job end to end on a fresh embedded Ray (Ray start, planning,
  actor start and model load included) against a plain loop in this process (PIL decode → `model([image])` →
  pycocotools RLE of every kept mask; model built before the clock starts), same 2 torch threads, same weights and
  sizes. An audit hook in this process (the job's driver) counts the Parquet data files the driver itself opens for
  writing; the actors are other processes. A profile from the results says where the rest goes.
- write: the stages after the model alone — `UnitWriter` (Arrow columns → Parquet → upload → completion record) fed
  with realistic rows (12 detections per 640×480 image, RLE of ellipses), committing to moto's S3 server behind a
  proxy that adds 50 ms to every request (a regular S3 round trip): images/s committed with one writer (one actor)
  and with 4, beside the layout before this design (64-image units committed one after another by one writer).
- scale: `--inputs` objects on moto S3 under 100 prefixes (non-image bytes named .jpg, so every input is a real read,
  decode attempt and error row while the model never runs: the data plane without the forward pass):
  prefix listing keys/s (the planner's own code), S3 Inventory keys/s (gzipped CSV parts read by Ray tasks), then
  the job as a user runs it (`jobs/segment_archive.py`, a subprocess: the driver) on 1/10 of the inputs and on all
  of them — the driver's peak RSS for both, the objects the run leaves, per 10^6 inputs — and last the same command
  again on the finished output through a request-counting proxy: requests and seconds until it reports nothing
  left to do.
- query: `--query-rows` detection rows written in the layout the job leaves at its defaults (2,048 images per file,
  ~12 detections per image; `bench/query.py`'s generator), per-label counts through `pipeline.results.sql.sql`
  (what `jobs/query.py ... sql` runs; median of 3 after one untimed run) and `jobs/query.py` itself, wall time.

- append: a second day's S3 Inventory report (`--append-inputs` old keys + a tenth as many new ones) appended to a
  finished output of the old keys (made directly: plan, completion records, roll-up, config), beside planning the
  same report into an empty output, each in a driver process of its own stopped at the line that ends planning
  (Ray start included): the ratio of the two times; the storage requests of the append beyond reading the report
  (a counting proxy); the same with the first day's report (0 new keys: "nothing new"); the driver's peak RSS
  appending to an output of `--append-inputs` and of ten times as many inputs.

moto's server runs in a process of its own, so its CPU is not this process's. `--quick` runs each part smaller (in
under 10 minutes). The last line holds every figure as `name=value`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._common import local_ray, mask_rles, per_image_loop, photo_like, random_model, save_jpegs  # noqa: E402
from tests.support.s3 import moto_in_process, s3_filesystem  # noqa: E402

THREADS = 2
MIN_SIZE, MAX_SIZE = 64, 128
SCORE = 0.5  # the job's default threshold
PREFIXES = 100
os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


# --- storage helpers -------------------------------------------------------------------------------------------------


def s3(endpoint: str):
    """A fresh s3fs filesystem on `endpoint` (no instance cache, no listings cache: every call asks the server)."""
    return s3_filesystem(endpoint, skip_instance_cache=True, use_listings_cache=False)


# --- 1. pipeline vs bare loop ------------------------------------------------------------------------------------------


def make_jpegs(folder: str, n: int, seed: int = 0) -> list[str]:
    """`n` JPEGs of 96–144 px a side: a few shapes on a noisy flat colour, as photos hold objects."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def images():
        for _ in range(n):
            h, w = (int(v) for v in rng.integers(96, 145, 2))
            yield photo_like(rng, h, w)

    return save_jpegs(folder, images())


def bare_loop(files: list[str]) -> tuple[float, int]:
    """images/s and detections of the plain loop a user would write (model built before the clock starts)."""
    model = random_model(min_size=MIN_SIZE, max_size=MAX_SIZE, score=SCORE, threads=THREADS)
    detections = 0

    def count(_, output: dict) -> None:
        nonlocal detections
        detections += len(mask_rles(output))

    return per_image_loop(model, files, finish=count), detections


class DriverWrites:
    """Counts the Parquet data files this process (the driver) opens for writing under `root`."""

    def __init__(self, root: str):
        self.root, self.paths = os.path.realpath(root), set()

        def hook(event: str, args: tuple) -> None:
            if event == "open" and isinstance(args[0], str) and ".parquet" in args[0]:
                mode = args[1] if isinstance(args[1], str) else ""
                if ("w" in mode or "a" in mode) and os.path.realpath(args[0]).startswith(self.root):
                    if any(f"/{d}/" in args[0] for d in ("images", "detections")):
                        self.paths.add(args[0])

        sys.addaudithook(hook)


def pipeline_run(folder: str, out: str, writes: DriverWrites) -> dict:
    import pyarrow.parquet as pq

    from pipeline.segment.config import segment_config
    from pipeline.segment.run import segment

    stamps: list[tuple[float, str]] = []
    cfg = segment_config(
        {
            "input": {"url": folder},
            "output": {"url": out, "mode": "overwrite"},
            "model": {
                "weights": "none",
                "min_size": MIN_SIZE,
                "max_size": MAX_SIZE,
                "score_threshold": SCORE,
            },
            "compute": {"threads_per_actor": THREADS},
            "progress_interval_s": 3600,
        }
    )
    start = time.perf_counter()
    with local_ray(THREADS):
        ray_s = time.perf_counter() - start
        summary = segment(cfg, log=lambda line: stamps.append((time.perf_counter() - start, line)))
        wall = time.perf_counter() - start
    images = pq.read_table(os.path.join(out, "images"))
    infer_s = sum(v or 0 for v in images.column("infer_ms").to_pylist()) / 1e3
    decode_s = sum(v or 0 for v in images.column("decode_ms").to_pylist()) / 1e3
    data_files = sum(len(os.listdir(os.path.join(out, d))) for d in ("images", "detections"))
    processing = next((t for t, line in stamps if line.startswith("processing")), 0.0)
    return {
        "images_s": summary.images / wall,
        "wall": wall,
        "ray_s": ray_s,
        "plan_s": processing - ray_s,
        "infer_s": infer_s,
        "decode_s": decode_s,
        "detections": summary.detections,
        "images": summary.images,
        "errors": summary.errors,
        "data_files": data_files,
        "driver_files": len(writes.paths),
    }


def part_pipeline(args, work: str) -> dict:
    folder = os.path.join(work, "jpegs")
    files = make_jpegs(folder, args.images)
    writes = DriverWrites(work)
    print(f"\n== pipeline vs bare: {len(files)} JPEGs of 96-144 px, min_size {MIN_SIZE}, {THREADS} threads")
    bare_s, bare_dets = bare_loop(files)
    print(f"bare loop: {bare_s:.2f} images/s, {bare_dets / len(files):.1f} detections per image")
    p = pipeline_run(folder, os.path.join(work, "out-pipeline"), writes)
    ratio = p["images_s"] / bare_s
    rest = p["wall"] - p["infer_s"]
    print(
        f"pipeline: {p['images_s']:.2f} images/s end to end ({p['images']} images, {p['errors']} errors, "
        f"{p['detections'] / max(p['images'], 1):.1f} detections per image) in {p['wall']:.1f} s"
    )
    print(
        f"  profile: Ray start {p['ray_s']:.1f} s, planning {p['plan_s']:.1f} s, model + masks on the actor's main "
        f"thread {p['infer_s']:.1f} s (sum of infer_ms), decode on read threads {p['decode_s']:.1f} s (overlapped); "
        f"the rest — actor start and model load, reads, Parquet, waits — {rest - p['ray_s'] - p['plan_s']:.1f} s"
    )
    print(
        f"  bare loop at the same rate would take {p['images'] / bare_s:.1f} s; the actor's model time "
        f"{p['infer_s']:.1f} s is {p['infer_s'] / (p['images'] / bare_s):.2f}x of it"
    )
    print(f"driver-created Parquet data files: {p['driver_files']} of {p['data_files']}")
    return {"pipeline_vs_bare": round(ratio, 3), "driver_parquet_files": p["driver_files"]}


# --- 2. the write path alone ----------------------------------------------------------------------------------------


def detections_pool(n: int = 256, per_image: int = 12, seed: int = 0):
    """Realistic detections of 640×480 images: boxes, labels, scores, RLE of ellipses (what masks look like)."""
    import numpy as np

    from model.postprocess import Detections, encode_binary_masks

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:480, :640]
    pool = []
    for _ in range(n):
        masks, boxes = [], []
        for _ in range(per_image):
            cy, cx = rng.uniform(20, 460), rng.uniform(20, 620)
            ry, rx = rng.uniform(4, 80), rng.uniform(4, 80)
            masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
            boxes.append([cx - rx, cy - ry, 2 * rx, 2 * ry])
        masks = np.stack(masks)
        pool.append(
            Detections(
                boxes_xywh=np.array(boxes, np.float32),
                labels=rng.integers(1, 91, per_image),
                scores=np.sort(rng.uniform(0.5, 1, per_image).astype(np.float32))[::-1].copy(),
                rles=encode_binary_masks(masks),
                areas=masks.sum(axis=(1, 2)),
            )
        )
    return pool


def write_units(endpoint: str, prefix: str, *, units: int, unit_size: int, writers: int, pool) -> float:
    """images/s committed by `writers` writers (threads), each committing whole units one after another."""
    from concurrent.futures import ThreadPoolExecutor

    from model.labels import COCO_CATEGORIES
    from pipeline.segment.storage import Output
    from pipeline.segment.writer import UnitWriter

    out = Output(f"s3://{prefix}", storage_options={"client_kwargs": {"endpoint_url": endpoint}})

    def one(u: int) -> None:
        w = UnitWriter(out, f"{u:08d}", model_id="m", run_id="bench", class_names=list(COCO_CATEGORIES))
        for i in range(unit_size):
            d = pool[(u * unit_size + i) % len(pool)]
            w.add(
                i,
                f"s3://archive/{u:08d}/{i:05d}.jpg",
                bytes=150_000,
                height=480,
                width=640,
                decode_ms=2.0,
                infer_ms=3.0,
                detections=d,
            )
        w.commit()

    start = time.perf_counter()
    with ThreadPoolExecutor(writers) as pool_:
        list(pool_.map(one, range(units)))
    return units * unit_size / (time.perf_counter() - start)


def part_write(args, work: str) -> dict:
    from tests.support.s3proxy import FaultyS3

    units = 3 if args.quick else 8
    pool = detections_pool()
    print(f"\n== write path: UnitWriter → moto S3 behind a proxy adding {args.latency_ms} ms per request")
    with moto_in_process() as endpoint, FaultyS3(endpoint, [], latency_s=args.latency_ms / 1e3) as proxy:
        fs = s3(endpoint)
        fs.mkdir("write")
        one = write_units(proxy.endpoint, "write/one", units=units, unit_size=2048, writers=1, pool=pool)
        four = write_units(
            proxy.endpoint, "write/four", units=2 * units, unit_size=2048, writers=4, pool=pool
        )
        old = write_units(proxy.endpoint, "write/old", units=units * 4, unit_size=64, writers=1, pool=pool)
        objects = len(fs.find("write/one"))
    print(
        f"units of 2,048 images, one writer (one actor): {one:,.0f} images/s committed ({objects} objects for {units} units)"
    )
    print(f"units of 2,048 images, four writers (four actors): {four:,.0f} images/s")
    print(f"before: units of 64 images committed one after another by one writer: {old:,.0f} images/s")
    return {"write_img_s": round(one), "write_img_s_4": round(four), "write_old_img_s": round(old)}


# --- 3. planning, the job at scale, objects, driver memory, resume ---------------------------------------------------


def run_job(job_args: list[str], env: dict, log: str) -> tuple[float, int, str, int]:
    """`jobs/segment_archive.py` as a user runs it, in a subprocess with its own embedded Ray; returns (seconds,
    exit status, output, the driver's peak RSS in KiB (its VmHWM at exit))."""
    wrapper = (
        # VmHWM, not getrusage's ru_maxrss: a child's ru_maxrss starts from its parent's RSS at fork on Linux.
        "import atexit, re, runpy, sys\n"
        "hwm = lambda: re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]\n"
        "atexit.register(lambda: print('DRIVER_MAXRSS_KIB', hwm(), file=sys.stderr, flush=True))\n"
        f"sys.argv = {[os.path.join(ROOT, 'jobs', 'segment_archive.py'), *job_args]!r}\n"
        f"sys.path.insert(0, {os.path.join(ROOT, 'jobs')!r})\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    with tempfile.TemporaryDirectory(prefix="bs-") as ray_tmp:
        env = {**env, "RAY_TMPDIR": ray_tmp}
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, env=env, cwd=ROOT)
        seconds = time.perf_counter() - start
    with open(log, "w") as f:
        f.write(r.stdout + "\n--- stderr\n" + r.stderr)
    rss = re.search(r"DRIVER_MAXRSS_KIB (\d+)", r.stderr)
    return seconds, r.returncode, r.stdout + r.stderr, int(rss[1]) if rss else -1


def part_scale(args, work: str) -> dict:
    from pipeline.segment import plan as plan_mod
    from pipeline.segment import sources
    from pipeline.segment.sources._listing import LIST_THREADS
    from tests.support.s3inventory import write_inventory
    from tests.support.s3proxy import FaultyS3

    n = args.inputs
    per = n // PREFIXES
    keys = [f"photos/p{k:03d}/img-{i:07d}.jpg" for k in range(PREFIXES) for i in range(per)]
    figures: dict = {}
    print(f"\n== scale: {len(keys):,} objects on moto S3 under {PREFIXES} prefixes")
    with moto_in_process({"archive": keys}) as endpoint:
        fs = s3(endpoint)
        for b in ("plans", "out-small", "out-all"):
            fs.mkdir(b)
        opts = {"client_kwargs": {"endpoint_url": endpoint}}

        # Planning: the driver's concurrent prefix listing, then an S3 Inventory report read by Ray tasks.
        start = time.perf_counter()
        listed = sum(1 for _ in sources.iter_inputs("s3://archive/photos/", storage_options=opts))
        list_s = time.perf_counter() - start
        assert listed == len(keys), listed
        figures["plan_keys_per_s"] = round(listed / list_s)
        print(
            f"prefix listing: {listed:,} keys in {list_s:.1f} s = {listed / list_s:,.0f} keys/s ({LIST_THREADS} listings in flight)"
        )
        manifest = write_inventory(fs, "archive", [["archive", k, "11", "false"] for k in keys], parts=10)
        with local_ray(THREADS):
            found = sources.find_source(manifest, storage_options=opts)
            inventory_parts = found.source.parts(found.target)
            start = time.perf_counter()
            parts, _ = plan_mod.plan_parts_in_tasks(
                inventory_parts,
                plan_url="s3://plans/inventory",
                unit_size=2048,
                input_options=opts,
                plan_options=opts,
                read_cpus=0.25,
            )
            inv_s = time.perf_counter() - start
        planned = sum(p.inputs for p in parts)
        assert planned == len(keys), planned
        figures["inventory_keys_per_s"] = round(planned / inv_s)
        print(
            f"S3 Inventory ({len(inventory_parts)} gzipped CSV parts, Ray tasks): {planned:,} keys in {inv_s:.1f} s = {planned / inv_s:,.0f} keys/s"
        )

        # The job as a user runs it, on a tenth of the inputs and on all of them.
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        common = [
            "--set",
            "model.weights=none",
            "--set",
            f"model.min_size={MIN_SIZE}",
            "--set",
            f"model.max_size={MAX_SIZE}",
            # The layout these figures have always measured (the GPU size); `auto` would pick 64 on this CPU machine.
            "--set",
            "input.unit_size=2048",
        ]
        rss = {}
        for name, url, count in (
            ("small", "s3://archive/photos/p00?/", len(keys) // 10),  # p000-p009: a tenth of the 100 prefixes
            ("all", "s3://archive/photos/", len(keys)),
        ):
            sets = [
                *common,
                "--set",
                f"input.storage.endpoint_url={endpoint}",
                "--set",
                f"output.storage.endpoint_url={endpoint}",
            ]
            seconds, code, output, kib = run_job(
                ["--input", url, "--output", f"s3://out-{name}/run", *sets],
                env,
                os.path.join(work, f"job-{name}.log"),
            )
            if code != 0:
                raise SystemExit(f"the job on {url} failed ({code}):\n{output[-3000:]}")
            images = re.search(r"images: (\d+)", output)
            assert images and int(images[1]) == count, (images and images[1], count)
            rss[name] = kib / 1024
            print(
                f"job on {count:,} inputs: {seconds:.0f} s ({count / seconds:,.0f} inputs/s), driver peak RSS {kib / 1024:.0f} MiB"
            )
        figures["driver_rss_small_mib"] = round(rss["small"])
        figures["driver_rss_all_mib"] = round(rss["all"])
        figures["driver_rss_growth"] = round(rss["all"] / rss["small"] - 1, 3)

        objects = [p for p in fs.find("out-all/run") if not p.endswith("/")]
        kinds: dict[str, int] = {}
        for p in objects:
            rel = p[len("out-all/run/") :]
            kind = rel.split("/")[0] if "/" in rel else rel
            kinds[kind] = kinds.get(kind, 0) + 1
        figures["objects_per_million"] = round(len(objects) * 1_000_000 / len(keys))
        print(
            f"objects left by the run on {len(keys):,} inputs: {len(objects)} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}) = {figures['objects_per_million']:,} per 10^6 inputs"
        )

        # Resume of the finished run: the same command again, every request counted.
        with FaultyS3(endpoint, []) as proxy:
            sets = [
                *common,
                "--set",
                f"input.storage.endpoint_url={proxy.endpoint}",
                "--set",
                f"output.storage.endpoint_url={proxy.endpoint}",
            ]
            seconds, code, output, _ = run_job(
                ["--input", "s3://archive/photos/", "--output", "s3://out-all/run", *sets],
                env,
                os.path.join(work, "job-resume.log"),
            )
            assert code == 0 and "0 committed now" in output, output[-3000:]
            figures["resume_requests"] = proxy.requests
            figures["resume_s"] = round(seconds, 1)
            print(
                f"resume of the finished run: {proxy.requests} requests ({dict(proxy.by_method)}), {seconds:.1f} s (process start to exit)"
            )
    return figures


# --- 4. query ---------------------------------------------------------------------------------------------------------


def part_query(args, work: str) -> dict:
    from bench.query import QUERIES, write_results
    from pipeline.results.open import open_results
    from pipeline.results.sql import sql

    root = os.path.join(work, "query-results")
    start = time.perf_counter()
    rows, _ = write_results(root, rows=args.query_rows, per_image=12.0, unit_size=2048, seed=0)
    files = len(os.listdir(os.path.join(root, "detections")))
    print(
        f"\n== query: {rows:,} detection rows in {files} files per table (2,048 images per file), written in {time.perf_counter() - start:.0f} s"
    )
    results = open_results(root)
    query = QUERIES["per_label_counts"]
    sql(results, query)  # untimed: page cache and imports warm, as for any second query
    times = []
    for _ in range(3):
        t = time.perf_counter()
        answer = sql(open_results(root), query)
        times.append(time.perf_counter() - t)
    assert sum(answer.column("n").to_pylist()) == rows
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", "query.py"), root, "sql", query],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    cli_s = time.perf_counter() - t
    assert r.returncode == 0, r.stderr[-2000:]
    print(
        f"per-label counts: {statistics.median(times):.3f} s (median of 3; open + bind + query); jobs/query.py sql, process start to exit: {cli_s:.2f} s"
    )
    return {"query_s": round(statistics.median(times), 3), "query_cli_s": round(cli_s, 2)}


# --- 5. append: a second day's S3 Inventory added to a finished output ----------------------------------------------

# The job's driver in a process of its own, stopped at the line that ends planning: seconds from its first call into
# the job (Ray start included) to that line, and its peak RSS then. argv: the config as JSON.
_PLAN_ONLY = """
import json, re, sys, time
import ray
from pipeline.segment.config import segment_config
from pipeline.segment.run import segment

class Planned(BaseException):
    pass

def log(line):
    print(f"{time.perf_counter() - start:8.2f} {line}", flush=True)
    if line.startswith(("planned ", "nothing new")):
        raise Planned

def connect():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False

start = time.perf_counter()
try:
    segment(segment_config(json.loads(sys.argv[1])), log=log, connect=connect)
except Planned:
    pass
seconds = time.perf_counter() - start
hwm = re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read())[1]
print("PLANNED_S", seconds, "DRIVER_MAXRSS_KIB", hwm, flush=True)
ray.shutdown()
"""


def plan_only(cfg: dict, log: str) -> tuple[float, int, str]:
    """(seconds to the end of planning, the driver's peak RSS in KiB, its output) of the job on `cfg`."""
    import json

    with tempfile.TemporaryDirectory(prefix="ba-") as ray_tmp:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=ray_tmp, PYTHONPATH=ROOT)
        r = subprocess.run(
            [sys.executable, "-c", _PLAN_ONLY, json.dumps(cfg)],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
        )
    with open(log, "w") as f:
        f.write(r.stdout + "\n--- stderr\n" + r.stderr)
    found = re.search(r"PLANNED_S (\S+) DRIVER_MAXRSS_KIB (\d+)", r.stdout)
    if r.returncode != 0 or not found:
        raise SystemExit(f"planning failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return float(found[1]), int(found[2]), r.stdout


def finished_output(endpoint: str, url: str, keys: list[str], cfg: dict, unit_size: int = 2048) -> None:
    """A finished output of `keys` (`s3://archive/<key>`) made directly: the plan as the job writes it, a completion
    record per unit, one `_stats/` roll-up, `_config.json` with the job's fingerprint, `_SUCCESS.json`. What a
    finished run leaves, minus the data files (which planning never reads)."""
    import json

    from pipeline.config import redacted
    from pipeline.segment import plan as plan_mod
    from pipeline.segment.config import segment_config
    from pipeline.segment.run import _resolve_model, fingerprint
    from pipeline.segment.sources import InputRef
    from pipeline.segment.storage import Output
    from pipeline.segment.units import Kind

    opts = {"client_kwargs": {"endpoint_url": endpoint}}
    out = Output(url, storage_options=opts)
    refs = (InputRef(Kind.FILES, f"s3://archive/{k}", f"s3://archive/{k}") for k in keys)
    parts = plan_mod.plan_inputs(
        refs, plan_url=out.url_of("_plan"), unit_size=unit_size, storage_options=opts
    )
    plan = plan_mod.write_index(
        out.url_of("_plan"), parts, unit_size=unit_size, skipped={}, storage_options=opts
    )
    units = []
    for o in range(plan.units):
        n = min(unit_size, len(keys) - o * unit_size)
        units.append(
            {
                "unit_id": f"{o:08d}",
                "images": n,
                "ok": 0,
                "errors": n,
                "detections": 0,
                "labels": {},
                "error_reasons": {"read": n},
            }
        )
    out.write_all({f"_committed/{u['unit_id']}.json": json.dumps(u).encode() for u in units})
    out.write_bytes(
        "_stats/synthetic-00000.json", json.dumps({"run_id": "synthetic", "units": units}).encode()
    )
    c = segment_config(cfg)
    spec = _resolve_model(c)
    out.write_json(
        "_config.json",
        {
            "config": redacted(c),
            "model_id": spec.model_id,
            "fingerprint": fingerprint(c, spec),
            "inputs": ["day-1"],
        },
    )
    out.write_json("_SUCCESS.json", {"synthetic": True})


def part_append(args, work: str) -> dict:
    from tests.support.s3inventory import write_inventory
    from tests.support.s3proxy import FaultyS3

    old_n = args.append_inputs
    new_n, big_n = old_n // 10, old_n * 10
    old = [f"photos/p{i % PREFIXES:03d}/img-{i:07d}.jpg" for i in range(big_n)]
    new = [f"photos/new/img-{i:07d}.jpg" for i in range(new_n)]
    figures: dict = {}
    print(
        f"\n== append: a second day's S3 Inventory ({old_n:,} old + {new_n:,} new keys) appended to a finished "
        f"{old_n:,}-input output on moto S3"
    )
    with moto_in_process() as endpoint, FaultyS3(endpoint, []) as proxy:
        fs = s3(endpoint)
        for b in ("archive", "out-empty", "out-a", "out-z", "out-big"):
            fs.mkdir(b)
        seen: list[tuple[str, str]] = []
        decide = proxy.decide

        def counting(method: str, target: str):
            seen.append((method, target))
            return decide(method, target)

        proxy.decide = counting

        def report(keys: list[str], day: str) -> str:
            rows = [["archive", k, "11", "false"] for k in keys]
            url = write_inventory(fs, "archive", rows, parts=10)
            dated = url.replace("2026-11-29", day).replace("/daily/", f"/daily-{day}/")
            for p in fs.find(
                "archive/inventory/archive/daily/data/"
            ):  # each day's parts under its own folder
                fs.copy(p, p.replace("/daily/", f"/daily-{day}/"))
            doc = (
                fs.cat_file(url.removeprefix("s3://")).decode().replace("/daily/data/", f"/daily-{day}/data/")
            )
            fs.pipe_file(dated.removeprefix("s3://"), doc.encode())
            return dated

        day2 = report(old[:old_n] + new, "2026-11-30")
        day1 = report(old[:old_n], "2026-11-29")  # the first day's report: 0 new keys
        day2_big = report(old + new, "2026-12-01")
        storage = {"endpoint_url": proxy.endpoint}
        model = {"weights": "none", "min_size": MIN_SIZE, "max_size": MAX_SIZE}

        def cfg(input_url: str, out: str, mode: str) -> dict:
            return {
                "input": {"url": input_url, "unit_size": 2048, "storage": storage},
                "output": {"url": f"s3://{out}/run", "mode": mode, "storage": storage},
                "model": model,
            }

        start = time.perf_counter()
        finished_output(endpoint, "s3://out-a/run", old[:old_n], cfg(day2, "out-a", "append"))
        finished_output(endpoint, "s3://out-z/run", old[:old_n], cfg(day1, "out-z", "append"))
        finished_output(endpoint, "s3://out-big/run", old, cfg(day2_big, "out-big", "append"))
        print(
            f"finished outputs of {old_n:,}, {old_n:,} and {big_n:,} inputs made in {time.perf_counter() - start:.0f} s"
        )

        def measured(name: str, c: dict) -> tuple[float, int, str, int, int]:
            seen.clear()
            seconds, kib, output = plan_only(c, os.path.join(work, f"append-{name}.log"))
            inventory = sum(1 for _, t in seen if "/archive/inventory/" in t)
            return seconds, kib, output, len(seen), inventory

        base_s, _, base_out, _, _ = measured("empty", cfg(day2, "out-empty", "resume"))
        assert f"planned {old_n + new_n} inputs" in base_out, base_out[-2000:]
        app_s, app_kib, app_out, app_req, app_inv = measured("append", cfg(day2, "out-a", "append"))
        assert f"planned {new_n} new inputs" in app_out, app_out[-2000:]
        zero_s, _, zero_out, zero_req, zero_inv = measured("zero", cfg(day1, "out-z", "append"))
        assert "nothing new" in zero_out, zero_out[-2000:]
        big_s, big_kib, big_out, _, _ = measured("big", cfg(day2_big, "out-big", "append"))
        assert f"planned {new_n} new inputs" in big_out, big_out[-2000:]
    print(
        f"planning the report into an empty output: {base_s:.1f} s; appending it to the finished output: {app_s:.1f} s "
        f"= {app_s / base_s:.2f}x (driver's first call into the job to its 'planned' line, Ray start included)"
    )
    print(
        f"storage requests of the append: {app_req} in all, {app_req - app_inv} beyond reading the report "
        f"({app_inv}); with 0 new keys: 'nothing new' in {zero_s:.1f} s, {zero_req - zero_inv} beyond the report"
    )
    print(
        f"driver peak RSS appending to a {old_n:,}-input output: {app_kib / 1024:.0f} MiB; to a {big_n:,}-input "
        f"output: {big_kib / 1024:.0f} MiB ({big_s:.1f} s)"
    )
    figures["append_vs_plan"] = round(app_s / base_s, 2)
    figures["append_s"] = round(app_s, 1)
    figures["append_requests"] = app_req - app_inv
    figures["append_zero_requests"] = zero_req - zero_inv
    figures["append_rss_growth"] = round(big_kib / app_kib - 1, 3)
    return figures


PARTS = {
    "pipeline": part_pipeline,
    "write": part_write,
    "scale": part_scale,
    "query": part_query,
    "append": part_append,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every part smaller (under 10 minutes)")
    p.add_argument(
        "--images", type=int, default=None, help="JPEGs for pipeline vs bare (default 1000; quick 150)"
    )
    p.add_argument(
        "--inputs", type=int, default=None, help="objects for the scale part (default 100000; quick 10000)"
    )
    p.add_argument(
        "--query-rows", type=int, default=None, help="detection rows to query (default 10^7; quick 10^6)"
    )
    p.add_argument("--latency-ms", type=float, default=50.0, help="added to every request of the write part")
    p.add_argument(
        "--append-inputs",
        type=int,
        default=None,
        help="inputs of the finished output the append part adds to (default 100000; quick 10000)",
    )
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    args = p.parse_args()
    args.images = args.images or (150 if args.quick else 1000)
    args.inputs = args.inputs or (10_000 if args.quick else 100_000)
    args.query_rows = args.query_rows or (1_000_000 if args.quick else 10_000_000)
    args.append_inputs = args.append_inputs or (10_000 if args.quick else 100_000)
    print(f"machine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    figures: dict = {}
    work = tempfile.mkdtemp(prefix="bench-scale-")
    try:
        for name in args.only.split(","):
            figures.update(PARTS[name.strip()](args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
