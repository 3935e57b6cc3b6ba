"""deploy/aws-cluster.yaml as `ray up` would take it, without contacting AWS: Ray's own preparation and schema
validation (what `ray up` runs before its first AWS call), and each node type's `node_config` against botocore's
EC2 RunInstances input shape (the call the launcher makes with it)."""

from __future__ import annotations

import copy

import botocore.session
import jsonschema
import pytest
from botocore.validate import ParamValidator
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.deploy.files import DEPLOY, load_yaml


def test_ray_accepts_the_config():
    # `ray up` -> commands._bootstrap_config: prepare_config (defaults from Ray's aws/defaults.yaml, docker and
    # min/max checks), then validate_config (Ray's ray-schema.json and its own rules). What comes after that,
    # the provider's bootstrap_config, looks up key pairs, subnets and profiles in AWS.
    config = prepare_config(copy.deepcopy(load_yaml("aws-cluster.yaml")))
    validate_config(config)
    assert config["provider"]["type"] == "aws"


def test_every_node_config_is_a_valid_run_instances_request():
    shape = (
        botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    )
    for name, node_type in load_yaml("aws-cluster.yaml")["available_node_types"].items():
        params = {**node_type["node_config"], "MinCount": 1, "MaxCount": 1}  # the launcher adds the counts
        report = ParamValidator().validate(params, shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"


def test_the_checks_find_mistakes():
    config = load_yaml("aws-cluster.yaml")
    config["max_worker"] = 3  # misspelt
    with pytest.raises(jsonschema.ValidationError, match="'max_worker' was unexpected"):
        validate_config(prepare_config(config))
    shape = (
        botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    )
    bad = {"InstanceType": "g5.12xlarge", "IamInstanceProfile": {"Role": "x"}, "MinCount": 1, "MaxCount": 1}
    assert (
        "Unknown parameter in IamInstanceProfile" in ParamValidator().validate(bad, shape).generate_report()
    )


def test_head_runs_no_tasks_gpus_are_fixed_and_s3_needs_no_keys():
    config = load_yaml("aws-cluster.yaml")
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert len(gpu) == 1
    # The job sizes its actor pool from the GPUs present when it starts: the GPU group must not autoscale.
    assert gpu[0]["min_workers"] == gpu[0]["max_workers"] > 0
    assert any(t["resources"].get("CPU", 0) > 0 and "GPU" not in t["resources"] for t in types.values())
    for t in types.values():  # S3 through each node's instance profile, never keys
        assert (
            "Name" in t["node_config"]["IamInstanceProfile"]
            or "Arn" in t["node_config"]["IamInstanceProfile"]
        )
    text = (DEPLOY / "aws-cluster.yaml").read_text().lower()
    assert "aws_access_key_id" not in text and "aws_secret_access_key" not in text
    # Token authentication on every node; the dashboard stays on 127.0.0.1 (reached through `ray dashboard`).
    for cmd in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token ray start" in cmd and "dashboard-host" not in cmd
    # A private ECR image: every host logs Docker in to that registry before pulling it.
    registry = config["docker"]["image"].split("/")[0]
    if ".dkr.ecr." in registry:
        assert any(f"--password-stdin {registry}" in c for c in config["initialization_commands"])
