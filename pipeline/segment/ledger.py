"""The ledger: what says a unit is done, and what a re-run and a summary read.

    _committed/<unit>.json    a unit's completion record (its `UnitStats`), written by its actor after both data files
    _stats/<run>-<seq>.json   completion records rolled up by the driver: what summaries are made from

A re-run learns what is done from one listing of `_committed/` (names, not contents) and the few `_stats/` files;
it reads a completion record only for units committed after the last roll-up (a driver killed in between).
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
import time
from collections.abc import Iterator

import numpy as np

from pipeline.segment.schema import COMMITTED_DIR, STATS_DIR
from pipeline.segment.storage import Output
from pipeline.segment.units import UnitStats, unit_id


def record_name(unit: str) -> str:
    """The completion record of unit `unit` (its id), relative to the output."""
    return posixpath.join(COMMITTED_DIR, f"{unit}.json")


class StatsLog:
    """The driver's record of units committed in this run, rolled up into `_stats/<run>-<seq>.json` every
    `every_units` units or `every_s` seconds (and by `flush()`), so that a re-run or a summary reads a few files
    instead of one completion record per unit."""

    def __init__(self, output: Output, run_id: str, *, every_units: int = 1024, every_s: float = 60.0):
        self.output, self.run_id = output, run_id
        self.every_units, self.every_s = every_units, every_s
        self._pending: list[UnitStats] = []
        self._seq = 0
        self._last = time.monotonic()

    def record(self, stats: UnitStats) -> None:
        self._pending.append(stats)
        if len(self._pending) >= self.every_units or time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        if not self._pending:
            return
        doc = {"run_id": self.run_id, "units": [dataclasses.asdict(s) for s in self._pending]}
        self.output.write_bytes(
            posixpath.join(STATS_DIR, f"{self.run_id}-{self._seq:05d}.json"), json.dumps(doc).encode("utf-8")
        )
        self._seq += 1
        self._pending = []


def committed_units(output: Output, units: int) -> np.ndarray:
    """Which of the plan's `units` have a completion record: one listing of `_committed/` (names only)."""
    done = np.zeros(units, dtype=bool)
    for name in output.names(COMMITTED_DIR):
        stem, ext = posixpath.splitext(name)
        if ext == ".json" and stem.isdigit() and int(stem) < units:
            done[int(stem)] = True
    return done


def committed_stats(output: Output, done: np.ndarray) -> Iterator[tuple[UnitStats, bool]]:
    """The stats of every done unit, once each: from the `_stats/` roll-ups, then, for units committed after the last
    roll-up, from their completion records. Yields `(stats, from_record)`; `from_record` units are not in any
    roll-up yet (the caller rolls them up, so the next re-run does not read them again)."""
    covered = np.zeros(len(done), dtype=bool)
    rollups = sorted(n for n in output.names(STATS_DIR) if n.endswith(".json") and not n.startswith("."))
    for _, blob in output.read_many([posixpath.join(STATS_DIR, n) for n in rollups]):
        for unit in json.loads(blob)["units"]:
            o = int(unit["unit_id"])
            if o < len(done) and done[o] and not covered[o]:
                covered[o] = True
                yield UnitStats(**unit), False
    missing = np.flatnonzero(done & ~covered)
    records = [record_name(unit_id(int(o))) for o in missing]
    for _, blob in output.read_many(records):
        yield UnitStats(**json.loads(blob)), True
