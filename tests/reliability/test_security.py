"""Security of the segment job: credentials never leave the config, a checkpoint that runs code is refused without
running it, and no input name makes the job write outside `--output`.

Redaction of `_config.json` is unit-tested in tests/pipeline/test_config.py and checked on S3 in
tests/pipeline/test_run_s3.py; here the whole job runs as a user runs it, and every byte it leaves behind is searched.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import torch

from model.checkpoint import FORMAT, CheckpointError, load_checkpoint
from pipeline.errors import JobError
from pipeline.segment.config import segment_config
from pipeline.segment.run import segment
from tests.conftest import TINY_MODEL
from tests.support.images import jpeg_bytes

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "jobs" / "segment_archive.py"


# --- credentials ------------------------------------------------------------------------------------------------------


def run_job(args: list[str], ray_tmp: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray, logs in ray_tmp
    env["RAY_TMPDIR"] = ray_tmp
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, cwd=ROOT, env=env, timeout=400
    )


def tiny_sets() -> list[str]:
    return [arg for k, v in TINY_MODEL.items() for arg in ("--set", f"model.{k}={v}")]


def storage_sets(section: str, endpoint: str, key: str, secret: str) -> list[str]:
    sets = [f"endpoint_url={endpoint}", f"key={key}", f"secret={secret}", f"session_token={secret}-token"]
    return [arg for s in sets for arg in ("--set", f"{section}.storage.{s}")]


def files_holding(secrets: list[bytes], roots: list[Path]) -> list[str]:
    hits = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath) / name
                try:
                    data = path.read_bytes()
                except OSError:  # sockets, files gone meanwhile
                    continue
                hits += [f"{path}: {s!r}" for s in secrets if s in data]
    return hits


def test_credentials_in_config_appear_in_no_output_log_or_stream(s3, shapes_dir, tmp_path):
    fs, bucket, endpoint = s3
    key, secret = "AKIDSECURITY" + uuid.uuid4().hex[:8].upper(), f"s3cr3t-{uuid.uuid4().hex}"
    secrets = [key.encode(), secret.encode()]
    for f in sorted((shapes_dir / "val").glob("*.jpg"))[:3]:
        fs.pipe_file(f"{bucket}/archive/{f.name}", f.read_bytes())
    fs.pipe_file(f"{bucket}/archive/broken.jpg", b"\xff\xd8 not really")
    creds = storage_sets("input", endpoint, key, secret) + storage_sets("output", endpoint, key, secret)
    creds += ["--set", f"model.storage.key={key}", "--set", f"model.storage.secret={secret}"]
    ray_tmp = tempfile.mkdtemp(prefix="rs-")  # short: Ray's unix socket paths live below it
    try:
        # 1. A run that completes, reading from and writing to S3 with the keys from the config.
        ok = run_job(
            ["--input", f"s3://{bucket}/archive", "--output", f"s3://{bucket}/results", *tiny_sets(), *creds],
            ray_tmp,
        )
        assert ok.returncode == 0, ok.stderr.decode()[-3000:]
        assert b"images: 4 (3 ok, 1 error)" in ok.stdout
        written = fs.find(f"{bucket}/results")
        assert any("/_plan/" in p for p in written) and any("/_committed/" in p for p in written)
        assert any(p.endswith("_config.json") for p in written)
        leaks = [f"s3://{p}: {s!r}" for p, data in fs.cat(written).items() for s in secrets if s in data]
        # 2. A run that fails (its input bucket does not exist), writing to a local folder.
        failed_out = tmp_path / "failed"
        failed = run_job(
            ["--input", f"s3://no-such-{bucket}/archive", "--output", str(failed_out), *tiny_sets(), *creds],
            ray_tmp,
        )
        last = failed.stderr.decode().strip().splitlines()[-1]
        assert failed.returncode == 1 and last.startswith(f"error: input: s3://no-such-{bucket}/archive"), (
            last
        )
        assert (failed_out / "_config.json").exists()  # it got as far as writing its config
        leaks += files_holding(secrets, [failed_out, Path(ray_tmp)])  # Ray's own logs of both runs included
        for run in (ok, failed):
            leaks += [f"stream: {s!r}" for s in secrets if s in run.stdout or s in run.stderr]
        assert not leaks, leaks
        assert b"***" in (failed_out / "_config.json").read_bytes()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# --- checkpoints that carry code ----------------------------------------------------------------------------------


class CreatesFile:
    """Unpickling this calls open(path, "w"): a real payload whose only effect is a file appearing."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def malicious_checkpoint(path: Path, marker: Path) -> None:
    payload = {
        "format": FORMAT,
        "arch": {"name": "maskrcnn_resnet50_fpn", "num_classes": 2, "min_size": 128, "max_size": 192},
        "class_names": ["__background__", "thing"],
        "model": {},
        "epoch": CreatesFile(marker),
    }
    torch.save(payload, str(path))


def test_checkpoint_with_pickled_code_is_refused_unexecuted(tmp_path):
    # The payload is live: loaded the unsafe way, it creates its file.
    live = tmp_path / "live.pt"
    malicious_checkpoint(live, tmp_path / "ran-unsafe")
    torch.load(str(live), weights_only=False)
    assert (tmp_path / "ran-unsafe").exists()

    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    malicious_checkpoint(evil, marker)
    with pytest.raises(CheckpointError, match="refusing checkpoint .*evil.pt: it holds pickled objects"):
        load_checkpoint(str(evil))
    assert not marker.exists()

    # Through the job: refused on the driver with one line, before any worker could load it.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(jpeg_bytes())
    cfg = segment_config(
        {
            "input": {"url": str(tmp_path / "in")},
            "output": {"url": str(tmp_path / "out")},
            "model": {**TINY_MODEL, "weights": str(evil)},
        }
    )
    with pytest.raises(JobError, match=r"^model.weights: refusing checkpoint") as err:
        segment(cfg, log=lambda _: None)
    assert "\n" not in str(err.value) and not marker.exists()


# --- input names cannot steer writes ------------------------------------------------------------------------------


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, names in os.walk(root):
        if Path(dirpath) == skip.parent:
            dirnames[:] = [d for d in dirnames if Path(dirpath) / d != skip]
        for name in [*names, *dirnames]:
            st = (Path(dirpath) / name).lstat()
            out[str(Path(dirpath) / name)] = (st.st_size, st.st_mtime_ns)
    return out


def test_no_input_name_writes_outside_output(ray_local, tmp_path):
    tag = uuid.uuid4().hex[:8]
    work = tmp_path / "work"
    lists = work / "lists"
    (lists / "sub").mkdir(parents=True)
    (work / "outside").mkdir()
    (work / "outside" / "up.jpg").write_bytes(jpeg_bytes(seed=1))
    (work / "outside" / "abs.jpg").write_bytes(jpeg_bytes(seed=3))
    (lists / "sub" / "x.jpg").write_bytes(jpeg_bytes(seed=2))
    members = [f"../../evil-{tag}.jpg", f"/abs-{tag}.jpg", f"ok/../../../evil2-{tag}.jpg", "a/b.jpg"]
    with tarfile.open(lists / "shard.tar", "w") as tf:
        for i, name in enumerate(members):
            data = jpeg_bytes(seed=10 + i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    lines = [
        "../outside/up.jpg",  # relative, leaving the manifest's folder
        str(work / "outside" / "abs.jpg"),  # absolute
        "./sub/../sub/x.jpg",
        f"../../../../../../../../no-such-{tag}.jpg",  # climbs past / and names nothing
        "shard.tar",  # members named ../../x, /x, a/../../../x
    ]
    manifest = lists / "inputs.txt"
    manifest.write_text("# odd names\n" + "\n".join(lines) + "\n")
    out = work / "results"
    out.mkdir()  # (so that creating it does not count as a change to its parent folder)
    before = snapshot(tmp_path, skip=out)

    cfg = segment_config(
        {
            "input": {"url": str(manifest), "unit_size": 2},
            "output": {"url": str(out)},
            "model": {**TINY_MODEL, "batch_size": 2},
        }
    )
    summary = segment(cfg, log=lambda _: None)

    assert summary.complete
    assert snapshot(tmp_path, skip=out) == before  # nothing new, nothing changed beside the output
    for base in (Path("/"), Path.cwd(), out, out.parent, lists, tmp_path, Path(tempfile.gettempdir())):
        assert not list(base.glob(f"*{tag}*")), base
    rows = pads.dataset(str(out / "images"), format="parquet").to_table().to_pylist()
    uris = sorted(r["image_uri"] for r in rows)
    expected = [
        str(work / "outside" / "up.jpg"),
        str(work / "outside" / "abs.jpg"),
        str(lists / "sub" / "x.jpg"),
        f"/no-such-{tag}.jpg",
        *[f"{lists / 'shard.tar'}#{m}" for m in members],
    ]
    assert uris == sorted(expected)  # every input has its row, once
    status = {r["image_uri"]: (r["status"], r["error"]) for r in rows}
    assert status[f"/no-such-{tag}.jpg"][1].startswith(f"read failed: /no-such-{tag}.jpg: not found")
    assert all(s == "ok" for u, (s, _) in status.items() if "no-such" not in u)
    # The output holds only names the job makes from unit ids, never from input names.
    allowed = ("images/part-", "detections/part-", "_committed/", "_stats/", "_plan/files-", "_plan/tars-")
    for path in out.rglob("*"):
        rel = path.relative_to(out).as_posix()
        names = ("_config.json", "_SUCCESS.json", "_lease.json", "_plan/index.json")
        assert path.is_dir() or rel in names or rel.startswith(allowed), rel
        assert tag not in rel
