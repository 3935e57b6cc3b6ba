"""A job's config as a plain dict: code defaults ← the `--config` YAML file ← `--set dotted.key=value` overrides.

Validation is not done here: the dict goes to the typed builders in `pipeline` (e.g. `segment_config`), which name
an unknown key or a bad value. Errors here (a missing or malformed file, a malformed `--set`) are `ConfigError`s.
"""

from __future__ import annotations

from typing import Any

import yaml

from pipeline.config import ConfigError


def load_config_dict(path: str | None, sets: list[str], base: dict | None = None) -> dict:
    """`base` (code defaults) ← YAML file ← `--set dotted.key=value` (values parsed as YAML scalars)."""
    data: dict = deep_copy(base or {})
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"--config: no such file: {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--config: {path} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config: {path} must hold a mapping of keys, got {type(loaded).__name__}")
        merge(data, loaded)
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        set_dotted(data, key.strip(), value)
    return data


def set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def merge(into: dict, new: dict) -> None:
    """Merge `new` into `into` in place: sections (dicts) key by key, recursively; any other value replaces."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v


def deep_copy(d: dict) -> dict:
    """A copy of `d` whose sections (nested dicts) are copies too, so merging into it leaves `d` as it was."""
    return {k: deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}
