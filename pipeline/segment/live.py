"""Live counts: how far each running unit has got, between its start and its commit.

A unit is the unit of commit (2,048 images by default on GPUs: over an hour on one CPU), and the driver hears of
it only when it commits, through Ray Data's data path. For the progress bar and lines to move per image, each actor
also reports its running unit's counts to one small actor, `ProgressBoard`, through `UnitReporter`: at most every
`REPORT_INTERVAL_S` per unit and outside the data path (a fire-and-forget call; a lost report costs nothing).

No double counting: the board keeps, per unit, the latest counts of its latest attempt (a unit that failed and runs
again starts from zero under a new attempt id, replacing the old counts); the driver adds the board's counts only
for units it has not yet seen commit, and a committed unit's own stats replace them. So the totals shown always
reconcile to what committed once the run ends.
"""

from __future__ import annotations

import time
import uuid

REPORT_INTERVAL_S = 0.25


class ProgressBoard:
    """Running units' counts (the driver makes it a Ray actor: `ray.remote(ProgressBoard)`). Methods are called
    remotely: `report` and `finish` by actors, `snapshot` by the driver."""

    def __init__(self) -> None:
        self._units: dict[int, tuple[str, int, int, int]] = {}

    def report(self, ordinal: int, attempt: str, images: int, errors: int, detections: int) -> None:
        self._units[ordinal] = (attempt, images, errors, detections)

    def finish(self, ordinal: int) -> None:
        self._units.pop(ordinal, None)

    def snapshot(self) -> dict[int, tuple[int, int, int]]:
        """`{unit ordinal: (images, errors, detections)}` of the units running now."""
        return {o: counts[1:] for o, counts in self._units.items()}


class UnitReporter:
    """One unit attempt's reports to a board handle (`None`: reports go nowhere, as when the actor runs without
    Ray). `update(images, errors, detections)` after each row; sends at most every `interval_s`."""

    def __init__(self, board, ordinal: int, *, interval_s: float = REPORT_INTERVAL_S):
        self.board, self.ordinal, self.interval_s = board, ordinal, interval_s
        self.attempt = uuid.uuid4().hex[:8]
        self._last = 0.0

    def update(self, images: int, errors: int, detections: int) -> None:
        if self.board is None:
            return
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        self.board.report.remote(self.ordinal, self.attempt, images, errors, detections)

    def finish(self) -> None:
        if self.board is not None:
            self.board.finish.remote(self.ordinal)


def in_flight(snapshot: dict[int, tuple[int, int, int]], seen) -> tuple[int, int, int]:
    """Totals of `snapshot` over the units not yet seen to commit (`seen`: bool array by ordinal)."""
    images = errors = detections = 0
    for ordinal, (i, e, d) in snapshot.items():
        if 0 <= ordinal < len(seen) and not seen[ordinal]:
            images, errors, detections = images + i, errors + e, detections + d
    return images, errors, detections
