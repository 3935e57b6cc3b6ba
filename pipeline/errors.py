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
