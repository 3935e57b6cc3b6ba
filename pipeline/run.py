"""The Ray Data plan of the segment job: plan units → read tasks → inference actor pool → per-unit commits.

    units (one block each) ──map_batches(read_unit, num_cpus=read_cpus)──▶ input bytes
          ──map_batches(Segmenter, ActorPoolStrategy, num_gpus=1 | threads on CPU)──▶ results with nested detections
          ──iter_batches on the driver──▶ UnitCommitter: images/ + detections/ per unit, then its completion record

The driver only buffers results (RLE strings, not pixels) of units in flight. Requires a connected Ray
(`ray.init` is the caller's business).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pyarrow as pa

from model.build import ModelSpec, resolve_spec
from model.checkpoint import CheckpointError
from pipeline import commit as commit_mod
from pipeline import retry
from pipeline.commit import Output, UnitCommitter, UnitStats
from pipeline.config import ComputeConfig, ConfigError, SegmentConfig, redacted
from pipeline.errors import JobError, describe_storage_error
from pipeline.segmenter import Segmenter
from pipeline.sources import PLAN_INDEX, WorkUnit, iter_inputs, load_plan, plan_units, read_unit

# --- resources -------------------------------------------------------------------------------------------------------


# Images per forward pass when `model.batch_size` is auto. On CPU one image at a time is fastest: batching 640x480
# images at 800 px ran at 0.31 images/s against 0.50 one by one (bench/segment.py, 2 cores; larger activations,
# no parallelism left to gain). GPUs gain from batching.
CPU_BATCH_SIZE = 1
GPU_BATCH_SIZE = 4


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


def plan_resources(
    compute: ComputeConfig, *, device: str, cluster_gpus: float, node_cpus: list[float]
) -> Resources:
    """Size the actor pool from the cluster (pure; `auto` = None in `compute`).

    GPU clusters: one actor per GPU, 1 CPU each. CPU-only clusters: one actor per node, taking all of the node's
    CPUs but one (reads are I/O-bound and take a quarter CPU each) and running torch with one thread per core.
    The reservations always leave `read_cpus` free on a node: an actor asking for every CPU starves the read tasks
    that feed it, and Ray Data then waits forever (seen on a 2-CPU machine).
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


def segment(cfg: SegmentConfig, *, log: Callable[[str], None] = print) -> RunSummary:
    """Run (or resume) the segment job described by `cfg` on the connected Ray cluster."""
    import uuid

    started = time.perf_counter()
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    spec = _resolve_model(cfg)
    out = Output(cfg.output.url, storage_options=cfg.output.storage_options())
    fp = fingerprint(cfg, spec)
    _prepare_output(out, cfg, spec, fp, run_id)

    plan_url = out.url_of(commit_mod.PLAN_DIR)
    skipped: Counter = Counter()
    units = _plan(cfg, out, plan_url, skipped)
    for what, n in skipped.items():
        log(f"planning: skipped {n} {what} (each input is processed once)")
    done = out.committed_units()
    pending = [u for u in units if u.unit_id not in done]
    summary = RunSummary(
        output_url=out.url,
        run_id=run_id,
        model_id=spec.model_id,
        random_weights=spec.weights == "none",
        units_total=len(units),
        units_skipped=len(units) - len(pending),
    )
    for stats in _read_committed_stats(out, [u.unit_id for u in units if u.unit_id in done]):
        summary.add(stats, this_run=False)
    if summary.units_skipped:
        log(
            f"resuming: {summary.units_skipped} of {len(units)} units already committed "
            f"({summary.images_skipped} inputs skipped), {len(pending)} to do"
        )
    if pending:
        gpus, node_cpus = cluster_resources()
        res = plan_resources(cfg.compute, device=cfg.model.device, cluster_gpus=gpus, node_cpus=node_cpus)
        summary.resources = res
        log(
            f"processing {len(pending)} units on {res.min_actors}..{res.max_actors} actor(s) "
            f"[{res.device}, {res.gpus_per_actor:g} GPU, {res.cpus_per_actor:g} CPU, "
            f"{res.threads_per_actor} threads each]"
        )
        _execute(cfg, spec, res, out, pending, run_id, summary, log, started)
    summary.seconds = time.perf_counter() - started
    if summary.complete:
        out.write_json(commit_mod.SUCCESS_FILE, summary.to_json())
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
        out.ensure_writable()
        previous = out.read_json(commit_mod.CONFIG_FILE)
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
            commit_mod.CONFIG_FILE,
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
    return bool(out.committed_units()) or out.exists(f"{commit_mod.PLAN_DIR}/{PLAN_INDEX}")


def _plan(cfg: SegmentConfig, out: Output, plan_url: str, skipped: Counter) -> list[WorkUnit]:
    opts = cfg.output.storage_options()
    try:
        existing = load_plan(plan_url, storage_options=opts)
        if existing is not None:
            return existing
        inputs = iter_inputs(cfg.input.url, storage_options=cfg.input.storage_options(), skipped=skipped)
        units = plan_units(
            _nonempty(inputs, cfg.input.url),
            plan_url=plan_url,
            unit_size=cfg.input.unit_size,
            storage_options=opts,
        )
    except JobError:
        raise
    except Exception as e:
        raise JobError(f"input: {describe_storage_error(cfg.input.url, e)}") from None
    return units


def _nonempty(inputs: Iterator, url: str) -> Iterator:
    first = next(inputs, None)
    if first is None:
        raise JobError(
            f"no inputs found at {url} (looked for *.jpg, *.jpeg, *.png, *.bmp, *.tif, *.tiff, *.webp and *.tar)"
        )
    yield first
    yield from inputs


def _read_committed_stats(out: Output, unit_ids: list[str]) -> list[UnitStats]:
    if not unit_ids:
        return []
    paths = [out.path(commit_mod.COMMITTED_DIR, f"{u}.json") for u in unit_ids]
    # Retried like every other storage call of the job: a throttling spell while resuming must not end the run.
    blobs = (
        retry.call(out.fs.cat, paths) if len(paths) > 1 else {paths[0]: retry.call(out.fs.cat_file, paths[0])}
    )
    return [UnitStats(**json.loads(b)) for b in blobs.values()]


def _read_units(batch: pa.Table, *, input_options: dict, plan_options: dict) -> Iterator[pa.Table]:
    for row in batch.to_pylist():
        yield from read_unit(WorkUnit(**row), input_options=input_options, plan_options=plan_options)


def _execute(
    cfg: SegmentConfig,
    spec: ModelSpec,
    res: Resources,
    out: Output,
    pending: list[WorkUnit],
    run_id: str,
    summary: RunSummary,
    log: Callable[[str], None],
    started: float,
) -> None:
    import ray

    batch_size = batch_size_for(cfg.model.batch_size, res.device)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver prints its own progress lines (below)
    ds = ray.data.from_items([dataclasses.asdict(u) for u in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(
        _read_units,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=res.read_cpus,
        fn_kwargs={
            "input_options": cfg.input.storage_options(),
            "plan_options": cfg.output.storage_options(),
        },
    )
    ds = ds.map_batches(
        Segmenter,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
        num_cpus=res.cpus_per_actor,
        num_gpus=res.gpus_per_actor,
        fn_constructor_kwargs=dict(
            spec=spec,
            score_threshold=cfg.model.score_threshold,
            max_detections=cfg.model.max_detections,
            device=res.device,
            threads=res.threads_per_actor,
            max_pixels=cfg.input.max_pixels,
            batch_size=batch_size,
            on_image_error=cfg.on_image_error,
            run_id=run_id,
            weights_storage_options=cfg.model.storage_options(),
        ),
    )
    committer = UnitCommitter(out)
    last_report = time.perf_counter()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for stats in committer.add(batch):
                summary.add(stats, this_run=True)
            now = time.perf_counter()
            if now - last_report >= cfg.progress_interval_s:
                last_report = now
                rate = summary.images_this_run / (now - started)
                log(
                    f"progress: {summary.units_committed + summary.units_skipped}/{summary.units_total} units, "
                    f"{summary.images} images ({summary.errors} error), {summary.detections} detections, "
                    f"{rate:.2f} images/s"
                )
    except JobError:
        # The driver's own commit failed (storage): its message already names the URL and the cause.
        summary.units_incomplete = sorted(set(committer.pending_units) | _unfinished(pending, out))
        raise
    except Exception as e:
        summary.units_incomplete = sorted(set(committer.pending_units) | _unfinished(pending, out))
        raise JobError(f"inference pipeline failed: {_root_cause(e)}") from None
    summary.units_incomplete = sorted(set(committer.pending_units) | _unfinished(pending, out))


def _unfinished(pending: list[WorkUnit], out: Output) -> set[str]:
    done = out.committed_units()
    return {u.unit_id for u in pending if u.unit_id not in done}


def _root_cause(exc: BaseException) -> str:
    """The innermost error of a Ray exception chain, as one line (Ray wraps worker errors several times)."""
    cause: BaseException = exc
    seen = set()
    while id(cause) not in seen:
        seen.add(id(cause))
        inner = getattr(cause, "cause", None) or cause.__cause__
        if inner is None:
            break
        cause = inner
    text = " ".join(str(cause).split())
    return f"{type(cause).__name__}: {text[:400]}"
