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
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import numpy as np

from model.build import ModelSpec, resolve_spec
from model.checkpoint import CheckpointError
from pipeline import retry
from pipeline.config import ConfigError, redacted
from pipeline.errors import JobError, describe_storage_error, one_line, root_cause
from pipeline.progress import Progress
from pipeline.segment import append as append_mod
from pipeline.segment import plan as plan_mod
from pipeline.segment import sources
from pipeline.segment.config import SegmentConfig
from pipeline.segment.lease import Lease
from pipeline.segment.ledger import StatsLog, committed_stats, committed_units
from pipeline.segment.live import ProgressBoard, in_flight
from pipeline.segment.naming import IMAGE_EXTENSIONS
from pipeline.segment.plan import Plan
from pipeline.segment.resources import (
    Resources,
    cluster_resources,
    memory_per_actor,
    node_resources,
    plan_resources,
)
from pipeline.segment.schema import COMMITTED_DIR, CONFIG_FILE, FAULTS_DIR, PLAN_DIR, SUCCESS_FILE
from pipeline.segment.settings import (
    FP16_ON_CPU,
    WorkerSettings,
    batch_size_for,
    image_memory_for,
    resolve_precision,
)
from pipeline.segment.storage import Output
from pipeline.segment.summary import RunSummary
from pipeline.segment.units import Kind, expand_parts, stats_from_row, unit_id
from pipeline.segment.worker import SegmentWorker

# Units an inference actor runs at once (`pipeline.segment.worker`: the next one reads while the last one commits).
UNITS_PER_ACTOR = 2
# Seconds between the driver's looks at the live counts (`pipeline.segment.live`).
POLL_S = 0.5

# --- the job ---------------------------------------------------------------------------------------------------------


def fingerprint(cfg: SegmentConfig, spec: ModelSpec) -> str:
    """What decides each input's results: the model, its sizes and thresholds, the pixel cap. Not the input (an
    append adds another input's images to the same results), not the unit size (an output keeps its plan's), not
    resources, batch size or device."""
    keyed = {
        "version": 2,
        "max_pixels": cfg.input.max_pixels,
        "model_id": spec.model_id,
        "min_size": spec.min_size,
        "max_size": spec.max_size,
        "score_threshold": cfg.model.score_threshold,
        "max_detections": cfg.model.max_detections,
    }
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint_v1(cfg: SegmentConfig, spec: ModelSpec, previous: dict) -> str:
    """The fingerprint of outputs written before appends existed, which also hashed the input URL and unit size:
    computed with those of the run that wrote `previous` (its `_config.json` "config"), so that it matches when the
    model settings do."""
    written = previous.get("input") or {}
    keyed = {
        "input": {
            "url": written.get("url"),
            "max_pixels": cfg.input.max_pixels,
            "unit_size": written.get("unit_size"),
        },
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
        plan, planned_now = _plan(cfg, out, connect, log)
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
        if not pending and not planned_now and cfg.output.mode == "resume":
            # A finished output: a re-run never plans the input again, so say whether it grew (where looking is
            # cheap) and how to add what is new, rather than end silently.
            log(
                append_mod.growth_hint(
                    cfg.input.url,
                    plan,
                    input_options=cfg.input.storage_options(),
                    plan_options=cfg.output.storage_options(),
                )
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
        summary.units_with_device_failures = sum(
            1 for n in out.names(FAULTS_DIR) if n.endswith(".json") and not n.startswith(".")
        )
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
        url = cfg.input.url
        written = (previous or {}).get("config") or {}
        # Every input planned into this output (outputs written before appends name one, in their config).
        inputs = (previous or {}).get("inputs") or [written.get("input", {}).get("url")]
        if previous and cfg.output.mode == "overwrite":
            out.clear()
            inputs = []
        elif previous and _holds_results(out):
            if previous.get("fingerprint") not in (fp, _fingerprint_v1(cfg, spec, written)):
                raise JobError(
                    f"{out.url} holds results of another model/threshold setting (fingerprint "
                    f"{previous.get('fingerprint')} != {fp}, model {previous.get('model_id')}); "
                    "use a new --output, or --set output.mode=overwrite to replace them"
                )
            if cfg.output.mode == "resume" and url not in inputs:
                raise JobError(
                    f"{out.url} holds results of another input ({inputs[-1]}); a re-run resumes its stored plan and "
                    f"would not read {url}: to add the inputs of {url} that it lacks, --set output.mode=append; "
                    "or use a new --output"
                )
        else:
            inputs = []
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
                "inputs": [*inputs, url] if url not in inputs else inputs,
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


def _plan(
    cfg: SegmentConfig, out: Output, connect: Callable[[], None], log: Callable[[str], None]
) -> tuple[Plan, bool]:
    """The stored plan (with `output.mode: append`, plus the inputs it lacks), or a new one: listed here (folders,
    globs) or read by Ray tasks (manifests). Returns it and whether this run planned it from scratch."""
    plan_url = out.url_of(PLAN_DIR)
    plan_opts, input_opts = cfg.output.storage_options(), cfg.input.storage_options()
    url = cfg.input.url
    try:
        existing = plan_mod.load_plan(plan_url, storage_options=plan_opts)
        if existing is not None:
            if cfg.input.unit_size not in (None, existing.unit_size):
                log(
                    f"input.unit_size={cfg.input.unit_size} not used: this output's plan has units of "
                    f"{existing.unit_size} inputs, which every run on it keeps"
                )
            if cfg.output.mode != "append":
                return existing, False
            connect()
            appended = append_mod.append(
                existing,
                input_url=url,
                input_options=input_opts,
                plan_options=plan_opts,
                read_cpus=cfg.compute.read_cpus,
                before_publish=lambda: _withdraw_success(out),
                log=log,
            )
            return appended, False
        plan_mod.clear_partial_plan(plan_url, storage_options=plan_opts)
        unit_size = cfg.input.unit_size or _auto_unit_size(cfg, connect, log)
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
        return plan, True
    except JobError:
        raise
    except Exception as e:
        raise JobError(f"input: {describe_storage_error(url, root_cause(e))}") from None


def _auto_unit_size(cfg: SegmentConfig, connect: Callable[[], None], log: Callable[[str], None]) -> int:
    """`input.unit_size: auto` for a new plan: from `model.device` when it decides alone, else from the cluster
    (connected here, before planning, to see its GPUs). Stored in the plan: later runs keep it on any hardware."""
    device, gpus_per_actor = cfg.model.device, cfg.compute.gpus_per_actor
    if device == "cpu" or gpus_per_actor == 0:
        why = "model.device is cpu" if device == "cpu" else "compute.gpus_per_actor is 0"
        gpus = 0.0
    elif device == "cuda":
        why, gpus = "model.device is cuda", 1.0
    else:
        connect()
        gpus, _ = cluster_resources()
        why = f"the cluster has {gpus:g} GPU(s)" if gpus else "the cluster has no GPU"
    size = plan_mod.auto_unit_size(device=device, gpus_per_actor=gpus_per_actor, cluster_gpus=gpus)
    log(f"unit size: {size} inputs per unit (input.unit_size auto: {why})")
    return size


def _withdraw_success(out: Output) -> None:
    """An append about to publish new units: the output is no longer complete until they are."""
    try:
        retry.call(out.fs.rm, out.path(SUCCESS_FILE))
    except FileNotFoundError:
        pass


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

    # Running units' counts, a few times a second from each actor (`pipeline.segment.live`); no CPU reserved: it
    # only stores a few numbers per running unit.
    board = ray.remote(ProgressBoard).options(num_cpus=0).remote()
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
        image_memory_bytes=image_memory_for(
            cfg.compute.image_memory_mb, memory_per_actor(res, node_resources())
        ),
        precision=cfg.model.precision,
        on_image_error=cfg.on_image_error,
        progress_board=board,
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
        # Two units at once per actor, so that the next unit reads while the last one drains and commits (the
        # actor lets one forward pass run at a time, the older unit's first: `worker._Turn`).
        compute=ray.data.ActorPoolStrategy(
            min_size=res.min_actors,
            max_size=res.max_actors,
            max_concurrent_calls_per_actor=UNITS_PER_ACTOR,
            enable_true_multi_threading=True,
        ),
        num_cpus=res.cpus_per_actor,
        num_gpus=res.gpus_per_actor,
        fn_constructor_kwargs={"settings": settings},
    )
    seen = (
        done.copy()
    )  # units counted: done before, or reported in this run (a task re-run delivers a unit again)
    # Counts of the units running now (the board's, for units not yet seen to commit): images, errors, detections.
    running = [0, 0, 0]
    lock = threading.Lock()

    def line() -> str:
        rate = (summary.images_this_run + running[0]) / (time.perf_counter() - started)
        return (
            f"progress: {summary.units_committed + summary.units_skipped}/{summary.units_total} units, "
            f"{summary.images + running[0]} images ({summary.errors + running[1]} error), "
            f"{summary.detections + running[2]} detections, {rate:.2f} images/s"
        )

    def status() -> str:
        return (
            f"units {summary.units_committed + summary.units_skipped}/{summary.units_total}, "
            f"{summary.errors + running[1]} error, {summary.detections + running[2]} detections"
        )

    def show() -> None:  # under `lock`
        progress.set(
            summary.images_skipped + summary.images_this_run + running[0], status=status(), line=line
        )

    # Tar shards' image counts are known only once read, so a plan with shards has no total to show.
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
    stop = threading.Event()

    def poll() -> None:
        """Every `POLL_S`, and when a plain line is due: the board's counts, then the bar or a line."""
        while not stop.wait(max(0.01, min(POLL_S, progress.due_in()))):
            try:
                snapshot = ray.get(board.snapshot.remote(), timeout=10)
            except Exception:  # noqa: BLE001  (live counts are decoration: the commits still count)
                continue
            with lock:
                running[:] = in_flight(snapshot, seen)
                show()

    poller = threading.Thread(target=poll, name="progress", daemon=True)
    try:
        with progress:
            with lock:
                show()
            poller.start()
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                with lock:
                    for row in batch.to_pylist():
                        stats = stats_from_row(row)
                        o = int(stats.unit_id)
                        if seen[o]:
                            continue
                        seen[o] = True
                        summary.add(stats, this_run=True)
                        stats_log.record(stats)
                    show()
                lease.check()
            stop.set()
            poller.join()
            with lock:
                running[:] = [0, 0, 0]
                show()
    except Exception as e:
        summary.units_incomplete = _unfinished(seen)
        cause = root_cause(e)
        # The lease lost, or an actor's storage failure (Ray wraps it with a traceback): one line, the URL and why.
        if isinstance(cause, JobError):
            raise JobError(one_line(cause)) from None
        raise JobError(f"inference pipeline failed: {_describe(cause)}") from None
    finally:
        stop.set()
        try:
            ray.kill(board)
        except Exception:  # noqa: BLE001  (Ray itself may be going down with the job)
            pass
    summary.units_incomplete = _unfinished(seen)


def _unfinished(seen: np.ndarray) -> list[str]:
    return [unit_id(int(o)) for o in np.flatnonzero(~seen)]


def _describe(cause: BaseException) -> str:
    return f"{type(cause).__name__}: {one_line(cause)[:400]}"
