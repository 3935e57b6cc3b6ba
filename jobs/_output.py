"""Quiet output: the job's own lines and progress on the terminal, Ray's messages in a log file the job names.

`setup_output` runs before Ray is imported; `jobs._ray.init_ray` then sends Ray's loggers to the same file
(`ray_loggers_to_file`). `--verbose` (`add_output_args`) keeps everything on the terminal instead.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time

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


def ray_loggers_to_file(path: str) -> None:
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


def ray_errors_to_file(path: str) -> None:
    """The errors the raylet publishes to the driver ("A worker died or was killed ...", "Task ... failed. There are
    infinite retries remaining ...") are printed by the driver's error-listener thread on `sys.stdout`, i.e. the
    terminal, whatever `log_to_driver` says; an actor ending itself after a device failure (and any actor restart)
    would print a screenful each. They go to the log file instead. Ray 2.60 (pinned) looks the printer up as a module
    global at each message (`ray._private.worker.print_to_stdstream`), which is what is replaced here;
    tests/reliability/test_device_faults.py checks the terminal stays quiet."""
    import ray._private.worker as ray_worker

    def to_log_file(data: dict, ignore_prefix: bool) -> None:
        with open(path, "a", encoding="utf-8") as f:
            ray_worker.print_worker_logs(data, f, ignore_prefix)

    ray_worker.print_to_stdstream = to_log_file


def log_path() -> str | None:
    """Where Ray's own messages go (set by `setup_output`); None in verbose mode or before `setup_output`."""
    return _LOG_PATH


def log_notice() -> str | None:
    """The line that tells where Ray's messages went (None in verbose mode)."""
    if _LOG_PATH is None:
        return None
    return f"Ray's own messages: {_LOG_PATH} (workers' output: Ray's session logs; --verbose shows all here)"
