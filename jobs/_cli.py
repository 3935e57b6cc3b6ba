"""What every job shares: repo on sys.path, YAML + `--set` parsing, quiet output, Ray start/join, one-line failures.

The scripts run as `python jobs/<name>.py` (locally or under `ray job submit --working-dir .`), where Python puts
`jobs/` itself on sys.path; the repo root is added so `pipeline`/`model` import without installation.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
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


# --- output: the job's own lines on the terminal, Ray's in a log file --------------------------------------------

# Set by setup_output: where Ray's own messages go in quiet mode (None: verbose, everything on the terminal).
_LOG_PATH: str | None = None


def add_output_args(p) -> None:
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own messages and every worker's output here (default: they go to a log file whose path "
        "the job prints, and the terminal shows the job's own lines and progress)",
    )


def live_progress() -> bool:
    """Progress bars when a person watches (stderr is a terminal); periodic plain lines in CI and `ray job logs`."""
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def setup_output(job: str, *, verbose: bool, log_dir: str | None = None) -> str | None:
    """Keep the terminal for the job's own lines; send everything else to a log file. Returns its path (None when
    `verbose`).

    Ray prints from several layers a job cannot silence one by one: its C++ core worker writes to file descriptor 2
    (ray#53727's constructor-arguments warning on every actor pool), its Python loggers warn at each start, and with
    `log_to_driver` every worker's and Ray Train controller's stdout is forwarded (Ray Train 2.60 repeats
    "Failed to query Ray Train Controller actor state" every few seconds). So, before Ray is imported: descriptors
    1 and 2 go to the log file (C++ output, child processes), `sys.stdout`/`sys.stderr` are re-opened on copies of
    the terminal's descriptors (the job's prints, progress bars, error lines, tracebacks), and `init_ray` sends the
    `ray` logger to the file and starts Ray without forwarding workers' output. Nothing is lost: the file holds
    the driver's side, Ray's session folder the workers'.
    """
    global _LOG_PATH
    if verbose or _LOG_PATH is not None:
        return _LOG_PATH
    folder = log_dir or os.path.join(tempfile.gettempdir(), "ray-job-logs")
    path = os.path.abspath(os.path.join(folder, f"{job}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"))
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
        print(
            f"note: cannot write a log file in {folder} ({e.strerror or e}); Ray's messages stay on the terminal"
        )
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    out, err = os.dup(1), os.dup(2)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # Line-buffered: under `ray job submit` stdout is a pipe, and `ray job logs` should show each line as it comes.
    sys.stdout = os.fdopen(out, "w", buffering=1, encoding=sys.stdout.encoding, errors="backslashreplace")
    sys.stderr = os.fdopen(err, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    # Python warnings raised inside Ray or torch on the driver are Ray's business too.
    logging.captureWarnings(True)
    _to_log_file(logging.getLogger("py.warnings"), path)
    _LOG_PATH = path
    return path


def _file_handler(path: str) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def _to_log_file(logger: logging.Logger, path: str) -> None:
    logger.handlers = [_file_handler(path)]
    logger.propagate = False


def _ray_loggers_to_file(path: str) -> None:
    """Ray's console handlers (on `ray`, and on `ray.data`, which does not propagate) write to whatever sys.stderr
    is at the time, i.e. the terminal: swap them for the log file; Ray Data's own session log file stays."""
    handler = _file_handler(path)
    names = ["ray", *sorted(n for n in logging.root.manager.loggerDict if n.startswith("ray."))]
    for name in names:
        logger = logging.getLogger(name)
        console = [
            h
            for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        ]
        if console or (name == "ray" and not logger.handlers):
            logger.handlers = [h for h in logger.handlers if h not in console] + [handler]


def log_notice() -> str | None:
    """The line that tells where Ray's messages went (None in verbose mode)."""
    if _LOG_PATH is None:
        return None
    return f"Ray's own messages: {_LOG_PATH} (workers' output: Ray's session logs; --verbose shows all here)"


# How long joining a Ray cluster may take before the job gives up with one line (the probe below fails faster
# when nothing listens at the address; this bounds a peer that accepts connections but never answers).
RAY_CONNECT_TIMEOUT_S = 60
_PROBE_TIMEOUT_S = 5


def init_ray(address: str | None = None) -> None:
    """Start an embedded local Ray, or join the cluster named by `address` / $RAY_ADDRESS (set by `ray job submit`).

    Without either, the job always runs on a Ray of its own (`address="local"`), never on whatever cluster this
    machine last recorded (a `ray start --head` that died without `ray stop` would make a plain `ray.init()` wait
    for it for minutes). `auto` joins the recorded cluster explicitly. Joining is bounded: an address where nothing
    listens fails at once, one that does not answer within RAY_CONNECT_TIMEOUT_S ends the job; either way with one
    `error: ...` line and exit status 1.
    """
    import ray
    import ray.data  # noqa: F401  (configures its loggers on import; quieted below)

    # Ray and Ray Data log at INFO by default; a batch job's own progress lines are what the user reads
    # (Ray Data's full log stays in the session's ray-data.log).
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet = _LOG_PATH is not None
    if quiet:
        _ray_loggers_to_file(_LOG_PATH)
    # A job may ask for Ray more than once (e.g. to plan a manifest, then to segment): join or start it once.
    if ray.is_initialized():
        return
    target = _ray_target(address)
    if target is None:
        # Embedded Ray: workers inherit this environment, so the repo root on PYTHONPATH lets them import
        # `pipeline`/`model` even when the project is not pip-installed.
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, *[p for p in paths if p != ROOT]])
        ray.init(
            address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=not quiet
        )
        _notice()
        return
    # On a cluster the code reaches workers through `ray job submit --working-dir .` (or an installed image).
    _probe(target)
    _join_within(ray, target, RAY_CONNECT_TIMEOUT_S, log_to_driver=not quiet)
    _notice()


def _notice() -> None:
    line = log_notice()
    if line:
        print(line)


class _RayTarget:
    """A cluster to join: `address` (probed, and named in failures), `init_address` (what ray.init gets: `auto`
    stays `auto`, because Ray 2.60 uses the token in ~/.ray/auth_token only for a cluster it found by itself, never
    for an explicit address), `origin` (how the address was chosen) and `fix` (the hint's way out)."""

    def __init__(self, address: str, origin: str, fix: str, init_address: str | None = None):
        self.address, self.origin, self.fix = address, origin, fix
        self.init_address = init_address or address

    def failure(self, reason: str, verb: str = "reach") -> str:
        check = (
            "check that the cluster is up and serves Ray Client there"
            if "://" in self.address
            else f"check that the cluster is up (ray status --address {self.address})"
        )
        return (
            f"cannot {verb} the Ray cluster at {self.address}{self.origin} ({reason}): {check}, or {self.fix}"
        )


def _ray_target(address: str | None) -> _RayTarget | None:
    """The cluster to join, or None for an embedded Ray: `address` (`--ray-address`) wins over $RAY_ADDRESS; `auto`
    means $RAY_ADDRESS when set (as under `ray job submit`), else the cluster recorded by `ray start` on this
    machine; `local` (Ray's word for a new local instance) and nothing at all mean an embedded Ray."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    given = (address or "").strip()
    if given:
        fix = "leave out --ray-address to run on an embedded Ray"
        if given == "auto" and env and env != "auto":
            given, fix = env, "unset RAY_ADDRESS (set by `ray job submit`) to run on an embedded Ray"
    elif env:
        given, fix = env, "unset RAY_ADDRESS to run on an embedded Ray"
    else:
        return None
    if given == "local":
        return None
    if given == "auto":
        recorded = _recorded_cluster_file()
        try:
            with open(recorded, encoding="utf-8") as f:
                found = f.read().strip()
        except OSError:
            found = ""
        if not found:
            raise JobError(
                f"--ray-address auto: no Ray cluster is recorded on this machine ({recorded} is missing or empty): "
                "start one with `ray start --head`, give a cluster's address (host:port), or "
                "leave out --ray-address to run on an embedded Ray"
            )
        return _RayTarget(found, f" recorded in {recorded}", fix, init_address="auto")
    if given.startswith(("http://", "https://")):
        raise JobError(
            f"Ray address {given} is a dashboard (job API) URL, not a cluster to join: "
            "give the cluster's GCS address (host:6379), ray://host:10001, or auto"
        )
    return _RayTarget(given, "", fix)


def _recorded_cluster_file() -> str:
    """Where `ray start` records the latest cluster and `ray.init("auto")` looks for it (as in Ray 2.x:
    `<$RAY_TMPDIR, else $TMPDIR on Linux, else /tmp>/ray/ray_current_cluster`)."""
    base = os.environ.get("RAY_TMPDIR") or (
        os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None
    )
    return os.path.join(base or "/tmp", "ray", "ray_current_cluster")


def _probe(target: _RayTarget) -> None:
    """Fail at once (JobError) when nothing accepts TCP connections at the target; schemes other than ray:// are
    left to ray.init (still bounded by the join timeout)."""
    import socket

    scheme, sep, rest = target.address.rpartition("://")
    if sep and scheme != "ray":
        return
    host, _, port_text = rest.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text.split("/")[0])
    except ValueError:
        raise JobError(
            f"Ray address {target.address!r} is not host:port (or ray://host:port, or auto)"
        ) from None
    if not host:
        raise JobError(f"Ray address {target.address!r} is not host:port (or ray://host:port, or auto)")
    if not sep:
        # ray.init connects to this node's own IP for localhost / 127.0.0.1: probe where Ray will connect.
        try:
            from ray._private.services import resolve_ip_for_localhost

            host = resolve_ip_for_localhost(host)
        except Exception:  # noqa: BLE001  (a private Ray helper; the given host is a fine fallback)
            pass
    try:
        socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
    except ConnectionRefusedError:
        raise JobError(target.failure(f"nothing accepts connections at {host}:{port}")) from None
    except socket.gaierror:
        raise JobError(target.failure(f"unknown host {host}")) from None
    except TimeoutError:
        raise JobError(target.failure(f"no answer from {host}:{port} within {_PROBE_TIMEOUT_S} s")) from None
    except OSError as e:
        raise JobError(target.failure(f"{host}:{port}: {e.strerror or e}")) from None


def _join_within(ray: Any, target: _RayTarget, timeout_s: float, *, log_to_driver: bool = True) -> None:
    """`ray.init(address=...)` in this (main) thread, as before, under a watchdog: Ray itself keeps waiting for a
    peer that accepts connections but never answers (logging `Failed to get cluster ID from GCS server: TimedOut`
    every minute), so past `timeout_s` the watchdog prints the one failure line and ends the process with
    os._exit — the hung ray.init holds the main thread, and this driver has started no Ray processes to clean up."""
    import threading

    joined = threading.Event()
    line = "error: " + target.failure(
        f"it accepts connections but Ray did not connect within {timeout_s:g} s"
    )

    def watchdog() -> None:
        if not joined.wait(timeout_s):
            try:
                sys.stdout.flush()
                print(line, file=sys.stderr, flush=True)
            finally:
                os._exit(EXIT_FAILED)

    threading.Thread(target=watchdog, name="ray-join-watchdog", daemon=True).start()
    try:
        ray.init(address=target.init_address, logging_level=logging.WARNING, log_to_driver=log_to_driver)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise JobError(target.failure(f"ray.init failed: {reason[:300]}", verb="join")) from None
    finally:
        joined.set()


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
