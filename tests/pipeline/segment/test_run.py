"""The whole Ray Data plan on a real local Ray: inputs in every form, error rows, resume, refusal of a changed run."""

import io
import shutil
import tarfile

import pyarrow.dataset as pads
import pytest

from pipeline.config import ConfigError
from pipeline.errors import JobError
from pipeline.segment.config import ComputeConfig, segment_config
from pipeline.segment.resources import plan_resources
from pipeline.segment.run import segment
from tests.conftest import TINY_MODEL


def run(input_url, output_url, log=None, **over):
    data = {
        "input": {"url": input_url, "unit_size": 4},
        "output": {"url": output_url},
        "model": dict(TINY_MODEL),
    }
    for k, v in over.items():
        data.setdefault(k, {}).update(v) if isinstance(v, dict) else data.__setitem__(k, v)
    lines = []
    summary = segment(segment_config(data), log=log or lines.append)
    return summary, lines


def read(output_url):
    images = pads.dataset(f"{output_url}/images", format="parquet").to_table()
    dets = pads.dataset(f"{output_url}/detections", format="parquet").to_table()
    return images, dets


def test_folder_with_bad_images_every_input_one_row(ray_local, shapes_dir, tmp_path):
    arch = tmp_path / "arch"
    shutil.copytree(shapes_dir / "val", arch / "sub")
    (arch / "zero.jpg").write_bytes(b"")
    (arch / "page.PNG").write_bytes(b"<html>nope</html>")
    (arch / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    summary, _ = run(str(arch), str(out))
    images, dets = read(str(out))
    assert summary.complete and summary.images == 14 == images.num_rows
    assert sorted(images.column("image_uri").to_pylist()) == sorted(
        [str(arch / "zero.jpg"), str(arch / "page.PNG")] + [str(p) for p in (arch / "sub").glob("*.jpg")]
    )
    by_uri = {r["image_uri"]: r for r in images.to_pylist()}
    assert by_uri[str(arch / "zero.jpg")]["error"].startswith("empty file")
    assert by_uri[str(arch / "page.PNG")]["error"].startswith("not an image")
    assert summary.ok == 12 and summary.errors == 2
    assert dets.num_rows == summary.detections == sum(r["num_detections"] for r in images.to_pylist())
    assert (out / "_SUCCESS.json").exists() and (out / "_config.json").exists()
    assert len(list((out / "images").glob("part-*.parquet"))) == summary.units_total == 4


def test_tar_shards_and_manifest(ray_local, shapes_dir, tmp_path):
    files = sorted((shapes_dir / "val").glob("*.jpg"))
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"shard-{s:03d}.tar", "w") as tf:
            for f in files[s * 3 : s * 3 + 3]:
                tf.add(f, arcname=f"k{f.stem}.jpg")
                meta = tarfile.TarInfo(f"k{f.stem}.json")
                meta.size = 2
                tf.addfile(meta, io.BytesIO(b"{}"))
    summary, _ = run(str(shards / "*.tar"), str(tmp_path / "out_tar"))
    images, _ = read(str(tmp_path / "out_tar"))
    assert summary.complete and images.num_rows == 6 and summary.units_total == 2
    assert f"{shards}/shard-000.tar#k{files[0].stem}.jpg" in images.column("image_uri").to_pylist()

    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(str(f) for f in files[:5]) + "\n")
    summary, _ = run(str(manifest), str(tmp_path / "out_manifest"))
    images, _ = read(str(tmp_path / "out_manifest"))
    assert images.column("image_uri").to_pylist() == [str(f) for f in files[:5]]


def test_rerun_skips_committed_and_changed_settings_are_refused(ray_local, shapes_dir, tmp_path):
    out = tmp_path / "out"
    first, _ = run(str(shapes_dir / "val"), str(out))
    assert first.units_committed == 3
    # Simulate a crash that lost one unit's commit: its files and marker are gone.
    (out / "_committed" / "00000001.json").unlink()
    (out / "images" / "part-00000001.parquet").unlink()
    (out / "_SUCCESS.json").unlink()
    second, lines = run(str(shapes_dir / "val"), str(out))
    assert second.units_skipped == 2 and second.units_committed == 1 and second.complete
    assert any("resuming: 2 of 3 units" in line for line in lines)
    images, dets = read(str(out))
    assert images.num_rows == 12 and len(set(images.column("image_uri").to_pylist())) == 12
    assert dets.num_rows == first.detections == second.detections
    with pytest.raises(JobError, match="holds results of another model/threshold"):
        run(str(shapes_dir / "val"), str(out), model={"score_threshold": 0.9})
    third, _ = run(
        str(shapes_dir / "val"), str(out), model={"score_threshold": 0.9}, output={"mode": "overwrite"}
    )
    assert third.units_committed == 3 and third.detections <= first.detections


def test_no_inputs_is_a_job_error_and_the_corrected_run_proceeds(ray_local, shapes_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(JobError, match="no inputs found"):
        run(str(tmp_path / "empty"), str(tmp_path / "out"))
    with pytest.raises(JobError, match="not found"):
        run(str(tmp_path / "missing"), str(tmp_path / "out"))
    # Same output, corrected input: nothing was planned or committed there, so this is not "another setting".
    summary, _ = run(str(shapes_dir / "val"), str(tmp_path / "out"))
    assert summary.complete and summary.images == 12


def test_resource_plan_never_reserves_every_cpu():
    r = plan_resources(ComputeConfig(), device="auto", cluster_gpus=0, node_cpus=[2.0])
    assert (r.device, r.max_actors, r.cpus_per_actor, r.threads_per_actor) == ("cpu", 1, 1.0, 2)
    g = plan_resources(ComputeConfig(), device="auto", cluster_gpus=8, node_cpus=[16.0, 16.0])
    assert (g.device, g.max_actors, g.gpus_per_actor, g.cpus_per_actor) == ("cuda", 8, 1.0, 1.0)
    big = plan_resources(ComputeConfig(), device="auto", cluster_gpus=0, node_cpus=[16.0, 16.0, 16.0])
    assert (big.max_actors, big.cpus_per_actor, big.threads_per_actor) == (3, 15.0, 16)
    with pytest.raises(ConfigError, match="compute.cpus_per_actor"):
        plan_resources(ComputeConfig(cpus_per_actor=2), device="auto", cluster_gpus=0, node_cpus=[2.0])
    with pytest.raises(JobError, match="no GPU"):
        plan_resources(ComputeConfig(), device="cuda", cluster_gpus=0, node_cpus=[2.0])


def test_a_second_run_on_a_leased_local_output_is_refused_at_once(ray_local, shapes_dir, tmp_path):
    import time

    from pipeline.segment.lease import Lease
    from pipeline.segment.storage import Output

    out = tmp_path / "out"
    with Lease(Output(str(out)), "run-A", ttl_s=60).acquire():
        t0 = time.monotonic()
        with pytest.raises(JobError, match=r"is being written by run run-A .* which holds a lock on it"):
            run(str(shapes_dir / "val"), str(out))
        assert time.monotonic() - t0 < 5  # a local lock answers at once: no waiting for a lease period
        assert not (out / "_plan").exists() and not (out / "_config.json").exists()
    summary, _ = run(str(shapes_dir / "val"), str(out))  # the lock is dropped with its holder
    assert summary.complete


def test_fp16_on_a_cluster_without_gpus_is_a_config_error(ray_local, shapes_dir, tmp_path):
    with pytest.raises(
        ConfigError, match=r"model.precision: fp16 runs on GPUs only .* \(this cluster has no GPU\)"
    ):
        run(str(shapes_dir / "val"), str(tmp_path / "out"), model={"precision": "fp16"})
    assert (
        not list((tmp_path / "out" / "images").glob("*")) if (tmp_path / "out" / "images").exists() else True
    )
