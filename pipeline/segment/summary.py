"""The run's summary: counts over every unit of the plan (this run's and earlier runs'), and its lines."""

from __future__ import annotations

import dataclasses
from collections import Counter

from pipeline.segment.resources import Resources
from pipeline.segment.units import UnitStats


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
    units_with_device_failures: int = 0  # units with a `_faults/` record: run again after a device failure
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
        if self.units_with_device_failures:
            out.append(
                f"device failures: {self.units_with_device_failures} unit(s) were run again after the device failed "
                "(nothing of a failed attempt was kept; counts in _faults/)"
            )
        out.append(f"model: {self.model_id}   run: {self.run_id}")
        out.append(f"results: {self.output_url}/images/ and {self.output_url}/detections/ (Parquet)")
        return out
