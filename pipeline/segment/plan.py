"""The plan: the inputs behind `--input`, grouped into work units and stored under `<output>/_plan/`.

Where the inputs come from is the sources' business (`pipeline.segment.sources`: folders, globs and single files
listed here on the driver; manifests and S3 Inventory parts read by Ray tasks, each writing its own plan parts).
This module stores what they yield:

    _plan/files-<source>-<seq>.parquet   loose files (read_url, image_uri); one row group per work unit
    _plan/tars-<source>-<seq>.parquet    tar shards (read_url, image_uri); each row is one work unit
    _plan/index.json                     written last: the unit size and the parts with their input and unit counts

The plan is written once and reused by every re-run (which therefore never lists the input again). A unit's id is
its ordinal in index order; the driver holds the parts, never the units (`pending_parts` → Ray Data →
`pipeline.segment.units.expand_parts`).
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
    writer (one per manifest file read in parallel) so that parts from different writers never share a name.
    """

    def __init__(
        self, plan_url: str, *, unit_size: int, source: int = 0, storage_options: dict | None = None
    ):
        self.fs, self.root = fsspec.core.url_to_fs(plan_url, **(storage_options or {}))
        self.unit_size, self.source = unit_size, source
        self.parts: list[PlanPart] = []
        self._rows: dict[Kind, tuple[list[str], list[str]]] = {kind: ([], []) for kind in Kind}
        self._seq = 0
        if is_local(self.fs):
            self.fs.makedirs(self.root, exist_ok=True)

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
        name = f"{kind.value}-{self.source:05d}-{self._seq:05d}.parquet"
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
    fs, root = fsspec.core.url_to_fs(plan_url, **(storage_options or {}))
    numbered, first = [], 0
    for part in sorted(parts, key=lambda p: p.name):
        numbered.append(dataclasses.replace(part, first_unit=first))
        first += part.units
    doc = {
        "version": 2,
        "unit_size": unit_size,
        "inputs": sum(p.inputs for p in numbered),
        "units": first,
        "skipped": dict(skipped),
        "parts": [p.to_json() for p in numbered],
    }
    publish(fs, posixpath.join(root, INDEX), (json.dumps(doc, indent=1) + "\n").encode())
    return Plan(url=plan_url.rstrip("/"), unit_size=unit_size, parts=tuple(numbered), skipped=dict(skipped))


def load_plan(plan_url: str, *, storage_options: dict | None = None) -> Plan | None:
    """The plan at `plan_url`, or None when there is none yet (no index: planning never finished)."""
    fs, root = fsspec.core.url_to_fs(plan_url, **(storage_options or {}))
    try:
        doc = json.loads(retry.call(fs.cat_file, posixpath.join(root, INDEX)))
    except FileNotFoundError:
        return None
    parts = tuple(PlanPart(**{**p, "kind": Kind(p["kind"])}) for p in doc["parts"])
    return Plan(
        url=plan_url.rstrip("/"), unit_size=doc["unit_size"], parts=parts, skipped=doc.get("skipped", {})
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
        retry.call(fs.rm, names)


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
