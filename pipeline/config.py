"""Configuration machinery shared by the jobs: a nested dict checked against frozen dataclasses, storage options,
and redaction of credentials.

Parsing files (YAML) and command-line overrides happens in `jobs/`; each job's dataclasses live with its code
(`pipeline.segment.config`, `pipeline.train.config`). Every error names the dotted key and what is allowed, and is
raised before any work starts.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Literal, Union

SECRET_KEYS = frozenset({"key", "secret", "token", "session_token"})
REDACTED = "***"


class ConfigError(ValueError):
    """A configuration problem, phrased for the user: names the key and the allowed values."""


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    """Options for s3:// URLs (passed to s3fs). Unset values fall back to the standard AWS environment variables
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_REGION) and ~/.aws files."""

    endpoint_url: str | None = None
    anon: bool = False
    profile: str | None = None
    region: str | None = None
    key: str | None = None
    secret: str | None = None
    session_token: str | None = None

    def options_for(self, url: str) -> dict[str, Any]:
        """fsspec storage options for `url`: s3fs keywords for s3:// URLs, nothing for other protocols."""
        if not url.startswith(("s3://", "s3a://")):
            return {}
        opts: dict[str, Any] = {}
        if self.anon:
            opts["anon"] = True
        if self.profile:
            opts["profile"] = self.profile
        if self.key:
            opts["key"] = self.key
        if self.secret:
            opts["secret"] = self.secret
        if self.session_token:
            opts["token"] = self.session_token
        client_kwargs = {}
        # The endpoint from the environment is made explicit here, on the driver, because Ray workers on other
        # nodes do not share the driver's environment. Credentials are not copied: workers use their own
        # (instance role, environment, ~/.aws), or the keys above when given.
        endpoint = (
            self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
        return opts


# --- generic dict → dataclass validation -------------------------------------------------------------------------

# Fields whose "auto" (or null) means "decide from the cluster / checkpoint"; see configs/segment_archive.yaml.
_AUTO = "auto"


def from_dict(cls: type, data: dict | None, *, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, checking every key and value. Raises `ConfigError`."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"under '{prefix.rstrip('.')}'" if prefix else "at the top level"
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}'; allowed keys {where}: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=f"{key}.")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: expected one of {allowed}, got {value!r}")
        return value
    if origin is tuple:  # tuple[X, ...]: a YAML list, or one scalar meaning a list of one
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise ConfigError(f"{key}: expected one or more values, got an empty list")
        return tuple(_coerce(args[0], v, key) for v in items)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if type(None) in args and (value is None or value == _AUTO):
            return None
        if len(inner) == 1:
            try:
                return _coerce(inner[0], value, key)
            except ConfigError as e:
                raise ConfigError(f"{e} (or 'auto'/null)") from None
        raise TypeError(f"unsupported config type {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str) and value:
            return value
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    raise TypeError(f"unsupported config type {tp}")


def check_ranges(cfg: Any, ranges: dict[str, tuple[float, float]]) -> None:
    """Value ranges that a type alone cannot express: `ranges` maps a dotted key to its inclusive bounds; unset
    (None, "auto") values pass."""
    for key, (lo, hi) in ranges.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is not None and not lo <= value <= hi:
            raise ConfigError(f"{key}: expected a value in [{lo:g}, {hi:g}], got {value!r}")


def redacted(obj: Any) -> Any:
    """A plain-dict copy of a config with every credential replaced by '***' (safe to log and to write out)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {k: (REDACTED if k in SECRET_KEYS and v is not None else redacted(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redacted(v) for v in obj]
    return obj
