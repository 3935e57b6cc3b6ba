"""deploy/runtime_env.yaml's `working_dir` upload, packaged by Ray's own function (what `ray job submit` calls):
only the code goes, under 5 MB, with or without the help of .gitignore."""

from __future__ import annotations

import shlex
import zipfile
from pathlib import Path

from ray._private.runtime_env.packaging import create_package

from tests.deploy.files import ROOT, load_yaml, readme_segment_command

LIMIT = 5 * 1024 * 1024
NEEDED = [
    "jobs/segment_archive.py",
    "jobs/train.py",
    "pipeline/segment/run.py",
    "pipeline/demo/__init__.py",  # a package named like the demo's output folder, which is excluded
    "model/__init__.py",
    "configs/segment_archive.yaml",
    "configs/train.yaml",
]


def package(root: Path, out: Path) -> list[str]:
    """Zip `root` as `ray job submit --runtime-env deploy/runtime_env.yaml` does, ignoring .gitignore (the
    excludes must hold alone); the names in the zip. `out` must not exist (Ray reuses an existing package)."""
    env = load_yaml("runtime_env.yaml")
    assert env["working_dir"] == "."
    create_package(str(root), out, include_gitignore=False, excludes=env["excludes"])
    with zipfile.ZipFile(out) as z:
        return z.namelist()


def test_the_repository_uploads_only_its_code(tmp_path):
    names = package(ROOT, tmp_path / "pkg.zip")
    size = (tmp_path / "pkg.zip").stat().st_size
    assert size < LIMIT, f"{size / 2**20:.1f} MiB"
    assert set(NEEDED) <= set(names)
    tops = {n.split("/")[0] for n in names}
    assert not tops & {".git", ".venv", "demo", "tests", "bench", "docs", "archive_segmenter.egg-info"}, tops
    assert not [n for n in names if "__pycache__" in n]


def test_outputs_and_environments_beside_the_code_stay_behind(tmp_path):
    # A user's checkout after the demo and a local run: gigabytes that must never be uploaded.
    tree = tmp_path / "repo"
    for rel in NEEDED:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("# code\n")
    planted = [
        ".venv/lib/python3.11/site-packages/torch/lib/libtorch_cuda.so",
        ".git/objects/pack/pack-1.pack",
        "demo/runs/demo/checkpoint_000003/model.pt",
        "demo/shapes/train/000001.jpg",
        "segments/detections/part-00000000.parquet",
        "pipeline/__pycache__/run.cpython-311.pyc",
        "manifest.parquet",
        "best.pth",
    ]
    for rel in planted:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(b"\0" * 1024)
    names = package(tree, tmp_path / "pkg.zip")
    assert not [n for n in names if not n.endswith("/") and n not in NEEDED]
    assert set(NEEDED) <= set(names)


def test_the_docs_submit_the_readme_command_with_this_runtime_env():
    lines = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8").splitlines()
    submits = [i for i, line in enumerate(lines) if line.startswith("ray job submit")]
    assert len(submits) == 2  # the segment job and training
    assert shlex.split(lines[submits[0] + 1]) == readme_segment_command()
    assert shlex.split(lines[submits[1] + 1])[:2] == ["python", "jobs/train.py"]
    assert all(lines[i].rstrip().endswith("--runtime-env deploy/runtime_env.yaml -- \\") for i in submits)
    assert any(line.startswith("export RAY_AUTH_MODE=token") for line in lines[: submits[0]])
