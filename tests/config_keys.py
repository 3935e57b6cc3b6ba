"""Helpers for the tests that check a shipped YAML config lists every key of its config dataclass."""

from __future__ import annotations

import dataclasses
import typing


def yaml_keys(d: dict, prefix: str = "") -> set[str]:
    """Dotted keys of the leaves of a nested dict."""
    out: set[str] = set()
    for k, v in d.items():
        out |= yaml_keys(v, prefix + k + ".") if isinstance(v, dict) else {prefix + k}
    return out


def dataclass_keys(cls, prefix: str = "") -> set[str]:
    """Dotted keys of the leaf fields of a nested config dataclass."""
    hints = typing.get_type_hints(cls)
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        out |= dataclass_keys(t, prefix + f.name + ".") if dataclasses.is_dataclass(t) else {prefix + f.name}
    return out
