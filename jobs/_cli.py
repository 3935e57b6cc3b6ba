"""What every job imports first: the repo root on sys.path, then, from one place, what the jobs share:

- `jobs._config`: YAML + `--set` overrides → a config dict (`load_config_dict`, `merge`, `deep_copy`);
- `jobs._output`: the job's own lines on the terminal, Ray's in a log file (`setup_output`, `add_output_args`, ...);
- `jobs._ray`: starting or joining Ray (`init_ray`);
- here: `run_main`, which turns a job-level failure into one line on stderr and an exit status (`EXIT_*`).

The scripts run as `python jobs/<name>.py` (locally or under `ray job submit --working-dir .`), where Python puts
`jobs/` itself on sys.path; the repo root is added so `pipeline`/`model` (and `jobs` as a package) import without
installation.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from jobs import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, ROOT  # noqa: E402
from jobs._config import deep_copy, load_config_dict, merge, set_dotted  # noqa: E402
from jobs._output import add_output_args, live_progress, log_notice, setup_output  # noqa: E402
from jobs._ray import init_ray  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.errors import JobError  # noqa: E402

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_OK",
    "ROOT",
    "add_output_args",
    "deep_copy",
    "init_ray",
    "live_progress",
    "load_config_dict",
    "log_notice",
    "merge",
    "run_main",
    "set_dotted",
    "setup_output",
]


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
