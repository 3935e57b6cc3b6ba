"""By default a job's terminal shows its own lines only; Ray's messages go to a log file whose path it prints, and
`--verbose` shows them as before. Run as a user runs the jobs: subprocesses on an embedded local Ray."""

import os
import re
import subprocess
import sys

from pipeline.demo.shapes import make_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What Ray 2.60 prints on a segment or training run when nothing stops it (C++ core worker, its Python loggers,
# forwarded worker and Ray Train controller output, ANSI colours).
RAY_PATTERNS = [
    "core_worker.cc",
    "Token authentication is enabled",
    "Progress bars disabled",
    "(MapWorker",
    "(RayTrainWorker",
    "(TrainController",
    "PlacementGroupCleaner",
    "\x1b[",
]
NOTICE = re.compile(r"^Ray's own messages: (\S+) ", re.M)


def run(script, *args, env=None):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_ADDRESS": "", **(env or {})},
    )


def ray_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(p in line for p in RAY_PATTERNS)]


def test_segment_job_prints_only_its_own_lines_and_verbose_shows_ray(tmp_path):
    make_shapes(str(tmp_path / "shapes"), train=0, val=2, seed=3, size=(64, 96))
    common = ["--input", str(tmp_path / "shapes" / "val"), "--set", "model.weights=none"]
    common += ["--set", "model.min_size=64", "--set", "model.max_size=96"]
    r = run("segment_archive.py", *common, "--output", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert ray_lines(r.stdout + r.stderr) == []
    assert r.stderr == ""  # progress is plain lines on stdout when not on a terminal
    assert "images: 2 (2 ok, 0 error)" in r.stdout
    log = NOTICE.search(r.stdout)
    assert log, r.stdout
    # Nothing is lost: what Ray printed is in the file the job named.
    assert ray_lines(open(log.group(1)).read())
    os.remove(log.group(1))

    v = run("segment_archive.py", *common, "--output", str(tmp_path / "out2"), "--verbose")
    assert v.returncode == 0, v.stderr[-2000:]
    assert ray_lines(v.stdout + v.stderr) and not NOTICE.search(v.stdout)


def test_training_prints_each_worker_line_once_without_ray_chatter(tmp_path):
    make_shapes(str(tmp_path / "shapes"), train=4, val=2, seed=4, size=(64, 96))
    s = str(tmp_path / "shapes")
    sets = {
        "data.train.annotations": f"{s}/annotations/instances_train.json",
        "data.train.images": f"{s}/train",
        "data.val.annotations": f"{s}/annotations/instances_val.json",
        "data.val.images": f"{s}/val",
        "data.loader_workers": 0,
        "model.weights": "none",
        "model.architecture": "maskrcnn_resnet18_fpn",
        "model.min_size": "[64]",
        "model.max_size": 96,
        "model.fpn_channels": 32,
        "model.box_head_size": 64,
        "train.epochs": 1,
        "train.batch_size": 2,
        "train.log_interval": 1,
        "scaling.num_workers": 1,
        "run.name": "quiet",
        "run.storage_path": str(tmp_path / "runs"),
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    r = run("train.py", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ray_lines(r.stdout + r.stderr) == [], ray_lines(r.stdout + r.stderr)
    lines = r.stdout.splitlines()
    assert sum(line.startswith("epoch 0 iter 1/2 ") for line in lines) == 1
    assert sum(line.startswith("epoch 0: bbox_AP=") for line in lines) == 1
    assert lines.count("IoU metric: segm") == 1
    assert lines[-1].startswith("best checkpoint URL: ")
    os.remove(NOTICE.search(r.stdout).group(1))
