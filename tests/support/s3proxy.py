"""A threaded HTTP proxy on 127.0.0.1 in front of moto's S3 server that fails, slows or delays the requests its
rules pick: the storage faults and the latency of real S3, on a real S3 API.

A rule (`Fault`) picks a share of the distinct requests it matches (method + path + query), by a seeded hash of the
request, so which requests fail does not depend on thread timing or on how Ray schedules its tasks; a picked request
fails its first `times` attempts, then goes through. Kinds of failure: `slowdown` (503 with S3's SlowDown body),
`internal` (500 InternalError), `drop` (the connection closed after the request is read, no answer), `cut` (the
headers promise the whole body, half is sent), `lose` (forwarded, so it takes effect, but the connection is closed
before the answer: a write that succeeded while its client saw a failure), and `stall` (held `delay_s` seconds, then
the connection is closed without an answer and nothing is forwarded: an upload that never completes; `stalled` is
set while one is held). `after` lets a request's first attempts through before its faults begin.
`latency_s` adds a delay to every request, as a real S3 region's round trip does.
Every request is counted by method (`by_method`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import http.client
import http.server
import re
import socket
import threading
import time
import urllib.parse

KINDS = (
    "slowdown",
    "internal",
    "drop",
    "cut",
)  # picked in turn by a rule that names no kinds ("stall" is opt-in)
_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<RequestId>fault-injected</RequestId></Error>"
)
_STATUS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
}


@dataclasses.dataclass(frozen=True)
class Fault:
    method: str  # "GET", "PUT", "HEAD", ... or "*"
    path: str  # regex searched in the request's path + query (a LIST is `GET /bucket?list-type=2&prefix=...`)
    share: float = 1.0  # fraction of the distinct matching requests that fail
    times: int = 1  # attempts of a picked request that fail before it goes through
    after: int = 0  # attempts of a picked request that go through before the failing ones
    kinds: tuple[str, ...] = KINDS
    delay_s: float = 0.0  # for kind "stall"


class FaultyS3:
    """A threaded HTTP proxy on 127.0.0.1 in front of `upstream` (moto), failing the requests that `faults` pick."""

    def __init__(self, upstream: str, faults: list[Fault], *, seed: int = 0, latency_s: float = 0.0):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.faults, self.seed, self.latency_s = list(faults), seed, latency_s
        self.requests = 0  # attempts seen, all methods
        self.by_method: collections.Counter = collections.Counter()  # method -> requests seen
        self.stalled = threading.Event()  # set while a "stall" request is held
        self.injected: collections.Counter = collections.Counter()  # rule index -> faults injected
        self.kinds: collections.Counter = collections.Counter()  # kind -> faults injected
        self._attempts: collections.Counter = collections.Counter()  # request key -> attempts seen
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultyS3:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def total_injected(self) -> int:
        return sum(self.injected.values())

    def decide(self, method: str, target: str) -> tuple[str | None, float]:
        """The kind of failure for this attempt of this request, or None to forward it; and its delay ("stall")."""
        key = f"{method} {target}"
        with self._lock:
            self.requests += 1
            self.by_method[method] += 1
            attempt = self._attempts[key]
            self._attempts[key] += 1
            for i, rule in enumerate(self.faults):
                if rule.method not in ("*", method) or not re.search(rule.path, target):
                    continue
                digest = hashlib.sha256(f"{self.seed}|{i}|{key}".encode()).digest()
                if int.from_bytes(digest[:8], "big") / 2**64 >= rule.share:
                    continue
                if not rule.after <= attempt < rule.after + rule.times:
                    continue
                kinds = [k for k in rule.kinds if k != "cut" or method == "GET"] or ["internal"]
                kind = kinds[(digest[8] + attempt) % len(kinds)]
                self.injected[i] += 1
                self.kinds[kind] += 1
                return kind, rule.delay_s
        return None, 0.0

    def _handler_class(self):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _hang_up(self) -> None:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

            def _handle(self) -> None:
                body = self._body()
                kind, delay_s = proxy.decide(self.command, self.path)
                if proxy.latency_s:
                    time.sleep(proxy.latency_s)
                if kind == "stall":
                    proxy.stalled.set()
                    time.sleep(delay_s)
                    proxy.stalled.clear()
                    return self._hang_up()
                if kind == "drop":
                    return self._hang_up()
                if kind in _STATUS:
                    status, code, message = _STATUS[kind]
                    data = (
                        b""
                        if self.command == "HEAD"
                        else _ERROR_BODY.format(code=code, message=message).encode()
                    )
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers.pop("Content-Length", None)  # http.client sets it from the body
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    resp = upstream.getresponse()
                    data = resp.read()
                finally:
                    upstream.close()
                if kind == "lose":
                    return self._hang_up()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if kind == "cut" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    return self._hang_up()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a hung-up connection is the point, not news
