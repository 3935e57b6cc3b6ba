"""The command-line contract, run as a user runs it: a subprocess, its exit status and what it prints."""

import os
import subprocess
import sys

import pyarrow.dataset as pads

from tests.conftest import free_port

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
        "config error: unknown key 'model.wieghts'; allowed keys under 'model': weights, min_size, max_size, "
        "score_threshold, max_detections, batch_size, device, storage"
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


def test_demo_runs_offline_and_says_random_weights(tmp_path):
    r = job("--demo", cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RANDOM weights" in r.stdout and "images: 12 (12 ok, 0 error)" in r.stdout
    images = pads.dataset(str(tmp_path / "demo" / "results" / "images"), format="parquet").to_table()
    assert images.num_rows == 12 and set(images.column("status").to_pylist()) == {"ok"}
