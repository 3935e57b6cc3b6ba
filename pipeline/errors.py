"""Job-level failures: each carries one line for the user; `jobs/` prints it and exits non-zero."""

from __future__ import annotations

from pipeline.retry import is_transient


class JobError(RuntimeError):
    """The job as a whole cannot run or complete (no inputs, storage unreachable, access denied, ...)."""


def describe_storage_error(url: str, exc: BaseException) -> str:
    """One readable line for a storage exception: the URL and the cause, no traceback, no credentials."""
    name = type(exc).__name__
    text = " ".join(str(exc).split())  # botocore messages span lines
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        cause = "access denied"
    elif "NoSuchBucket" in text or "bucket does not exist" in text:  # s3fs keeps NoSuchBucket's message only
        cause = "bucket does not exist"
    elif isinstance(exc, FileNotFoundError):
        cause = "not found"
    elif "EndpointConnectionError" in name or "Could not connect" in text or isinstance(exc, ConnectionError):
        cause = "storage endpoint unreachable"
    elif "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text or "NoCredentials" in name:
        cause = "credentials rejected or missing"
    elif is_transient(exc):
        cause = f"{name}, still failing after retries"
    else:
        cause = name
    detail = text[:300]
    return f"{url}: {cause}" + (f" ({detail})" if detail and detail.lower() != cause else "")


def root_cause(exc: BaseException) -> BaseException:
    """The innermost error of an exception chain. Ray wraps a task's error several times (with its traceback in the
    message); the innermost one carries the reason to show, e.g. a worker's own `JobError`."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if inner is None:
            break
        exc = inner
    return exc


def one_line(exc: BaseException) -> str:
    """An error's own message as one line. Ray appends notes (retry hints) to the message of an error it carries
    between processes; ours are one line by construction, so the first line is the reason."""
    text = str(exc.args[0]) if exc.args else str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
