"""Run: the segment job on a Ray cluster — lease, plan, the Ray Data pipeline, the summary.

    _plan/ parts ──from_items + map_batches(units.expand_parts)──▶ pending units (UNIT_SCHEMA rows), one block each
          ──map_batches(SegmentWorker, ActorPoolStrategy, num_gpus=1 | threads on CPU)──▶ one row of counts per unit
          ──iter_batches on the driver──▶ summary, progress, `_stats/` roll-ups

Each actor reads its unit's inputs, runs the model and writes the unit's files and completion record itself: the
driver handles one small row per unit (2,048 images by default), never a detection, so its CPU and memory do not
grow with the archive's rows. It holds the plan's parts and a bitmap of units, not the units.

Ray is connected lazily through `connect` (the caller's `ray.init`): a re-run with nothing left to do never starts it.
"""

from __future__ import annotations

import hashlib
import json
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
from pipeline.segment import sources
from pipeline.segment.config import SegmentConfig
from pipeline.segment.lease import Lease
from pipeline.segment.ledger import StatsLog, committed_stats, committed_units
from pipeline.segment.naming import IMAGE_EXTENSIONS
from pipeline.segment.plan import Plan
from pipeline.segment.resources import Resources, cluster_resources, plan_resources
from pipeline.segment.schema import COMMITTED_DIR, CONFIG_FILE, FAULTS_DIR, PLAN_DIR, SUCCESS_FILE
from pipeline.segment.settings import FP16_ON_CPU, WorkerSettings, batch_size_for, resolve_precision
from pipeline.segment.storage import Output
from pipeline.segment.summary import RunSummary
from pipeline.segment.units import Kind, expand_parts, stats_from_row, unit_id
from pipeline.segment.worker import SegmentWorker

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
        # One listing: units that met a device failure (in this run or an earlier one) and were run again.
        summary.units_with_device_failures = len(out.names(FAULTS_DIR))
        if summary.complete:
            out.write_json(SUCCESS_FILE, summary.to_json())
    return summary


def _resolve_model(cfg: SegmentConfig) -> ModelSpec:
    m = cfg.model
    try:
        spec = resolve_spec(
            m.weights,
            architecture=m.architecture,
            min_size=m.min_size,
            max_size=m.max_size,
            storage_options=m.storage_options(),
        )
    except CheckpointError as e:
        raise JobError(f"model.weights: {e}") from None
    except OSError as e:
        raise JobError(f"model.weights: {describe_storage_error(m.weights, e)}") from None
    except ValueError as e:  # an architecture without COCO weights under DEFAULT
        raise JobError(f"model.architecture: {e}") from None
    if spec.weights == "DEFAULT":
        _fetch_default_weights(spec)
    return spec


def _fetch_default_weights(spec: ModelSpec) -> None:
    """Download torchvision's COCO weights of `spec.architecture` once on the driver (into the torch hub cache, where
    the actors load them from), so a machine without internet fails here, clearly."""
    from torchvision.models import get_weight

    from model import architectures

    name = architectures.get(spec.architecture).coco_weights
    try:
        get_weight(name).get_state_dict(progress=False)
    except Exception as e:
        raise JobError(
            f"model.weights=DEFAULT: cannot load torchvision's COCO weights {name} "
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
                "architecture": spec.architecture,
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
        found = sources.find_source(url, storage_options=input_opts)
        if found.in_tasks:
            parts_to_read = found.source.parts(found.target)
            connect()
            parts, skipped = plan_mod.plan_parts_in_tasks(
                parts_to_read,
                plan_url=plan_url,
                unit_size=unit_size,
                input_options=input_opts,
                plan_options=plan_opts,
                read_cpus=cfg.compute.read_cpus,
            )
            how = f"{len(parts_to_read)} {found.source.name} file(s) read by Ray tasks"
        else:
            inputs = found.source.list_inputs(found.target, skipped=skipped)
            parts = plan_mod.plan_inputs(
                inputs, plan_url=plan_url, unit_size=unit_size, storage_options=plan_opts
            )
            how = f"{found.source.name} listed"
        if not parts:
            looked = ", ".join(f"*{ext}" for ext in sorted(IMAGE_EXTENSIONS))
            raise JobError(f"no inputs found at {url} (looked for {looked} and *.tar)")
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

    settings = WorkerSettings(
        spec=spec,
        output_url=out.url_of(),
        score_threshold=cfg.model.score_threshold,
        run_id=run_id,
        max_detections=cfg.model.max_detections,
        device=res.device,
        threads=res.threads_per_actor,
        io_threads=res.io_threads,
        max_pixels=cfg.input.max_pixels,
        batch_size=batch_size_for(cfg.model.batch_size, res.device),
        precision=cfg.model.precision,
        on_image_error=cfg.on_image_error,
        gpu_memory_fraction=res.gpus_per_actor if res.device == "cuda" and res.gpus_per_actor < 1 else None,
        output_options=cfg.output.storage_options(),
        input_options=cfg.input.storage_options(),
        weights_options=cfg.model.storage_options(),
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver prints its own progress lines (below)
    # An actor's own error (a storage failure's one line, an ImageError) reaches the driver as itself, not as Ray
    # Data's "UDF failed" wrapper, whose cause does not survive the trip between processes.
    ctx.raise_original_map_exception = True
    items = plan_mod.pending_parts(plan, done)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        expand_parts,
        batch_size=1,
        batch_format="pyarrow",
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
        fn_constructor_kwargs={"settings": settings},
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
    total = plan.inputs if all(p.kind is Kind.FILES for p in plan.parts) else None
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
    return [unit_id(int(o)) for o in np.flatnonzero(~seen)]


def _describe(cause: BaseException) -> str:
    return f"{type(cause).__name__}: {one_line(cause)[:400]}"
