"""The segment job's model choice: `weights: DEFAULT` loads torchvision's COCO weights of each architecture from the
torch hub cache exactly as after a download (state dicts of the right shapes planted there: tests/support/hub.py),
on the driver (`_fetch_default_weights`) and in the actor (`SegmentWorker`, called without Ray), and writes COCO
class names under a model id that names the architecture. Outputs made before model.architecture keep their
fingerprints, so they resume."""

import dataclasses

import pyarrow.parquet as pq
import pytest
import torch

from model.architectures import WITH_COCO_WEIGHTS, architecture_of_model_id
from model.build import build_maskrcnn, resolve_spec
from model.checkpoint import ARCH_SCHEMA, save_checkpoint
from model.labels import COCO_CATEGORIES
from pipeline.config import ConfigError
from pipeline.errors import JobError
from pipeline.segment import run
from pipeline.segment.config import segment_config
from pipeline.segment.settings import WorkerSettings
from pipeline.segment.worker import SegmentWorker
from tests.conftest import TINY_MODEL
from tests.pipeline.segment.test_worker import units_for
from tests.support.hub import PROBE


def test_fingerprints_of_outputs_made_before_model_architecture_are_unchanged():
    """Pinned before the change: a different value means every existing output of the v1 model stops resuming.
    Since appends, the fingerprint leaves out the input and the unit size; outputs written before are matched by
    `_fingerprint_v1` with the input URL and unit size their own `_config.json` recorded."""
    cfg = segment_config({"input": {"url": "s3://another/"}, "output": {"url": "s3://bucket/out/"}})
    written = {"input": {"url": "s3://bucket/archive/", "unit_size": 2048}}
    assert run._fingerprint_v1(cfg, resolve_spec("DEFAULT"), written) == "667ce46174a2c1b0"
    assert run._fingerprint_v1(cfg, resolve_spec("none"), written) == "bae9ee5a377f7c70"


@pytest.mark.parametrize("architecture", WITH_COCO_WEIGHTS)
def test_default_weights_from_the_hub_cache_segment_with_coco_names(
    coco_hub, monkeypatch, tmp_path, shapes_dir, architecture
):
    monkeypatch.setenv("TORCH_HOME", coco_hub.torch_home)
    spec = resolve_spec(
        "DEFAULT", architecture=architecture, min_size=TINY_MODEL["min_size"], max_size=TINY_MODEL["max_size"]
    )
    assert architecture_of_model_id(spec.model_id) == architecture
    run._fetch_default_weights(spec)  # the driver's check: found in the cache, nothing downloaded
    # Fewer proposals than DEFAULT's 1,000: v2's conv box head costs ~0.1 GFLOP per proposal on this CPU.
    spec = dataclasses.replace(spec, rpn_proposals=50)
    out = tmp_path / "out"
    worker = SegmentWorker(
        WorkerSettings(
            spec=spec, score_threshold=0.0, output_url=str(out), max_detections=5, threads=2, run_id="r1"
        )
    )
    assert torch.equal(worker.segmenter.model.state_dict()[PROBE], coco_hub.probes[architecture])
    files = sorted((shapes_dir / "val").glob("*.jpg"))[:2]
    stats = [worker.process(u) for u in units_for(tmp_path, {f.name: f.read_bytes() for f in files})]
    assert sum(s.ok for s in stats) == 2
    dets = pq.read_table(out / "detections").to_pylist()
    assert dets and {d["model_id"] for d in dets} == {spec.model_id}
    assert {d["label_name"] for d in dets} <= set(COCO_CATEGORIES[1:])


def test_model_architecture_picks_the_default_weights_and_must_match_a_checkpoint(
    coco_hub, monkeypatch, tmp_path
):
    monkeypatch.setenv("TORCH_HOME", coco_hub.torch_home)
    job = {"input": {"url": "in/"}, "output": {"url": "out/"}}
    spec = run._resolve_model(segment_config({**job, "model": {"architecture": "maskrcnn_resnet50_fpn_v2"}}))
    assert spec.model_id == "torchvision:MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1"
    with pytest.raises(
        ConfigError, match="model.architecture: model.weights DEFAULT .* not maskrcnn_resnet18_fpn"
    ):
        segment_config({**job, "model": {"architecture": "maskrcnn_resnet18_fpn"}})
    model = build_maskrcnn(architecture="maskrcnn_resnet18_fpn", num_classes=3, min_size=64, max_size=96)
    path = str(tmp_path / "r18.pt")
    arch = {"name": "maskrcnn_resnet18_fpn", "schema": ARCH_SCHEMA, "num_classes": 3}
    save_checkpoint(path, model_state=model.state_dict(), arch=arch, class_names=["__background__", "a", "b"])
    assert (
        run._resolve_model(segment_config({**job, "model": {"weights": path}})).architecture == arch["name"]
    )
    with pytest.raises(
        JobError,
        match="model.weights: checkpoint .* is a maskrcnn_resnet18_fpn, not the maskrcnn_resnet50_fpn_v2",
    ):
        run._resolve_model(
            segment_config({**job, "model": {"weights": path, "architecture": "maskrcnn_resnet50_fpn_v2"}})
        )


def test_the_job_resolves_default_v1_weights_from_the_hub_cache(coco_hub, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", coco_hub.torch_home)
    cfg = segment_config({"input": {"url": "in/"}, "output": {"url": "out/"}})  # model.weights: DEFAULT
    spec = run._resolve_model(cfg)
    assert spec.model_id == "torchvision:MaskRCNN_ResNet50_FPN_Weights.COCO_V1"
    assert spec.architecture == "maskrcnn_resnet50_fpn" and spec.class_names == tuple(COCO_CATEGORIES)
