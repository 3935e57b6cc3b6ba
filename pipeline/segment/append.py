"""Appending to an output (`output.mode: append`): the inputs `--input` holds now, less those already in the
output's plan, planned as a new generation of work units.

    the new listing (Ray tasks per manifest part, or the driver's listing in chunks) ──scatter──┐
    the stored plan's parts (read_url column only, one Ray task per group of parts) ──scatter───┤ by hash(read_url)
                                                                                                ▼
    one Ray task per partition: the new names not among the old ones ──▶ _plan/g<generation>/ parts
    driver: plan.append_generation publishes the index (new units numbered after every existing one)

The diff runs where the data is: names travel between Ray tasks through the object store, partitioned by a hash of
the read URL, and the driver holds object references and counts, never the names. An input is "done" when the plan
holds its read URL (its unit committed, or pending and run by this or the next run): a `.tar` shard is done or new
as a whole. Inputs in the plan and gone from the new listing keep their rows (nothing is removed), and an object
replaced under the same key is not run again (its `images.source_version` records what was read; to redo such
inputs, segment a manifest of them into a new output).

Crash safety: nothing refers to a generation's parts until the index naming them is published, which is the last
step; an append stopped before it leaves parts the next append removes (`plan.clear_generation`) and plans again,
and one stopped after it resumes the published units like any other run (`resume` or `append`).
"""

from __future__ import annotations

import time
import zlib
from collections import Counter
from collections.abc import Callable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import retry
from pipeline.errors import JobError, describe_storage_error, one_line, root_cause
from pipeline.segment import plan as plan_mod
from pipeline.segment import sources
from pipeline.segment.plan import Plan, PlanPart, PlanWriter
from pipeline.segment.sources import Found, InputRef
from pipeline.segment.units import Kind

# Names of the stored plan per diff partition: a partition's task holds its old and new names (Arrow strings,
# ~100 bytes each), so 2^20 keeps it near 100 MB however large the output grows.
PARTITION_INPUTS = 1 << 20
MAX_PARTITIONS = 1024
PARTS_PER_TASK = 16  # stored plan parts read by one scatter task
CHUNK = 65_536  # inputs the driver lists before handing them to a scatter task
# A plain re-run of a finished output lists a folder or glob on the driver to say whether it grew, up to this many
# inputs (about a hundred listings of an object store); beyond it, or for manifests, it says it did not look.
HINT_BOUND = 100_000

NEW_SCHEMA = pa.schema([("kind", pa.string()), ("read_url", pa.string()), ("image_uri", pa.string())])
OLD_SCHEMA = pa.schema([("read_url", pa.string())])


def partitions_for(old_inputs: int) -> int:
    return max(1, min(MAX_PARTITIONS, -(-old_inputs // PARTITION_INPUTS)))


def append(
    plan: Plan,
    *,
    input_url: str,
    input_options: dict | None,
    plan_options: dict | None,
    read_cpus: float,
    before_publish: Callable[[], None],
    log: Callable[[str], None],
) -> Plan:
    """`plan` with the inputs at `input_url` that it lacks added as its next generation (published), or `plan` as it
    is when there are none. `before_publish()` runs just before the new index is published (the caller withdraws
    the output's `_SUCCESS.json`). Needs a connected Ray."""
    t0 = time.perf_counter()
    generation = plan.generation + 1
    # Parts staged by an append that stopped before publishing its index: nobody's.
    plan_mod.clear_generation(plan.url, generation, storage_options=plan_options)
    found = sources.find_source(input_url, storage_options=input_options)
    parts, skipped, counts = plan_new_inputs(
        found,
        plan,
        folder=plan_mod.generation_folder(generation),
        input_options=input_options,
        plan_options=plan_options,
        read_cpus=read_cpus,
    )
    for what, n in sorted(skipped.items()):
        log(f"append: skipped {n} {what} at {input_url}")
    seconds = time.perf_counter() - t0
    listed, new = counts["listed"], counts["planned"]
    if not parts:
        log(
            f"nothing new: the {listed} inputs at {input_url} are all in this output's plan "
            f"({plan.inputs} inputs, {plan.units} units; compared in {seconds:.1f} s)"
        )
        return plan
    before_publish()
    appended = plan_mod.append_generation(
        plan, parts, input_url=input_url, listed=listed, storage_options=plan_options
    )
    log(
        f"planned {new} new inputs in {appended.units - plan.units} units (generation {generation}, units "
        f"{plan.units}..{appended.units - 1}; {listed} listed at {input_url}, {counts['already']} already in this "
        f"output's plan; {counts['partitions']} partition(s), {seconds:.1f} s)"
    )
    return appended


def plan_new_inputs(
    found: Found,
    plan: Plan,
    *,
    folder: str,
    input_options: dict | None,
    plan_options: dict | None,
    read_cpus: float,
) -> tuple[list[PlanPart], Counter, dict[str, int]]:
    """Write the parts (under `_plan/<folder>/`) of the inputs of `found` whose read URL `plan` lacks. Returns the
    parts, what the listing skipped, and counts: listed, planned, already (in the plan), duplicates (named twice
    in the listing), partitions."""
    import ray

    n = partitions_for(plan.inputs)
    opts = {"num_cpus": read_cpus, "max_retries": 3, "num_returns": n + 1}  # n partitions and the counts
    old_tasks = [
        ray.remote(_scatter_plan_parts)
        .options(**opts)
        .remote([f"{plan.url}/{p.name}" for p in plan.parts[i : i + PARTS_PER_TASK]], n, plan_options)
        for i in range(0, len(plan.parts), PARTS_PER_TASK)
    ]
    skipped: Counter = Counter()
    if found.in_tasks:
        scatter = ray.remote(_scatter_source_part).options(**opts)
        new_tasks = [scatter.remote(part, n, input_options) for part in found.source.parts(found.target)]
    else:  # listed here, streaming: one chunk of names at a time leaves the driver for a scatter task
        scatter = ray.remote(_scatter_table).options(**opts)
        new_tasks = [scatter.remote(chunk, n) for chunk in _chunks(found, skipped)]
    join = ray.remote(_anti_join).options(num_cpus=read_cpus, max_retries=3)
    joins = [
        join.remote(
            b,
            len(old_tasks),
            *[t[b] for t in old_tasks],
            *[t[b] for t in new_tasks],
            plan_url=plan.url,
            folder=folder,
            unit_size=plan.unit_size,
            plan_options=plan_options,
        )
        for b in range(n)
    ]
    parts: list[PlanPart] = []
    counts: Counter = Counter(partitions=n)
    for ref in [t[n] for t in new_tasks] + joins:
        try:
            got = ray.get(ref)
        except Exception as e:
            cause = root_cause(e)
            if isinstance(cause, JobError):  # the task's own one-line reason, without Ray's traceback
                raise JobError(one_line(cause)) from None
            raise
        if isinstance(got, tuple):  # a partition's parts and counts
            parts += got[0]
            counts.update(got[1])
        else:  # a scatter task's skipped inputs
            skipped.update(got)
    return parts, skipped, dict(counts)


def _chunks(found: Found, skipped: Counter):
    rows: list[InputRef] = []
    for ref in found.source.list_inputs(found.target, skipped=skipped):
        rows.append(ref)
        if len(rows) >= CHUNK:
            yield _new_table(rows)
            rows = []
    if rows:
        yield _new_table(rows)


def _new_table(refs: list[InputRef]) -> pa.Table:
    return pa.table(
        {
            "kind": [r.kind.value for r in refs],
            "read_url": [r.read_url for r in refs],
            "image_uri": [r.image_uri for r in refs],
        },
        schema=NEW_SCHEMA,
    )


def _partition(table: pa.Table, n: int) -> list[pa.Table]:
    """`table` split into `n` by a hash of its read URL that every process computes alike (crc32, not `hash`)."""
    if n == 1:
        return [table]
    keys = table.column("read_url").to_pylist()
    which = np.fromiter((zlib.crc32(k.encode()) % n for k in keys), dtype=np.int64, count=len(keys))
    return [table.filter(pa.array(which == b)) for b in range(n)]


# --- Ray tasks -------------------------------------------------------------------------------------------------------


def _scatter_plan_parts(urls: list[str], n: int, plan_options: dict | None) -> tuple:
    """The read URLs of some stored plan parts (one column read each), partitioned."""
    tables = []
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url, **(plan_options or {}))

        def read(path=path, fs=fs) -> pa.Table:
            with fs.open(path, "rb") as f:
                return pq.read_table(f, columns=["read_url"])

        try:
            tables.append(retry.call(read))
        except Exception as e:  # storage: one line naming the part
            raise JobError(f"output: {describe_storage_error(url, e)}") from None
    table = pa.concat_tables(tables) if tables else OLD_SCHEMA.empty_table()
    return (*_partition(table, n), {})


def _scatter_source_part(part, n: int, input_options: dict | None) -> tuple:
    """One part of the new listing (a manifest file, an S3 Inventory data file), partitioned."""
    skipped: Counter = Counter()
    try:
        table = _new_table(list(part.read(storage_options=input_options, skipped=skipped)))
    except JobError:
        raise
    except Exception as e:
        raise JobError(f"input: {describe_storage_error(part.url, e)}") from None
    return (*_partition(table, n), dict(skipped))


def _scatter_table(table: pa.Table, n: int) -> tuple:
    return (*_partition(table, n), {})


def _anti_join(
    b: int,
    n_old: int,
    *tables: pa.Table,
    plan_url: str,
    folder: str,
    unit_size: int,
    plan_options: dict | None,
) -> tuple[list[PlanPart], dict[str, int]]:
    """Partition `b`: the new rows (in listing order) whose read URL is neither among the old ones nor earlier in the
    listing, written as plan parts under `folder`."""
    old = pa.concat_tables([t.select(["read_url"]) for t in tables[:n_old]] or [OLD_SCHEMA.empty_table()])
    new = pa.concat_tables(list(tables[n_old:]) or [NEW_SCHEMA.empty_table()])
    keys = new.column("read_url").combine_chunks()
    first = np.zeros(len(keys), dtype=bool)
    if len(keys):
        index = pc.index_in(keys, value_set=pc.unique(keys)).to_numpy(zero_copy_only=False)
        first[np.unique(index, return_index=True)[1]] = True
    known = pc.is_in(keys, value_set=old.column("read_url").combine_chunks()).to_numpy(zero_copy_only=False)
    keep = first & ~known
    writer = PlanWriter(plan_url, unit_size=unit_size, source=b, storage_options=plan_options, folder=folder)
    kept = new.filter(pa.array(keep))
    for kind, url, uri in zip(*(kept.column(c).to_pylist() for c in NEW_SCHEMA.names)):
        writer.add(InputRef(Kind(kind), url, uri))
    counts = {
        "listed": len(keys),
        "planned": int(keep.sum()),
        "already": int((first & known).sum()),
        "duplicates": int((~first).sum()),
    }
    return writer.close(), counts


# --- a plain re-run of a finished output: did the input grow? ---------------------------------------------------------


def growth_hint(
    input_url: str,
    plan: Plan,
    *,
    input_options: dict | None,
    plan_options: dict | None,
    bound: int = HINT_BOUND,
) -> str:
    """One line for a re-run that found nothing to do: how many inputs at `input_url` the plan lacks (a folder or
    glob listed here, when it and the plan hold at most `bound` inputs) and how to add them, or that it did not look
    and how to add new inputs."""
    how = "--set output.mode=append"
    try:
        found = sources.find_source(input_url, storage_options=input_options)
        new = None if found.in_tasks or plan.inputs > bound else _count_new(found, plan, plan_options, bound)
    except Exception as e:  # the input gone or unreadable: the output is still finished; say so, do not fail
        return f"did not look for new inputs at {input_url} ({one_line(root_cause(e))[:200]}); to add some: {how}"
    if new is None:
        return (
            f"did not look for new inputs at {input_url} (a manifest, or over {bound} inputs, is not read again on "
            f"a re-run); to add the inputs it lacks: the same command with {how}"
        )
    if new:
        return (
            f"{new} new inputs at {input_url} are not in this output's plan and were not processed: add them with "
            f"the same command and {how}"
        )
    return f"nothing new at {input_url}: all its inputs are in this output's plan"


def _count_new(found: Found, plan: Plan, plan_options: dict | None, bound: int) -> int | None:
    listed: set[str] = set()
    for ref in found.source.list_inputs(found.target, skipped=Counter()):
        listed.add(ref.read_url)
        if len(listed) > bound:
            return None
    for part in plan.parts:
        fs, path = fsspec.core.url_to_fs(f"{plan.url}/{part.name}", **(plan_options or {}))
        with fs.open(path, "rb") as f:
            listed.difference_update(pq.read_table(f, columns=["read_url"]).column("read_url").to_pylist())
    return len(listed)
