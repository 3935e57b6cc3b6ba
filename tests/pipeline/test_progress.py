"""Progress: a tqdm bar when live, periodic plain lines otherwise; the training display built on it."""

import io
import sys

from pipeline.progress import Progress
from pipeline.train.events import TrainDisplay


def test_plain_progress_prints_a_line_per_interval_only():
    lines: list[str] = []
    p = Progress("segment", 10, live=False, log=lines.append, interval_s=0.0)
    p.update(3, status="ignored when plain", line=lambda: "progress: 3/10")
    assert lines == ["progress: 3/10"]
    slow = Progress("segment", 10, live=False, log=lines.append, interval_s=3600)
    slow.update(5, line=lambda: "never")  # within the interval: nothing
    slow.write("kept")
    assert lines == ["progress: 3/10", "kept"]


def test_live_progress_draws_a_bar_with_count_and_status(monkeypatch):
    err, out = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    with Progress("segment", 8, unit="img", live=True, log=print) as p:
        p.update(4, status="units 1/2, 0 error")
        p.write("a line that stays")
        p.update(4, status="units 2/2, 0 error")
    drawn = err.getvalue()
    assert "segment" in drawn and "8/8" in drawn and "units 2/2, 0 error" in drawn
    assert "a line that stays" in out.getvalue()  # the job's lines stay on stdout


def step(epoch, it, text=None):
    return {
        "kind": "step", "epoch": epoch, "epochs": 2, "it": it, "iters": 4, "loss": 1.5, "lr": 0.01, "rate": 3.0,
        "text": text,
    }  # fmt: skip


def test_train_display_plain_shows_interval_lines_tables_and_notices_once():
    lines: list[str] = []
    d = TrainDisplay(log=lines.append, live=False, tables=True)
    d.handle({"kind": "line", "text": "resuming from x at epoch 1", "transient": False})
    d.handle(step(1, 1))  # between log_interval lines: nothing in plain mode
    d.handle(step(1, 2, text="epoch 1 iter 2/4 loss=1.5"))
    d.handle({"kind": "line", "text": "epoch 1: evaluating on 4 val images ...", "transient": True})
    d.handle({"kind": "table", "text": "IoU metric: segm\n AP = 0.1"})
    d.handle({"kind": "line", "text": "epoch 1: bbox_AP=0.100 segm_AP=0.100", "transient": False})
    d.close()
    assert lines == [
        "resuming from x at epoch 1",
        "epoch 1 iter 2/4 loss=1.5",
        "epoch 1: evaluating on 4 val images ...",
        "IoU metric: segm\n AP = 0.1",
        "epoch 1: bbox_AP=0.100 segm_AP=0.100",
    ]
    quiet: list[str] = []
    d = TrainDisplay(log=quiet.append, live=False, tables=False)
    d.handle({"kind": "table", "text": "IoU metric: segm"})
    assert quiet == []


def test_train_display_live_bar_per_epoch(monkeypatch):
    err, out = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    d = TrainDisplay(log=print, live=True)
    for it in (1, 2, 4):
        d.handle(step(0, it, text="epoch 0 iter 2/4 loss=1.5" if it == 2 else None))
    d.handle({"kind": "line", "text": "epoch 0: bbox_AP=0.100 segm_AP=0.100", "transient": False})
    d.handle(step(1, 4))
    d.close()
    drawn = err.getvalue()
    assert "epoch 1/2" in drawn and "epoch 2/2" in drawn and "4/4" in drawn and "loss 1.500" in drawn
    assert "epoch 0: bbox_AP=0.100 segm_AP=0.100" in out.getvalue()
    assert "iter 2/4" not in out.getvalue() + drawn  # the bar replaces the interval lines
