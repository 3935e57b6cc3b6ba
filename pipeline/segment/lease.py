"""One run at a time per output: a lease that a second run on the same `--output` finds, and refuses to start.

Two runs writing one output would each re-plan, clear (`output.mode=overwrite`) or summarise it under the other's
feet. The lease is `<output>/_lease.json`, naming the run, its host and process:

- **S3**: created with a conditional write (`If-None-Match: *`), so of two runs starting together exactly one
  creates it; renewed every third of `ttl_s` with `If-Match` on its own ETag, so a renewal never overwrites a lease
  that another run took over. A run that finds a lease watches it: renewed within `ttl_s` → the holder is alive and
  the new run ends with one line naming it; not renewed for `ttl_s` (its holder died without releasing it) → taken
  over with `If-Match` on the dead lease's ETag, so of two runs taking over together exactly one wins. Watching
  uses the lease's ETag and this machine's clock, never another machine's clock; a lease not renewed for over
  15 minutes plus its period by the store's own clock is taken over at once.
- **Local folders**: an exclusive `flock` on the file, which the operating system drops when the holding process
  dies however it dies, so a crashed run never blocks the next one.
- Other stores (gs://, az://, ...): no lease; the job says so once.

A holder that loses its lease (its renewals failed for longer than `ttl_s` and another run took over) sees
`lost` become true; the driver then stops with an error. Work units stay exactly-once regardless: their files are
named by unit, so two writers of one unit replace each other's identical files.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable

from pipeline import retry
from pipeline.errors import JobError, describe_storage_error
from pipeline.segment.schema import LEASE_FILE
from pipeline.segment.storage import Output, protocols


def _precondition_failed(exc: BaseException) -> bool:
    """Whether a conditional write failed its condition (HTTP 412): s3fs raises FileExistsError for
    If-None-Match, and an OSError caused by botocore's `PreconditionFailed` otherwise."""
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, FileExistsError):
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in (
            "PreconditionFailed",
            "412",
        ):
            return True
        e = e.__cause__
    return False


class Lease:
    """Held from `acquire` until `release` (use as a context manager)."""

    def __init__(self, output: Output, run_id: str, ttl_s: float):
        self.output, self.run_id, self.ttl_s = output, run_id, ttl_s
        self.lost = False
        self.holder: dict | None = None  # who took it over, when lost
        self._etag: str | None = None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the record ---------------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        record = {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "renewed_at": time.time(),
            "ttl_s": self.ttl_s,
        }
        return (json.dumps(record) + "\n").encode()

    @property
    def _path(self) -> str:
        return self.output.path(LEASE_FILE)

    # -- acquire ------------------------------------------------------------------------------------------------------

    def acquire(self, log: Callable[[str], None] = print) -> Lease:
        if self.output.local:
            self._acquire_local()
        elif "s3" in protocols(self.output.fs):
            self._acquire_s3(log)
            self._thread = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
            self._thread.start()
        else:
            log(
                f"note: no lease on {self.output.url} (only s3:// and local outputs have one): start one run at a time"
            )
        return self

    def _acquire_local(self) -> None:
        import fcntl

        self.output.ensure_writable()
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(os.pread(fd, 4096, 0))
            os.close(fd)
            raise JobError(_refusal(self.output.url, holder, "holds a lock on it")) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._body(), 0)
        self._fd = fd

    def _acquire_s3(self, log: Callable[[str], None]) -> None:
        fs = self.output.fs
        first_seen: tuple[str, float] | None = None  # (etag, when this run first saw it)
        while True:
            try:
                self._etag = _etag(retry.call(fs.pipe_file, self._path, self._body(), mode="create"))
                return
            except Exception as e:
                if not _precondition_failed(e):
                    raise self._storage_error(e) from None
            try:
                info = retry.call(fs.info, self._path, refresh=True)
                holder = _parse(retry.call(fs.cat_file, self._path))
            except FileNotFoundError:
                continue  # released between our write and our look: try to create it again
            etag = _etag(info)
            if holder.get("run_id") == self.run_id:  # our own create, whose answer was lost and retried
                self._etag = etag
                return
            now = time.monotonic()
            if first_seen is None or first_seen[0] != etag:
                if first_seen is not None:  # renewed while we watched: its run is alive
                    raise JobError(_refusal(self.output.url, holder, "renewed its lease just now"))
                first_seen = (etag, now)
                age = time.time() - float(holder.get("renewed_at", 0) or 0)
                if age <= self.ttl_s:
                    log(
                        f"output {self.output.url} is leased by run {holder.get('run_id')} (host "
                        f"{holder.get('host')}, pid {holder.get('pid')}), renewed {max(age, 0):.0f} s ago: waiting "
                        f"up to {self.ttl_s:.0f} s to see whether that run is alive"
                    )
            if _abandoned(info, self.ttl_s) or now - first_seen[1] >= self.ttl_s:
                # Not renewed for a whole lease period: its run is gone. Take it over, only if it is still that lease.
                try:
                    self._etag = _etag(retry.call(fs.pipe_file, self._path, self._body(), IfMatch=etag))
                    log(f"took over the lease of run {holder.get('run_id')}, which stopped renewing it")
                    return
                except Exception as e:
                    if not _precondition_failed(e):
                        raise self._storage_error(e) from None
                    first_seen = None  # someone else changed it first: look again
                    continue
            time.sleep(min(max(self.ttl_s / 6, 0.5), 10.0))

    def _storage_error(self, e: BaseException) -> JobError:
        return JobError(f"output: {describe_storage_error(self.output.url_of(LEASE_FILE), e)}")

    # -- hold ---------------------------------------------------------------------------------------------------------

    def _renew_loop(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._etag = _etag(
                    retry.call(self.output.fs.pipe_file, self._path, self._body(), IfMatch=self._etag)
                )
                last_ok = time.monotonic()
            except Exception as e:  # noqa: BLE001  (decided below: lost, or try again at the next tick)
                if _precondition_failed(e) or isinstance(e, FileNotFoundError):
                    try:
                        info = self.output.fs.info(self._path, refresh=True)
                        self.holder = _parse(self.output.fs.cat_file(self._path))
                    except Exception:  # noqa: BLE001
                        info, self.holder = {}, None
                    if self.holder and self.holder.get("run_id") == self.run_id:
                        # Our own renewal went through but its answer was lost (and retried): keep holding.
                        self._etag, last_ok = _etag(info), time.monotonic()
                        continue
                    self.lost = True
                    return
                if time.monotonic() - last_ok > self.ttl_s:
                    self.lost = True
                    return

    def check(self) -> None:
        """Raise if the lease was lost: another run may now be writing this output."""
        if self.lost:
            who = f"run {self.holder.get('run_id')}" if self.holder else "another run"
            raise JobError(
                f"lost the lease on {self.output.url} ({who} holds it now; renewals failed for over "
                f"{self.ttl_s:.0f} s); stopping. Committed units are kept"
            )

    # -- release ------------------------------------------------------------------------------------------------------

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None
        elif self._etag is not None and not self.lost:
            try:
                self.output.fs.rm(self._path)
            except Exception:  # noqa: BLE001  (an unreleased lease only makes the next run wait ttl_s)
                pass
            self._etag = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# Request signing (SigV4) refuses a client clock more than 15 minutes off the store's, so a lease whose last renewal
# is older than that margin plus its period by the store's own clock (LastModified) cannot be alive, whatever the
# clocks: it is taken over without watching it for a period.
SIGNING_SKEW_S = 15 * 60


def _abandoned(info: dict, ttl_s: float) -> bool:
    modified = info.get("LastModified")
    if not hasattr(modified, "timestamp"):
        return False
    return time.time() - modified.timestamp() > ttl_s + SIGNING_SKEW_S


def _etag(response: dict | None) -> str | None:
    if not response:
        return None
    return response.get("ETag") or response.get("etag")


def _parse(blob: bytes) -> dict:
    try:
        return json.loads(blob)
    except (ValueError, TypeError):
        return {}


def _refusal(url: str, holder: dict, how: str) -> str:
    age = time.time() - float(holder.get("renewed_at", 0) or 0) if holder.get("renewed_at") else None
    renewed = f", renewed {age:.0f} s ago" if age is not None else ""
    return (
        f"output {url} is being written by run {holder.get('run_id', '?')} (host {holder.get('host', '?')}, "
        f"pid {holder.get('pid', '?')}{renewed}), which {how}; wait for it to finish, or use another --output"
    )
