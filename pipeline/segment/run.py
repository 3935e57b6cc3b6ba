"""Run: the segment job on a Ray cluster — lease, plan, the Ray Data pipeline, the summary.

    _plan/ parts ──from_items + flat_map(expand_part)──▶ pending units, one block each
          ──map_batches(SegmentWorker, ActorPoolStrategy, num_gpus=1 | threads on CPU)──▶ one row of counts per unit
          ──iter_batches on the driver──▶ summary, progress, `_stats/` roll-ups

Each actor reads its unit's inputs, runs the model and writes the unit's files and completion record itself: the
driver handles one small row per unit (2,048 images by default), never a detection, so its CPU and memory do not
grow with the archive's rows. It holds the plan's parts and a bitmap of units, not the units.

Ray is connected lazily through `connect` (the caller's `ray.init`): a re-run with nothing left to do never starts it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable

import numpy as np

from model.build import ModelSpec, resolve_spec
from model.checkpoint import CheckpointError
from pipeline.config import ConfigError, redacted
from pipeline.errors import JobError, describe_storage_error, one_line, root_cause
from pipeline.progress import Progress
from pipeline.segment import plan as plan_mod
from pipeline.segment.config import FP16_ON_CPU, ComputeConfig, SegmentConfig
from pipeline.segment.infer import resolve_precision
from pipeline.segment.lease import Lease
from pipeline.segment.plan import Plan
from pipeline.segment.schema import COMMITTED_DIR, CONFIG_FILE, PLAN_DIR, SUCCESS_FILE
from pipeline.segment.worker import SegmentWorker
from pipeline.segment.write import (
    Output,
    StatsLog,
    UnitStats,
    committed_stats,
    committed_units,
    stats_from_row,
)

# --- resources -------------------------------------------------------------------------------------------------------


# Images per forward pass when `model.batch_size` is auto. On CPU one image at a time is fastest: batching 640x480
# images at 800 px ran at 0.31 images/s against 0.50 one by one (bench/segment.py, 2 cores; larger activations,
# no parallelism left to gain). GPUs gain from batching.
CPU_BATCH_SIZE = 1
GPU_BATCH_SIZE = 4
IO_THREADS = 16  # compute.io_threads auto


def batch_size_for(configured: int | None, device: str) -> int:
    return configured or (GPU_BATCH_SIZE if device == "cuda" else CPU_BATCH_SIZE)


@dataclasses.dataclass(frozen=True)
class Resources:
    device: str  # "cuda" | "cpu"
    min_actors: int
    max_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    threads_per_actor: int
    read_cpus: float
    io_threads: int = IO_THREADS


def plan_resources(
    compute: ComputeConfig, *, device: str, cluster_gpus: float, node_cpus: list[float]
) -> Resources:
    """Size the actor pool from the cluster (pure; `auto` = None in `compute`).

    GPU clusters: one actor per GPU, 1 CPU each (its reads and decodes run on `io_threads` threads that mostly wait
    on storage or hold no GIL). CPU-only clusters: one actor per node, taking all of the node's CPUs but one and
    running torch with one thread per core. The reservations always leave `read_cpus` free on a node: an actor
    asking for every CPU starves the small tasks that feed it units, and Ray Data then waits forever (seen on a
    2-CPU machine).
    """
    if not node_cpus:
        raise JobError("the Ray cluster has no node with CPUs")
    per_node = min(node_cpus)
    read = compute.read_cpus
    use_gpu = device == "cuda" or (device == "auto" and cluster_gpus > 0 and compute.gpus_per_actor != 0)
    if use_gpu:
        if cluster_gpus <= 0 and device == "cuda":
            raise JobError("model.device is 'cuda' but the Ray cluster reports no GPU")
        gpus = compute.gpus_per_actor or 1.0
        cpus = compute.cpus_per_actor if compute.cpus_per_actor is not None else 1.0
        threads = compute.threads_per_actor or max(1, int(cpus))
        fit = max(1, int(cluster_gpus // gpus))
    else:
        gpus = 0.0
        if compute.cpus_per_actor is None:
            cpus = max(per_node - max(1.0, read), per_node / 2)
            threads = compute.threads_per_actor or max(1, int(per_node))
            fit = len(node_cpus)
        else:
            cpus = compute.cpus_per_actor
            threads = compute.threads_per_actor or max(1, int(cpus))
            fit = max(1, int(sum(math.floor((n - read) / cpus) if cpus else 1 for n in node_cpus)))
    if cpus + read > per_node + 1e-9:
        raise ConfigError(
            f"compute.cpus_per_actor: {cpus:g} CPUs per actor plus compute.read_cpus={read:g} exceed the "
            f"{per_node:g} CPUs of the smallest node; allowed at most {per_node - read:g}"
        )
    max_actors = compute.max_actors or fit
    min_actors = min(compute.min_actors or max_actors, max_actors)
    return Resources(
        device="cuda" if use_gpu else "cpu",
        min_actors=min_actors,
        max_actors=max_actors,
        gpus_per_actor=gpus,
        cpus_per_actor=cpus,
        threads_per_actor=threads,
        read_cpus=read,
        io_threads=compute.io_threads or IO_THREADS,
    )


def cluster_resources() -> tuple[float, list[float]]:
    """(total GPUs, CPUs of each alive node) of the connected Ray cluster."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return gpus, [c for c in nodes if c > 0]


# --- summary ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunSummary:
    output_url: str
    run_id: str
    model_id: str
    random_weights: bool
    resources: Resources | None = None
    units_total: int = 0
    units_skipped: int = 0
    units_committed: int = 0
    units_incomplete: list[str] = dataclasses.field(default_factory=list)
    images_skipped: int = 0  # inputs of the skipped units: done by an earlier run on this output
    images: int = 0
    ok: int = 0
    errors: int = 0
    detections: int = 0
    labels: Counter = dataclasses.field(default_factory=Counter)
    error_reasons: Counter = dataclasses.field(default_factory=Counter)
    images_this_run: int = 0
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.units_incomplete and self.units_committed + self.units_skipped == self.units_total

    @property
    def images_per_s(self) -> float:
        return self.images_this_run / self.seconds if self.seconds > 0 else 0.0

    def add(self, stats: UnitStats, *, this_run: bool) -> None:
        self.images += stats.images
        self.ok += stats.ok
        self.errors += stats.errors
        self.detections += stats.detections
        self.labels.update(stats.labels)
        self.error_reasons.update(stats.error_reasons)
        if this_run:
            self.units_committed += 1
            self.images_this_run += stats.images
        else:
            self.images_skipped += stats.images

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["labels"], d["error_reasons"] = dict(self.labels), dict(self.error_reasons)
        d["complete"], d["images_per_s"] = self.complete, round(self.images_per_s, 3)
        return d

    def lines(self) -> list[str]:
        out = []
        if self.random_weights:
            out.append(
                "NOTE: model.weights=none — RANDOM weights; detections are meaningless (a pipeline check)."
            )
        out += [
            f"images: {self.images} ({self.ok} ok, {self.errors} error)   detections: {self.detections}",
            f"units: {self.units_total} planned, {self.units_committed} committed now, "
            f"{self.units_skipped} already done (skipped: {self.images_skipped} inputs), "
            f"{len(self.units_incomplete)} incomplete",
            f"throughput: {self.images_this_run} images in {self.seconds:.1f} s = {self.images_per_s:.2f} images/s",
        ]
        if self.labels:
            top = ", ".join(f"{k}={v}" for k, v in self.labels.most_common(10))
            more = f" (+{len(self.labels) - 10} more labels)" if len(self.labels) > 10 else ""
            out.append(f"detections per label: {top}{more}")
        if self.error_reasons:
            out.append("errors: " + ", ".join(f"{k}={v}" for k, v in self.error_reasons.most_common(10)))
        out.append(f"model: {self.model_id}   run: {self.run_id}")
        out.append(f"results: {self.output_url}/images/ and {self.output_url}/detections/ (Parquet)")
        return out


# --- the job ---------------------------------------------------------------------------------------------------------


def fingerprint(cfg: SegmentConfig, spec: ModelSpec) -> str:
    """What decides the results: input, model and its thresholds. Not resources, batch size or device."""
    keyed = {
        "input": {"url": cfg.input.url, "max_pixels": cfg.input.max_pixels, "unit_size": cfg.input.unit_size},
        "model_id": spec.model_id,
        "min_size": spec.min_size,
        "max_size": spec.max_size,
        "score_threshold": cfg.model.score_threshold,
        "max_detections": cfg.model.max_detections,
    }
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def segment(
    cfg: SegmentConfig,
    *,
    log: Callable[[str], None] = print,
    connect: Callable[[], None] | None = None,
    live: bool = False,
) -> RunSummary:
    """Run (or resume) the segment job described by `cfg`.

    `connect()` is called before the first use of Ray (reading manifests, segmenting); by default Ray must already
    be connected. Nothing left to do means Ray is never needed. `live`: a progress bar (a terminal) instead of a
    progress line every `cfg.progress_interval_s`.
    """
    started = time.perf_counter()
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    connect = connect or (lambda: None)
    spec = _resolve_model(cfg)
    out = Output(cfg.output.url, storage_options=cfg.output.storage_options())
    try:
        out.ensure_writable()
    except Exception as e:
        raise JobError(f"output: {describe_storage_error(cfg.output.url, e)}") from None
    with Lease(out, run_id, cfg.output.lease_s).acquire(log) as lease:
        fp = fingerprint(cfg, spec)
        _prepare_output(out, cfg, spec, fp, run_id)
        plan = _plan(cfg, out, connect, log)
        for what, n in plan.skipped.items():
            log(f"planning: skipped {n} {what} (each input is processed once)")
        done = committed_units(out, plan.units)
        summary = RunSummary(
            output_url=out.url,
            run_id=run_id,
            model_id=spec.model_id,
            random_weights=spec.weights == "none",
            units_total=plan.units,
            units_skipped=int(done.sum()),
        )
        stats_log = StatsLog(out, run_id)
        for stats, from_record in committed_stats(out, done):
            summary.add(stats, this_run=False)
            if from_record:
                stats_log.record(stats)
        pending = plan.units - summary.units_skipped
        if summary.units_skipped:
            log(
                f"resuming: {summary.units_skipped} of {plan.units} units already committed "
                f"({summary.images_skipped} inputs skipped), {pending} to do"
            )
        try:
            if pending:
                connect()
                gpus, node_cpus = cluster_resources()
                res = plan_resources(
                    cfg.compute, device=cfg.model.device, cluster_gpus=gpus, node_cpus=node_cpus
                )
                summary.resources = res
                if res.device == "cpu" and cfg.model.precision == "fp16":
                    raise ConfigError(f"{FP16_ON_CPU} (this cluster has no GPU)")
                precision = resolve_precision(cfg.model.precision, res.device)
                log(
                    f"processing {pending} units on {res.min_actors}..{res.max_actors} actor(s) "
                    f"[{res.device}, {precision}, {res.gpus_per_actor:g} GPU, {res.cpus_per_actor:g} CPU, "
                    f"{res.threads_per_actor} threads each]"
                )
                _execute(
                    cfg, spec, res, out, plan, done, run_id, summary, stats_log, lease, log, started, live
                )
        except BaseException:
            try:  # keep what this run committed rolled up, without hiding why it stopped
                stats_log.flush()
            except Exception:  # noqa: BLE001
                pass
            raise
        stats_log.flush()
        summary.seconds = time.perf_counter() - started
        if summary.complete:
            out.write_json(SUCCESS_FILE, summary.to_json())
    return summary


def _resolve_model(cfg: SegmentConfig) -> ModelSpec:
    m = cfg.model
    try:
        spec = resolve_spec(
            m.weights, min_size=m.min_size, max_size=m.max_size, storage_options=m.storage_options()
        )
    except CheckpointError as e:
        raise JobError(f"model.weights: {e}") from None
    except OSError as e:
        raise JobError(f"model.weights: {describe_storage_error(m.weights, e)}") from None
    if spec.weights == "DEFAULT":
        _fetch_default_weights()
    return spec


def _fetch_default_weights() -> None:
    """Download torchvision's COCO weights once on the driver, so a machine without internet fails here, clearly."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    try:
        MaskRCNN_ResNet50_FPN_Weights.DEFAULT.get_state_dict(progress=False)
    except Exception as e:
        raise JobError(
            "model.weights=DEFAULT: cannot load torchvision's COCO weights "
            f"({type(e).__name__}: {' '.join(str(e).split())[:200]}). Without internet, pass a checkpoint "
            "URL from jobs/train.py, or 'none' for random weights."
        ) from None


def _prepare_output(out: Output, cfg: SegmentConfig, spec: ModelSpec, fp: str, run_id: str) -> None:
    try:
        previous = out.read_json(CONFIG_FILE)
        if previous and cfg.output.mode == "overwrite":
            out.clear()
        elif previous and previous.get("fingerprint") != fp and _holds_results(out):
            raise JobError(
                f"{out.url} holds results of another input/model/threshold setting (fingerprint "
                f"{previous.get('fingerprint')} != {fp}, model {previous.get('model_id')}); "
                "use a new --output, or --set output.mode=overwrite to replace them"
            )
        out.remove_stale_temporaries()
        out.write_json(
            CONFIG_FILE,
            {
                "config": redacted(cfg),
                "model_id": spec.model_id,
                "class_names": list(spec.class_names),
                "min_size": spec.min_size,
                "max_size": spec.max_size,
                "fingerprint": fp,
                "run_id": run_id,
            },
        )
    except JobError:
        raise
    except Exception as e:  # storage: missing bucket, access denied, endpoint down
        raise JobError(f"output: {describe_storage_error(cfg.output.url, e)}") from None


def _holds_results(out: Output) -> bool:
    """A plan or a committed unit: what a different setting must not mix with. A run that stopped before either
    (no inputs found, a typo in --input) left only its config, which the next run may simply replace."""
    return out.exists(f"{PLAN_DIR}/{plan_mod.INDEX}") or bool(out.names(COMMITTED_DIR))


def _plan(cfg: SegmentConfig, out: Output, connect: Callable[[], None], log: Callable[[str], None]) -> Plan:
    """The stored plan, or a new one: listed here (folders, globs) or read by Ray tasks (manifests)."""
    plan_url = out.url_of(PLAN_DIR)
    plan_opts, input_opts = cfg.output.storage_options(), cfg.input.storage_options()
    url, unit_size = cfg.input.url, cfg.input.unit_size
    try:
        existing = plan_mod.load_plan(plan_url, storage_options=plan_opts)
        if existing is not None:
            return existing
        plan_mod.clear_partial_plan(plan_url, storage_options=plan_opts)
        skipped: Counter = Counter()
        t0 = time.perf_counter()
        if plan_mod.is_manifest(url, storage_options=input_opts):
            sources = plan_mod.manifest_sources(url, storage_options=input_opts)
            connect()
            parts, skipped = plan_mod.plan_manifest(
                sources,
                plan_url=plan_url,
                unit_size=unit_size,
                manifest_options=input_opts,
                plan_options=plan_opts,
                read_cpus=cfg.compute.read_cpus,
            )
            how = f"{len(sources)} manifest file(s) read by Ray tasks"
        else:
            inputs = plan_mod.iter_inputs(url, storage_options=input_opts, skipped=skipped)
            parts = plan_mod.plan_inputs(
                inputs, plan_url=plan_url, unit_size=unit_size, storage_options=plan_opts
            )
            how = "listed"
        if not parts:
            raise JobError(
                f"no inputs found at {url} (looked for *.jpg, *.jpeg, *.png, *.bmp, *.tif, *.tiff, *.webp "
                "and *.tar)"
            )
        plan = plan_mod.write_index(
            plan_url, parts, unit_size=unit_size, skipped=dict(skipped), storage_options=plan_opts
        )
        seconds = time.perf_counter() - t0
        log(
            f"planned {plan.inputs} inputs in {plan.units} units ({how} in {seconds:.1f} s, "
            f"{plan.inputs / max(seconds, 1e-9):.0f} inputs/s)"
        )
        return plan
    except JobError:
        raise
    except Exception as e:
        raise JobError(f"input: {describe_storage_error(url, root_cause(e))}") from None


def _execute(
    cfg: SegmentConfig,
    spec: ModelSpec,
    res: Resources,
    out: Output,
    plan: Plan,
    done: np.ndarray,
    run_id: str,
    summary: RunSummary,
    stats_log: StatsLog,
    lease: Lease,
    log: Callable[[str], None],
    started: float,
    live: bool,
) -> None:
    import ray

    batch_size = batch_size_for(cfg.model.batch_size, res.device)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver prints its own progress lines (below)
    # An actor's own error (a storage failure's one line, an ImageError) reaches the driver as itself, not as Ray
    # Data's "UDF failed" wrapper, whose cause does not survive the trip between processes.
    ctx.raise_original_map_exception = True
    items = plan_mod.pending_parts(plan, done)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.flat_map(
        plan_mod.expand_part,
        fn_kwargs={
            "plan_url": plan.url,
            "unit_size": plan.unit_size,
            "plan_options": cfg.output.storage_options(),
        },
        num_cpus=res.read_cpus,
    )
    # One unit per block: an actor task takes a whole block, and a part expands into up to 32 units.
    ds = ds.repartition(target_num_rows_per_block=1)
    ds = ds.map_batches(
        SegmentWorker,
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
        num_cpus=res.cpus_per_actor,
        num_gpus=res.gpus_per_actor,
        fn_constructor_kwargs=dict(
            spec=spec,
            score_threshold=cfg.model.score_threshold,
            output_url=out.url_of(),
            max_detections=cfg.model.max_detections,
            device=res.device,
            threads=res.threads_per_actor,
            io_threads=res.io_threads,
            max_pixels=cfg.input.max_pixels,
            batch_size=batch_size,
            precision=cfg.model.precision,
            on_image_error=cfg.on_image_error,
            run_id=run_id,
            output_options=cfg.output.storage_options(),
            input_options=cfg.input.storage_options(),
            weights_storage_options=cfg.model.storage_options(),
        ),
    )
    seen = (
        done.copy()
    )  # units counted: done before, or reported in this run (a task re-run delivers a unit again)

    def line() -> str:
        rate = summary.images_this_run / (time.perf_counter() - started)
        return (
            f"progress: {summary.units_committed + summary.units_skipped}/{summary.units_total} units, "
            f"{summary.images} images ({summary.errors} error), {summary.detections} detections, "
            f"{rate:.2f} images/s"
        )

    def status() -> str:
        return (
            f"units {summary.units_committed + summary.units_skipped}/{summary.units_total}, "
            f"{summary.errors} error, {summary.detections} detections"
        )

    # Images are counted when their unit commits (the driver hears of nothing smaller); tar shards' image counts
    # are known only once read, so a plan with shards has no total to show.
    total = plan.inputs if all(p.kind == "files" for p in plan.parts) else None
    progress = Progress(
        "segment",
        total,
        unit="img",
        live=live,
        log=log,
        interval_s=cfg.progress_interval_s,
        initial=summary.images_skipped,
    )
    try:
        with progress:
            progress.update(0, status=status())
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                new = 0
                for row in batch.to_pylist():
                    stats = stats_from_row(row)
                    o = int(stats.unit_id)
                    if seen[o]:
                        continue
                    seen[o] = True
                    summary.add(stats, this_run=True)
                    stats_log.record(stats)
                    new += stats.images
                lease.check()
                progress.update(new, status=status(), line=line)
    except Exception as e:
        summary.units_incomplete = _unfinished(seen)
        cause = root_cause(e)
        # The lease lost, or an actor's storage failure (Ray wraps it with a traceback): one line, the URL and why.
        if isinstance(cause, JobError):
            raise JobError(one_line(cause)) from None
        raise JobError(f"inference pipeline failed: {_describe(cause)}") from None
    summary.units_incomplete = _unfinished(seen)


def _unfinished(seen: np.ndarray) -> list[str]:
    return [plan_mod.unit_id(int(o)) for o in np.flatnonzero(~seen)]


def _describe(cause: BaseException) -> str:
    return f"{type(cause).__name__}: {one_line(cause)[:400]}"
