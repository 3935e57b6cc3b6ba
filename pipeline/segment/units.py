"""Work units: the protocol between the driver and the inference actors, in one form end to end.

A work unit is the unit of retry, of resume and of storage: `unit_size` loose files (one row group of a files part
of the plan) or one `.tar` shard. Its id is its ordinal in the plan (`%08d`), which names its output files and its
completion record.

    plan parts ──expand_parts (Ray Data task)──▶ UNIT_SCHEMA rows ──▶ actor: units_from_table → Unit
    actor: UnitStats ──stats_table──▶ STATS_SCHEMA rows ──▶ driver: stats_from_row → UnitStats

`Unit` and `UnitStats` cross processes only as Arrow rows of their schemas here, converted by the functions beside
them; nothing else builds or reads those rows.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import retry


class Kind(str, enum.Enum):
    """What a plan part holds and what its units are (the values are stored in `_plan/index.json`)."""

    FILES = "files"  # loose files; a unit is one row group of the part (`unit_size` files)
    TARS = "tars"  # `.tar` shards; a unit is one shard, each image member one input


def unit_id(ordinal: int) -> str:
    return f"{ordinal:08d}"


# The columns of a plan part file: one row per loose file or per shard.
PART_SCHEMA = pa.schema([("read_url", pa.string()), ("image_uri", pa.string())])


@dataclasses.dataclass(frozen=True)
class Unit:
    """One work unit, as an inference actor receives it."""

    ordinal: int
    kind: Kind
    # FILES: the plan part (URL) whose row group `row_group` lists the unit's inputs;
    # TARS: the shard's read URL.
    location: str
    row_group: int | None = None  # FILES only
    shard_uri: str | None = (
        None  # TARS only: the shard as the user addressed it (prefix of its members' uris)
    )
    count: int | None = None  # FILES: how many inputs; TARS: None (known once the shard is read)

    @property
    def unit_id(self) -> str:
        return unit_id(self.ordinal)


UNIT_SCHEMA = pa.schema(
    [
        ("ordinal", pa.int64()),
        ("kind", pa.string()),
        ("location", pa.string()),
        ("row_group", pa.int64()),
        ("shard_uri", pa.string()),
        ("count", pa.int64()),
    ]
)


def units_table(units: list[Unit]) -> pa.Table:
    rows = [{**dataclasses.asdict(u), "kind": u.kind.value} for u in units]
    return pa.Table.from_pylist(rows, schema=UNIT_SCHEMA)


def units_from_table(table: pa.Table) -> list[Unit]:
    return [Unit(**{**row, "kind": Kind(row["kind"])}) for row in table.select(UNIT_SCHEMA.names).to_pylist()]


# --- from plan parts to units (a Ray Data task), and a files unit's list (in the actor) ------------------------------


def expand_parts(
    parts: pa.Table, *, plan_url: str, unit_size: int, plan_options: dict | None = None
) -> pa.Table:
    """Rows of `pipeline.segment.plan.pending_parts` → the units still to do, as `UNIT_SCHEMA` rows (Ray Data's
    `map_batches`). A files part's units are known from its counts; a tars part is read (one row per shard)."""
    units: list[Unit] = []
    for item in parts.to_pylist():
        kind, first, n = Kind(item["kind"]), item["first_unit"], item["units"]
        done = np.unpackbits(np.frombuffer(item["done"], dtype=np.uint8), count=n).astype(bool)
        location = f"{plan_url}/{item['name']}"
        if kind is Kind.FILES:
            units += [
                Unit(
                    first + k,
                    kind,
                    location,
                    row_group=k,
                    count=min(unit_size, item["inputs"] - k * unit_size),
                )
                for k in range(n)
                if not done[k]
            ]
            continue
        fs, path = fsspec.core.url_to_fs(location, **(plan_options or {}))
        table = pq.read_table(io.BytesIO(retry.call(fs.cat_file, path)))
        shards = zip(table.column("read_url").to_pylist(), table.column("image_uri").to_pylist())
        units += [
            Unit(first + k, kind, url, shard_uri=uri) for k, (url, uri) in enumerate(shards) if not done[k]
        ]
    return units_table(units)


def read_unit_list(unit: Unit, *, plan_options: dict | None = None) -> list[tuple[str, str]]:
    """A files unit's `(read_url, image_uri)` pairs: row group `unit.row_group` of its plan part (one ranged read)."""
    fs, path = fsspec.core.url_to_fs(unit.location, **(plan_options or {}))

    def read() -> pa.Table:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).read_row_group(unit.row_group)

    table = retry.call(read)
    return list(zip(table.column("read_url").to_pylist(), table.column("image_uri").to_pylist()))


# --- a unit's counts (actor → driver, and its completion record) ----------------------------------------------------


@dataclasses.dataclass
class UnitStats:
    """What a unit's completion record says: counts only (the driver never sees rows)."""

    unit_id: str
    images: int
    ok: int
    errors: int
    detections: int
    labels: dict[str, int]
    error_reasons: dict[str, int]


STATS_SCHEMA = pa.schema(
    [
        ("unit_id", pa.string()),
        ("images", pa.int64()),
        ("ok", pa.int64()),
        ("errors", pa.int64()),
        ("detections", pa.int64()),
        ("labels", pa.string()),  # JSON object: label name -> count
        ("error_reasons", pa.string()),  # JSON object: reason kind -> count
    ]
)


def stats_table(stats: list[UnitStats]) -> pa.Table:
    """Units' stats as the Arrow rows the actors hand to Ray Data (one row per unit)."""
    rows = [
        {
            **dataclasses.asdict(s),
            "labels": json.dumps(s.labels),
            "error_reasons": json.dumps(s.error_reasons),
        }
        for s in stats
    ]
    return pa.Table.from_pylist(rows, schema=STATS_SCHEMA)


def stats_from_row(row: dict) -> UnitStats:
    return UnitStats(
        **{**row, "labels": json.loads(row["labels"]), "error_reasons": json.loads(row["error_reasons"])}
    )
