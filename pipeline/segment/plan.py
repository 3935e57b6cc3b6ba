"""The plan: the inputs behind `--input`, grouped into work units and stored under `<output>/_plan/`.

Where the inputs come from is the sources' business (`pipeline.segment.sources`: folders, globs and single files
listed here on the driver; manifests and S3 Inventory parts read by Ray tasks, each writing its own plan parts).
This module stores what they yield:

    _plan/files-<source>-<seq>.parquet   loose files (read_url, image_uri); one row group per work unit
    _plan/tars-<source>-<seq>.parquet    tar shards (read_url, image_uri); each row is one work unit
    _plan/g<generation>/...parquet       parts added by an append (`pipeline.segment.append`), named as above
    _plan/index.json                     written last: the unit size and the parts with their input and unit counts

The plan is written once and reused by every re-run (which therefore never lists the input again). A unit's id is
its ordinal in index order; the driver holds the parts, never the units (`pending_parts` → Ray Data →
`pipeline.segment.units.expand_parts`). An append adds a generation: its parts are staged under `g<generation>/`
and numbered after every existing unit, then the index is published again, so an existing unit keeps its ordinal
(and its files and completion record) whatever is added later; parts staged without an index naming them are
nobody's and are removed by the next append.
"""

from __future__ import annotations

import dataclasses
import io
import json
import posixpath
from collections import Counter
from collections.abc import Iterable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import retry
from pipeline.errors import JobError, describe_storage_error, one_line, root_cause
from pipeline.segment.sources import InputRef, Part
from pipeline.segment.storage import is_local, publish
from pipeline.segment.units import PART_SCHEMA, Kind

INDEX = "index.json"
PART_UNITS = 32  # work units per files part: 65,536 rows at the default unit size
TAR_PART_ROWS = 4096  # shards per tars part

# `input.unit_size: auto`, decided when an output is first planned and stored in its index. A unit should be minutes
# of one actor's work, so that a crash costs little and progress moves: a GPU runs 2,048 images in a few seconds to
# a minute; a CPU actor takes ~2 s per image at 800 px (BENCHMARKS.md), so 64 images are ~2 minutes.
UNIT_SIZE_GPU = 2048
UNIT_SIZE_CPU = 64


def auto_unit_size(*, device: str, gpus_per_actor: float | None, cluster_gpus: float) -> int:
    """The unit size `auto` stands for: large where the actors will run on GPUs (the cluster has some and
    `model.device` / `compute.gpus_per_actor` allow them), small on CPU-only clusters."""
    if device == "cuda" or (device == "auto" and cluster_gpus > 0 and gpus_per_actor != 0):
        return UNIT_SIZE_GPU
    return UNIT_SIZE_CPU


def generation_folder(generation: int) -> str:
    """Where an append's parts are staged under `_plan/` (generation 0, the first planning, is `_plan/` itself)."""
    return f"g{generation:05d}"


@dataclasses.dataclass(frozen=True)
class PlanPart:
    name: str  # file name under _plan/
    kind: Kind
    inputs: int  # rows
    units: int  # work units it holds: ceil(inputs / unit_size) for files, inputs for tars
    first_unit: int = -1  # ordinal of its first unit (assigned by the index)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "kind": self.kind.value}


@dataclasses.dataclass(frozen=True)
class Plan:
    url: str  # the _plan/ folder (absolute path or protocol-qualified URL)
    unit_size: int
    parts: tuple[PlanPart, ...]
    skipped: dict[str, int]  # what planning left out, by reason (duplicate manifest lines, ...)
    # One entry per append that added parts: generation, input, inputs, units, first_unit (index order).
    generations: tuple[dict, ...] = ()

    @property
    def generation(self) -> int:
        """The latest generation of parts: 0 until an append adds some."""
        return self.generations[-1]["generation"] if self.generations else 0

    @property
    def inputs(self) -> int:
        return sum(p.inputs for p in self.parts)

    @property
    def units(self) -> int:
        return sum(p.units for p in self.parts)


class PlanWriter:
    """Groups inputs into parts under `plan_url` as they stream in; memory: one part's names.

    Files parts hold `unit_size * PART_UNITS` rows in row groups of `unit_size` (row group k = work unit k of the
    part, read by one ranged request); tars parts hold `TAR_PART_ROWS` shards, one unit each. `source` numbers the
    writer (one per manifest file read in parallel) so that parts from different writers never share a name;
    `folder` puts the parts in a sub-folder of `plan_url` (an append's generation), their names then relative paths.
    """

    def __init__(
        self,
        plan_url: str,
        *,
        unit_size: int,
        source: int = 0,
        storage_options: dict | None = None,
        folder: str = "",
    ):
        self.fs, self.root = fsspec.core.url_to_fs(plan_url, **(storage_options or {}))
        self.unit_size, self.source, self.folder = unit_size, source, folder
        self.parts: list[PlanPart] = []
        self._rows: dict[Kind, tuple[list[str], list[str]]] = {kind: ([], []) for kind in Kind}
        self._seq = 0
        if is_local(self.fs):
            self.fs.makedirs(posixpath.join(self.root, folder), exist_ok=True)

    def add(self, ref: InputRef) -> None:
        urls, uris = self._rows[ref.kind]
        urls.append(ref.read_url)
        uris.append(ref.image_uri)
        if len(urls) >= (TAR_PART_ROWS if ref.kind is Kind.TARS else self.unit_size * PART_UNITS):
            self._flush(ref.kind)

    def close(self) -> list[PlanPart]:
        for kind in Kind:
            self._flush(kind)
        return self.parts

    def _flush(self, kind: Kind) -> None:
        urls, uris = self._rows[kind]
        if not urls:
            return
        name = posixpath.join(self.folder, f"{kind.value}-{self.source:05d}-{self._seq:05d}.parquet")
        self._seq += 1
        table = pa.table({"read_url": urls, "image_uri": uris}, schema=PART_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=self.unit_size if kind is Kind.FILES else TAR_PART_ROWS)
        publish(self.fs, posixpath.join(self.root, name), buf.getvalue())
        units = -(-len(urls) // self.unit_size) if kind is Kind.FILES else len(urls)
        self.parts.append(PlanPart(name=name, kind=kind, inputs=len(urls), units=units))
        urls.clear()
        uris.clear()


def plan_inputs(
    inputs: Iterable[InputRef], *, plan_url: str, unit_size: int, storage_options: dict | None = None
) -> list[PlanPart]:
    """Write the parts for `inputs` (the driver's listing) and return them; the caller writes the index."""
    writer = PlanWriter(plan_url, unit_size=unit_size, storage_options=storage_options)
    for ref in inputs:
        writer.add(ref)
    return writer.close()


def plan_parts_in_tasks(
    parts: list[Part],
    *,
    plan_url: str,
    unit_size: int,
    input_options: dict | None,
    plan_options: dict | None,
    read_cpus: float,
) -> tuple[list[PlanPart], Counter]:
    """Read the sources' parts (manifest files, inventory data files) with one Ray task each, in parallel; each
    writes its own plan parts. Returns the plan parts and what was skipped. Needs a connected Ray."""
    import ray

    task = ray.remote(_plan_part).options(num_cpus=read_cpus, max_retries=3)
    refs = [
        task.remote(
            i,
            part,
            plan_url=plan_url,
            unit_size=unit_size,
            input_options=input_options,
            plan_options=plan_options,
        )
        for i, part in enumerate(parts)
    ]
    planned: list[PlanPart] = []
    skipped: Counter = Counter()
    for ref in refs:
        try:
            got_parts, got_skipped = ray.get(ref)
        except Exception as e:
            cause = root_cause(e)
            if isinstance(cause, JobError):  # the task's own one-line reason, without Ray's traceback
                raise JobError(one_line(cause)) from None
            raise
        planned += got_parts
        skipped.update(got_skipped)
    return planned, skipped


def _plan_part(
    i: int,
    part: Part,
    *,
    plan_url: str,
    unit_size: int,
    input_options: dict | None,
    plan_options: dict | None,
) -> tuple[list[PlanPart], dict[str, int]]:
    skipped: Counter = Counter()
    writer = PlanWriter(plan_url, unit_size=unit_size, source=i, storage_options=plan_options)
    try:
        for ref in part.read(storage_options=input_options, skipped=skipped):
            writer.add(ref)
        return writer.close(), dict(skipped)
    except JobError:
        raise
    except Exception as e:  # storage or format: one line naming the part
        raise JobError(f"input: {describe_storage_error(part.url, e)}") from None


def write_index(
    plan_url: str,
    parts: list[PlanPart],
    *,
    unit_size: int,
    skipped: dict[str, int],
    storage_options: dict | None = None,
) -> Plan:
    """Number the units (parts in name order) and publish the index: from now on the plan is what re-runs use."""
    numbered, first = [], 0
    for part in sorted(parts, key=lambda p: p.name):
        numbered.append(dataclasses.replace(part, first_unit=first))
        first += part.units
    plan = Plan(url=plan_url.rstrip("/"), unit_size=unit_size, parts=tuple(numbered), skipped=dict(skipped))
    _publish_index(plan, storage_options)
    return plan


def append_generation(
    plan: Plan,
    parts: list[PlanPart],
    *,
    input_url: str,
    listed: int,
    storage_options: dict | None = None,
) -> Plan:
    """Publish `plan` plus `parts` (an append's, staged under `generation_folder(plan.generation + 1)`) as the new
    index: the new parts numbered after every existing unit, the existing ones unchanged. Until this index is
    published nothing refers to the staged parts; once it is, they are the plan's like any other."""
    numbered, first = [], plan.units
    for part in sorted(parts, key=lambda p: p.name):
        numbered.append(dataclasses.replace(part, first_unit=first))
        first += part.units
    entry = {
        "generation": plan.generation + 1,
        "input": input_url,
        "listed": listed,
        "inputs": sum(p.inputs for p in numbered),
        "units": first - plan.units,
        "first_unit": plan.units,
    }
    new = dataclasses.replace(
        plan, parts=plan.parts + tuple(numbered), generations=(*plan.generations, entry)
    )
    _publish_index(new, storage_options)
    return new


def _publish_index(plan: Plan, storage_options: dict | None) -> None:
    fs, root = fsspec.core.url_to_fs(plan.url, **(storage_options or {}))
    doc = {
        "version": 3,  # 2 + generations; readers take both
        "unit_size": plan.unit_size,
        "inputs": plan.inputs,
        "units": plan.units,
        "skipped": dict(plan.skipped),
        "parts": [p.to_json() for p in plan.parts],
        "generations": list(plan.generations),
    }
    publish(fs, posixpath.join(root, INDEX), (json.dumps(doc, indent=1) + "\n").encode())


def load_plan(plan_url: str, *, storage_options: dict | None = None) -> Plan | None:
    """The plan at `plan_url`, or None when there is none yet (no index: planning never finished)."""
    fs, root = fsspec.core.url_to_fs(plan_url, **(storage_options or {}))
    try:
        doc = json.loads(retry.call(fs.cat_file, posixpath.join(root, INDEX)))
    except FileNotFoundError:
        return None
    parts = tuple(PlanPart(**{**p, "kind": Kind(p["kind"])}) for p in doc["parts"])
    return Plan(
        url=plan_url.rstrip("/"),
        unit_size=doc["unit_size"],
        parts=parts,
        skipped=doc.get("skipped", {}),
        generations=tuple(doc.get("generations", ())),
    )


def clear_partial_plan(plan_url: str, *, storage_options: dict | None = None) -> None:
    """Remove the parts of a plan whose index was never written (a planning that was interrupted): nothing trusts
    them, and a new planning may name its parts differently."""
    fs, root = fsspec.core.url_to_fs(plan_url, **(storage_options or {}))
    try:
        names = retry.call(fs.ls, root, detail=False)
    except FileNotFoundError:
        return
    if names:
        retry.call(fs.rm, names, recursive=True)


def clear_generation(plan_url: str, generation: int, *, storage_options: dict | None = None) -> None:
    """Remove what an append that never published its index staged for `generation` (nothing refers to it)."""
    fs, root = fsspec.core.url_to_fs(plan_url, **(storage_options or {}))
    folder = posixpath.join(root, generation_folder(generation))
    try:
        retry.call(fs.rm, folder, recursive=True)
    except FileNotFoundError:
        pass


def pending_parts(plan: Plan, done: np.ndarray) -> list[dict]:
    """One row per part that still has units to do, for Ray Data (`pipeline.segment.units.expand_parts` turns it
    into units): the part and which of its units are done (a packed bitmap, 1 = done). `done` is a bool array
    indexed by unit ordinal."""
    items = []
    for part in plan.parts:
        mask = done[part.first_unit : part.first_unit + part.units]
        if not mask.all():
            items.append({**part.to_json(), "done": np.packbits(mask).tobytes()})
    return items
