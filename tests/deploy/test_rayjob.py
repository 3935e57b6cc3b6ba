"""deploy/rayjob.yaml against KubeRay's RayJob API (the v1.7.0 CRD, vendored) and against the repository: the
fields exist, the head runs no tasks, the GPU pods ask for GPUs, the entrypoint is the README's command and the
image is the one deploy/Dockerfile builds."""

from __future__ import annotations

import copy
import re
import shlex

import yaml

from tests.deploy.crd import rayjob_schema, schema_errors, unknown_fields
from tests.deploy.files import DEPLOY, all_images, load_yaml, pinned, readme_segment_command


def test_every_field_is_one_kuberay_defines():
    crd, job = rayjob_schema(), load_yaml("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == (f"{crd['group']}/{crd['version']}", crd["kind"])
    assert unknown_fields(job, crd["openAPIV3Schema"]) == []
    assert schema_errors(job, crd["openAPIV3Schema"]) == []


def test_the_check_finds_a_misspelt_field_and_a_bad_value():
    # The walker itself: a field KubeRay does not define (pruned silently by the API server) and a value outside
    # an enum must both be caught, at any depth.
    crd, job = rayjob_schema(), load_yaml("rayjob.yaml")
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = True  # missing "es"
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["gpus"] = 1
    bad["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    assert sorted(unknown_fields(bad, crd["openAPIV3Schema"])) == [
        "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].gpus",
        "spec.shutdownAfterJobFinish",
    ]
    assert any(
        e.startswith("spec.rayClusterSpec.authOptions.mode:")
        for e in schema_errors(bad, crd["openAPIV3Schema"])
    )


def test_head_runs_no_tasks_and_gpu_pods_ask_for_gpus():
    spec = load_yaml("rayjob.yaml")["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu, cpu = groups["gpu"], groups["cpu"]
    (container,) = gpu["template"]["spec"]["containers"]
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert int(limits["nvidia.com/gpu"]) >= 1 and requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
    # The job sizes its actor pool from the GPUs present when it starts: the GPU group must not autoscale.
    assert gpu["replicas"] == gpu["minReplicas"] == gpu["maxReplicas"]
    for c in cpu["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert spec["shutdownAfterJobFinishes"] is True
    assert cluster["authOptions"]["mode"] == "token"


def test_entrypoint_is_the_readme_segment_command():
    assert shlex.split(load_yaml("rayjob.yaml")["spec"]["entrypoint"]) == readme_segment_command()


def test_image_and_ray_version_are_the_repositorys():
    job = load_yaml("rayjob.yaml")
    images = set(all_images(job))
    assert len(images) == 1, images  # head, GPU and CPU pods run one image
    assert images == {load_yaml("aws-cluster.yaml")["docker"]["image"]}  # the launcher config's too
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == pinned("ray")
    # The job runs from the code deploy/Dockerfile puts in the image.
    workdir = re.search(r"^WORKDIR (\S+)$", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == {"working_dir": workdir}
