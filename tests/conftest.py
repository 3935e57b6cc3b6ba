"""Shared fixtures: a real local Ray, a real S3 API (moto's server on 127.0.0.1), small generated images."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.support.s3 import moto_in_thread, s3_filesystem  # noqa: E402  (after ROOT is on sys.path)

# Dummy credentials for the moto server, set before any Ray worker starts so that workers inherit them
# (workers take the environment of the Ray instance, not of later changes in this process).
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
for _var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
    os.environ.pop(_var, None)

# A tiny-but-real model: torchvision's Mask R-CNN R50-FPN with random weights, resized to a small short side.
TINY_MODEL = {
    "weights": "none",
    "min_size": 128,
    "max_size": 192,
    "score_threshold": 0.05,
    "max_detections": 10,
}


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session: 2 CPUs like the CI machine."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def moto_server():
    """moto's S3 server on loopback (how s3fs tests itself). Yields the endpoint URL."""
    with moto_in_thread() as endpoint:
        yield endpoint


@pytest.fixture
def s3(moto_server):
    """A fresh bucket on the moto server; yields (s3fs filesystem, bucket name, endpoint)."""
    import uuid

    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3_filesystem(moto_server)
    bucket = f"test-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    yield fs, bucket, moto_server
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small generated shapes dataset on disk (12 val images) shared by tests that only read it."""
    from pipeline.demo.shapes import make_shapes

    root = tmp_path_factory.mktemp("shapes")
    make_shapes(str(root), train=0, val=12, seed=1, size=(96, 128))
    return root


def plan_units(refs, *, plan_url: str, unit_size: int, storage_options: dict | None = None):
    """Plan `refs` (InputRefs) under `plan_url` as the job does; returns the plan's units (all pending)."""
    import pyarrow as pa

    from pipeline.segment.plan import pending_parts, plan_inputs, write_index
    from pipeline.segment.units import expand_parts, units_from_table

    opts = storage_options
    parts = plan_inputs(refs, plan_url=plan_url, unit_size=unit_size, storage_options=opts)
    plan = write_index(plan_url, parts, unit_size=unit_size, skipped={}, storage_options=opts)
    items = pa.Table.from_pylist(pending_parts(plan, np.zeros(plan.units, dtype=bool)))
    return units_from_table(expand_parts(items, plan_url=plan.url, unit_size=unit_size, plan_options=opts))


@pytest.fixture(scope="session")
def coco_hub(tmp_path_factory):
    """A private torch hub cache holding COCO weights of the right shapes for every architecture that has them
    (tests/support/hub.py); tests point TORCH_HOME at it with monkeypatch. Never the user's own cache."""
    import shutil

    from model.architectures import WITH_COCO_WEIGHTS
    from tests.support.hub import plant_coco_weights

    home = tmp_path_factory.mktemp("torch-home")
    yield plant_coco_weights(str(home), WITH_COCO_WEIGHTS)
    shutil.rmtree(home, ignore_errors=True)  # ~350 MB: not kept with pytest's last few temporary folders
