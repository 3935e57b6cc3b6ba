"""Progress from inside a unit: the running counts' bookkeeping, and the job's lines moving before a unit commits."""

import numpy as np

from pipeline.segment.config import segment_config
from pipeline.segment.live import ProgressBoard, UnitReporter, in_flight
from pipeline.segment.run import segment
from tests.conftest import TINY_MODEL


def test_a_unit_run_again_replaces_its_counts_and_committed_units_are_not_counted():
    board = ProgressBoard()
    board.report(0, "a1", 5, 1, 40)
    board.report(1, "b1", 3, 0, 10)
    board.report(0, "a2", 1, 0, 2)  # unit 0 failed and runs again: its count starts over
    seen = np.array([False, True])  # unit 1 has committed: its own stats count, not the board's
    assert in_flight(board.snapshot(), seen) == (1, 0, 2)
    board.finish(0)
    assert in_flight(board.snapshot(), seen) == (0, 0, 0)


def test_a_reporter_without_a_board_sends_nothing_and_a_throttled_one_sends_at_most_every_interval():
    UnitReporter(None, 3).update(1, 0, 0)  # no Ray: no error

    class Board:
        def __init__(self):
            self.sent = []
            self.report = self

        def remote(self, *args):
            self.sent.append(args)

    board = Board()
    reporter = UnitReporter(board, 7, interval_s=60)
    for i in range(100):
        reporter.update(i, 0, 0)
    assert len(board.sent) == 1 and board.sent[0][0] == 7


def test_progress_lines_move_per_image_inside_one_unit(ray_local, shapes_dir, tmp_path):
    cfg = segment_config(
        {
            "input": {"url": str(shapes_dir / "val"), "unit_size": 100},  # all 12 images in one unit
            "output": {"url": str(tmp_path / "out")},
            "model": {**TINY_MODEL, "batch_size": 1},
            "progress_interval_s": 0.2,
        }
    )
    lines: list[str] = []
    summary = segment(cfg, log=lines.append)
    assert summary.complete and summary.images == 12
    inside = [line for line in lines if line.startswith("progress: 0/1 units") and " 0 images" not in line]
    assert inside, "no progress line counted an image before the unit committed"
    counts = [
        int(line.split(" units, ")[1].split(" images")[0]) for line in lines if line.startswith("progress:")
    ]
    # Running counts never exceed what the unit holds; plain lines are throttled, so the last one may come before
    # the end: the summary's totals (above) are what committed.
    assert max(counts) <= 12
