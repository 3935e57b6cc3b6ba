import pytest

from jobs._cli import load_config_dict
from pipeline.config import ConfigError, redacted
from pipeline.segment.config import segment_config

BASE = {"input": {"url": "in/"}, "output": {"url": "out/"}}


def cfg(**sections):
    data = {k: dict(v) for k, v in BASE.items()}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return segment_config(data)


def test_defaults():
    c = cfg()
    assert c.model.weights == "DEFAULT" and c.model.score_threshold == 0.5 and c.on_image_error == "record"
    assert c.model.min_size is None and c.compute.max_actors is None


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"model": {"wieghts": "none"}}, "unknown key 'model.wieghts'; allowed keys under 'model': weights"),
        ({"modle": {}}, "unknown key 'modle'; allowed keys at the top level"),
        ({"model": {"device": "gpu"}}, "model.device: expected one of 'auto', 'cpu', 'cuda', got 'gpu'"),
        ({"model": {"min_size": "big"}}, "model.min_size: expected an integer, got 'big'"),
        ({"model": {"score_threshold": 1.5}}, r"model.score_threshold: expected a value in \[0, 1\]"),
        ({"input": {"storage": {"anon": "yes"}}}, "input.storage.anon: expected true or false"),
        ({"on_image_error": "ignore"}, "on_image_error: expected one of 'record', 'raise'"),
        (
            {"compute": {"min_actors": 4, "max_actors": 2}},
            "compute.max_actors: must be >= compute.min_actors",
        ),
        ({"model": {"precision": "fp16", "device": "cpu"}}, "model.precision: fp16 runs on GPUs only"),
        ({"model": {"precision": "int8"}}, "model.precision: expected one of 'auto', 'fp32', 'fp16', 'bf16'"),
    ],
)
def test_bad_values_name_key_and_allowed(sections, message):
    with pytest.raises(ConfigError, match=message):
        cfg(**sections)


def test_required_urls():
    with pytest.raises(ConfigError, match="input.url: required"):
        segment_config({"output": {"url": "x"}})


def test_auto_accepted_for_optional_ints():
    c = cfg(compute={"max_actors": "auto", "threads_per_actor": 3}, model={"min_size": "auto"})
    assert c.compute.max_actors is None and c.compute.threads_per_actor == 3 and c.model.min_size is None


def test_yaml_file_and_set_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  weights: none\n  batch_size: 2\ninput:\n  url: a/\n")
    data = load_config_dict(
        str(f), ["model.batch_size=8", "output.url=s3://b/out", "input.storage.anon=true"]
    )
    c = segment_config(data)
    assert c.model.batch_size == 8 and c.model.weights == "none" and c.output.url == "s3://b/out"
    assert c.input.storage.anon is True
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config_dict(None, ["model.batch_size"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config_dict(None, ["model=1", "model.x=2"])


def test_storage_options_and_redaction():
    c = cfg(
        input={
            "url": "s3://bucket/in",
            "storage": {"endpoint_url": "http://127.0.0.1:9", "key": "AK", "secret": "S"},
        }
    )
    opts = c.input.storage_options()
    assert opts == {"key": "AK", "secret": "S", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    assert cfg().input.storage_options() == {}  # local paths get no s3 options
    red = redacted(c)
    assert red["input"]["storage"]["key"] == "***" and red["input"]["storage"]["secret"] == "***"
    assert "AK" not in str(red) and red["input"]["storage"]["endpoint_url"] == "http://127.0.0.1:9"


def test_shipped_config_is_valid_and_complete():
    import os

    import yaml

    from pipeline.segment.config import SegmentConfig

    path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "segment_archive.yaml")
    data = yaml.safe_load(open(path))
    segment_config({**data, "input": {**data["input"], "url": "x"}, "output": {**data["output"], "url": "y"}})

    from tests.config_keys import dataclass_keys, yaml_keys

    assert dataclass_keys(SegmentConfig) == yaml_keys(data)  # every key documented in the shipped file


def test_batch_size_auto_is_one_on_cpu_and_four_on_gpu():
    from pipeline.segment.settings import batch_size_for

    cfg = segment_config({"input": {"url": "a/"}, "output": {"url": "b/"}, "model": {"batch_size": "auto"}})
    assert cfg.model.batch_size is None
    assert batch_size_for(cfg.model.batch_size, "cpu") == 1 and batch_size_for(None, "cuda") == 4
    assert batch_size_for(8, "cpu") == 8
    with pytest.raises(ConfigError, match=r"model.batch_size: expected a value in \[1, 1024\], got 0"):
        segment_config({"input": {"url": "a/"}, "output": {"url": "b/"}, "model": {"batch_size": 0}})
