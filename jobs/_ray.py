"""Starting or joining Ray for a job: `init_ray` (an embedded local Ray by default; a cluster only when asked), with
a bounded join and one-line failures (`JobError`).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from jobs import EXIT_FAILED, ROOT
from jobs._output import log_notice, log_path, ray_errors_to_file, ray_loggers_to_file
from pipeline.errors import JobError

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
    path = log_path()
    quiet = path is not None
    if quiet:
        ray_loggers_to_file(path)
        ray_errors_to_file(path)
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
