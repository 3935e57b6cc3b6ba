"""docs/configuration.md lists exactly the keys of each shipped YAML config, with the YAML's values as defaults.

The doc's rule for the default column, which `rendered` implements: YAML `null` is `—` (unset); any other value is
one code span holding the value as YAML writes it in flow style (`auto`, `true`, `0.0001`, `[32, 64]`).
"""

from __future__ import annotations

import functools
import importlib

import pytest
import yaml

from tests.config_keys import dataclass_keys, yaml_keys
from tests.docs.markdown import ROOT, code, section, tables

DOC = ROOT / "docs" / "configuration.md"

CASES = [
    # (heading of the doc's section, YAML file under configs/, its config dataclass)
    (
        "Segment job (`configs/segment_archive.yaml`)",
        "segment_archive.yaml",
        "pipeline.segment.config:SegmentConfig",
    ),
    ("Training (`configs/train.yaml`)", "train.yaml", "pipeline.train.config:TrainConfig"),
]


def rendered(value) -> str:
    """A YAML value as the doc's default column shows it."""
    if value is None:
        return "—"
    return f"`{_flow(value)}`"


def _flow(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return str(value)


def documented(heading: str) -> dict[str, str]:
    """{dotted key: default cell} from every key/default/meaning table in the doc's section."""
    rows: dict[str, str] = {}
    for header, body in tables(section(DOC.read_text(encoding="utf-8"), heading)):
        assert header == ["key", "default", "meaning"], f"{heading}: unexpected table header {header}"
        for row in body:
            assert len(row) == 3, f"{heading}: a row needs three cells: {row}"
            key = code(row[0])
            assert key not in rows, f"{heading}: {key} is listed twice"
            rows[key] = row[1]
    return rows


@pytest.mark.parametrize("heading, yaml_file, _cls", CASES, ids=[c[1] for c in CASES])
def test_doc_lists_exactly_the_yaml_keys_with_their_defaults(heading, yaml_file, _cls):
    data = yaml.safe_load((ROOT / "configs" / yaml_file).read_text(encoding="utf-8"))
    doc = documented(heading)
    keys = yaml_keys(data)
    assert sorted(keys - doc.keys()) == [], f"keys of configs/{yaml_file} missing from docs/configuration.md"
    assert sorted(doc.keys() - keys) == [], f"keys in docs/configuration.md that configs/{yaml_file} lacks"
    defaults = {key: rendered(functools.reduce(dict.__getitem__, key.split("."), data)) for key in keys}
    wrong = {key: (doc[key], value) for key, value in sorted(defaults.items()) if doc[key] != value}
    assert wrong == {}, "(doc, YAML) defaults that differ"


@pytest.mark.parametrize("heading, _yaml, cls", CASES, ids=[c[1] for c in CASES])
def test_doc_lists_exactly_the_config_dataclass_keys(heading, _yaml, cls):
    # With the test above this also ties the YAML to the dataclass; tests/pipeline/*/ check that pair directly.
    module, name = cls.split(":")
    assert set(documented(heading)) == dataclass_keys(getattr(importlib.import_module(module), name))


def test_default_rule():
    assert [rendered(v) for v in (None, "auto", False, 0.0001, 100000000, [0.667, 0.889])] == [
        "—",
        "`auto`",
        "`false`",
        "`0.0001`",
        "`100000000`",
        "`[0.667, 0.889]`",
    ]
