"""Retries of transient storage errors, with exponential backoff: what counts as transient, and how long to wait.

The libraries below already retry each request: botocore (its default "legacy" mode: 5 attempts on 5xx, throttling
and connection errors, waiting up to 1, 2, 4, 8 s) and s3fs (5 more rounds on `SlowDown`, dropped connections and
bodies cut short). What they give up on reaches the job after ~10 s: a throttling or 5xx spell that lasts longer.
Without a retry of its own, an input read would become a permanent `read failed` error row and a result write would
fail the job. So the segment job's storage calls go through `call` (in `pipeline.segment`: `sources` listing the
inputs, `plan` and `units` the plan's files, `read` each input, `storage` the output, `lease` the leases; a tar shard
cut short is re-read from its start by a loop of its own in `read`), which tries `ATTEMPTS` more times,
`BASE_DELAY_S` x 2^n apart (n = 0, 1, ...; at most `MAX_DELAY_S`; with jitter, so that many readers do not retry in
step).

Permanent errors (not found, access denied, bad credentials, a bucket that does not exist, an endpoint where nothing
accepts connections — botocore has already retried the connect) are raised at once.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

ATTEMPTS = 4  # after the first try; each try is itself a full round of botocore's and s3fs's retries
BASE_DELAY_S = 1.0
MAX_DELAY_S = 16.0

# S3 error codes that say "try again": throttling, server-side trouble, a request the server timed out.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "OperationAborted",
    }
)
# What s3fs turns a 5xx / throttling response into when it gives up (see s3fs.errors).
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO)})


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the call that raised `exc` may succeed: throttling, 5xx, a dropped connection, a body cut
    short, a timeout. Looks through the exception's causes (s3fs raises an `OSError` caused by botocore's
    `ClientError`)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        verdict = _verdict(e)
        if verdict is not None:
            return verdict
        e = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
    return False


def _verdict(e: BaseException) -> bool | None:
    """True / False when `e` itself decides; None to look at its cause."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    response = getattr(e, "response", None)
    if isinstance(response, dict) and "Error" in response:  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return response["Error"].get("Code") in _TRANSIENT_CODES or status >= 500 or status == 429
    name = type(e).__name__
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "NoCredentialsError", "SSLError"):
        return False  # nothing accepts connections there (botocore already retried the connect), or config
    if name in (
        "ConnectionClosedError",  # botocore: the server closed the connection before answering
        "ReadTimeoutError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ClientPayloadError",  # aiohttp: the body ended before its Content-Length
        "ServerDisconnectedError",
        "IncompleteRead",
    ):
        return True
    if isinstance(e, (TimeoutError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
        return True
    return None


def delay(attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (0-based): BASE_DELAY_S × 2^attempt, capped, ±50% jitter."""
    return min(MAX_DELAY_S, BASE_DELAY_S * 2**attempt) * random.uniform(0.5, 1.5)


def call(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)`, retried on transient errors; the last error, or a permanent one, is raised."""
    for attempt in range(ATTEMPTS + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if attempt == ATTEMPTS or not is_transient(e):
                raise
            time.sleep(delay(attempt))
    raise AssertionError("unreachable")
