"""What every job shares: repo on sys.path, YAML + `--set` parsing, Ray start/join, one-line failures.

The scripts run as `python jobs/<name>.py` (locally or under `ray job submit --working-dir .`), where Python puts
`jobs/` itself on sys.path; the repo root is added so `pipeline`/`model` import without installation.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import yaml  # noqa: E402

from pipeline.config import ConfigError  # noqa: E402
from pipeline.errors import JobError  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def load_config_dict(path: str | None, sets: list[str], base: dict | None = None) -> dict:
    """`base` (code defaults) ← YAML file ← `--set dotted.key=value` (values parsed as YAML scalars)."""
    data: dict = _deep_copy(base or {})
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
        _merge(data, loaded)
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


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _deep_copy(d: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def init_ray(address: str | None = None) -> None:
    """Join the cluster named by `address` or $RAY_ADDRESS (set by `ray job submit`), else start an embedded Ray."""
    import ray
    import ray.data  # noqa: F401  (configures its loggers on import; quieted below)

    # Ray and Ray Data log at INFO by default; a batch job's own progress lines are what the user reads
    # (Ray Data's full log stays in the session's ray-data.log).
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if address or os.environ.get("RAY_ADDRESS"):
        # On a cluster the code reaches workers through `ray job submit --working-dir .` (or an installed image).
        ray.init(address=address or None, logging_level=logging.WARNING)
    else:
        # Embedded Ray: workers inherit this environment, so the repo root on PYTHONPATH lets them import
        # `pipeline`/`model` even when the project is not pip-installed.
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *[p for p in paths if p != ROOT]])
        ray.init(include_dashboard=False, logging_level=logging.WARNING)


def run_main(main: Callable[[], int]) -> None:
    """Run `main`, turning job-level failures into one line on stderr and an exit code (no traceback wall).

    The failure line is the last thing the job prints: Ray is shut down first, because its driver keeps
    forwarding worker and raylet output (e.g. the raylet's "disk over 95% full" warning every 10 s) until it stops,
    and a user or script reading the last line of stderr must find the reason there, not Ray's noise.
    """
    try:
        code = main()
    except ConfigError as e:
        _stop_ray()
        print(f"config error: {e}", file=sys.stderr)
        code = EXIT_CONFIG
    except JobError as e:
        _stop_ray()
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        _stop_ray()
        print("interrupted; committed units are kept — run the same command again to resume", file=sys.stderr)
        code = 130
    sys.exit(code)


def _stop_ray() -> None:
    """Disconnect from Ray (stopping an embedded one) if this process started or joined it; quietly, best effort."""
    # Not imported: this job never used Ray (and must not start importing it now).
    ray = sys.modules.get("ray")
    if ray is None:
        return
    try:
        ray.shutdown()  # a no-op when Ray was imported but never started
    except Exception:  # noqa: BLE001  (the job is already failing; its own reason is what must be printed)
        pass
