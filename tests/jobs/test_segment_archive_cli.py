"""The command-line contract, run as a user runs it: a subprocess, its exit status and what it prints."""

import os
import re
import subprocess
import sys

import pyarrow.dataset as pads

from tests.support.s3 import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "jobs", "segment_archive.py")


def job(*args, cwd=None, timeout=300, env=None):
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_bad_config_fails_fast_naming_key(tmp_path):
    r = job(
        "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--set", "model.wieghts=none", timeout=60
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "config error: unknown key 'model.wieghts'; allowed keys under 'model': weights, architecture, min_size, "
        "max_size, score_threshold, max_detections, batch_size, device, precision, storage"
    ]
    assert not (tmp_path / "o").exists()  # no work started, nothing written
    r = job("--output", str(tmp_path / "o"), "--set", "model.device=gpu", timeout=60)
    assert r.returncode == 2 and "model.device: expected one of 'auto', 'cpu', 'cuda', got 'gpu'" in r.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: [1, 2\n")
    r = job("--config", str(cfg), "--input", "x", "--output", "y", timeout=60)
    assert r.returncode == 2 and "is not valid YAML" in r.stderr


def test_no_inputs_and_unreachable_storage_exit_1_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    tiny = ["--set", "model.weights=none"]
    r = job("--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o"), *tiny)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: no inputs found at {tmp_path / 'empty'}")
    assert "Traceback" not in r.stderr
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    r = job(
        "--input",
        "s3://bucket/archive",
        "--output",
        str(tmp_path / "o2"),
        *tiny,
        "--set",
        f"input.storage.endpoint_url={dead}",
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: input: s3://bucket/archive: storage endpoint unreachable"), last


def test_demo_trains_segments_evaluates_and_renders_offline(tmp_path):
    """The README's first command, shrunk: every step of the demo runs for real (data, Ray Train, segment job with
    the checkpoint, pycocotools AP, overlays); the AP line is the last line."""
    r = job(
        "--demo",
        "--demo-images",
        "12",
        "4",
        "--train-set",
        "train.epochs=1",
        "--train-set",
        "model.min_size=[64]",
        "--train-set",
        "model.max_size=128",
        "--train-set",
        "train.batch_size=2",
        "--train-set",
        "model.fpn_channels=32",
        "--train-set",
        "model.box_head_size=64",
        cwd=tmp_path,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert re.fullmatch(r"bbox_AP=\d\.\d{3} segm_AP=\d\.\d{3}", lines[-1]), lines[-5:]
    assert [line[:5] for line in lines if re.match(r"\[\d/5\] ", line)] == [f"[{i}/5]" for i in range(1, 6)]
    assert re.search(r"^  mask AP \d\.\d{3}   AP50 ", r.stdout, re.M) and "best checkpoint URL: " in r.stdout
    # One screen: the job's own lines, none of Ray's (they are in demo/logs/, named on the way).
    assert len(lines) <= 40, r.stdout
    assert not re.search(
        r"core_worker|Token authentication|RayTrainWorker|PlacementGroupCleaner|\x1b\[", r.stdout + r.stderr
    )
    assert re.search(r"^Ray's own messages: \S*demo/logs/demo-\S+\.log ", r.stdout, re.M)
    assert "run report (open it in a browser): demo/report/index.html" in r.stdout
    page = (tmp_path / "demo" / "report" / "index.html").read_text()
    assert "Segmentation run report" in page
    images = pads.dataset(str(tmp_path / "demo" / "results" / "images"), format="parquet").to_table()
    assert images.num_rows == 4 and set(images.column("status").to_pylist()) == {"ok"}
    assert set(images.column("model_id").to_pylist()) != {None} and images.column("model_id")[
        0
    ].as_py().startswith("checkpoint:")
    # Pictures of the images whose best detection reaches 0.5 (one epoch on 12 images may reach none).
    pictures = sorted((tmp_path / "demo" / "renders").glob("*.png"))
    assert len(pictures) <= 4 and f"  {len(pictures)} overlay pictures" in r.stdout
    from PIL import Image

    sizes = {(int(x["height"]), int(x["width"])) for x in images.to_pylist()}
    assert all(Image.open(p).size[::-1] in sizes for p in pictures)
