"""A real S3 API on loopback, the way s3fs tests itself: moto's server on 127.0.0.1, and s3fs filesystems on it.

Endpoints are `http://127.0.0.1:<port>`. moto accepts any credentials, but botocore wants some: the callers set
dummy `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` in the environment (tests/conftest.py, bench/scale.py).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the time of the call."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_in_thread() -> Iterator[str]:
    """moto's S3 server on threads of this process, empty; yields its endpoint."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


# moto's server in a process of its own, populated in memory before it serves: uploading 10^5 objects through HTTP
# would take minutes (moto answers a few hundred PUTs a second on a small machine).
_MOTO = """
import json, sys, threading
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import ThreadedMotoServer

port, spec = int(sys.argv[1]), json.loads(sys.stdin.readline())
backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
for bucket, keys in spec.items():
    backend.create_bucket(bucket, "us-east-1")
    for key in keys:
        backend.put_object(bucket, key, b"not a jpeg")
server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
server.start()
print("READY", flush=True)
sys.stdin.read()  # until the caller closes it
server.stop()
"""


@contextlib.contextmanager
def moto_in_process(objects: dict[str, list[str]] | None = None) -> Iterator[str]:
    """moto's S3 server in a process of its own (its CPU is not the caller's), holding `objects`
    ({bucket: [key, ...]}, 10 bytes each, non-image bytes); yields its endpoint."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _MOTO, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        proc.stdin.write(json.dumps(objects or {}) + "\n")
        proc.stdin.flush()
        if proc.stdout.readline().strip() != "READY":
            raise SystemExit("the moto server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def s3_filesystem(endpoint: str, **options):
    """An `s3fs.S3FileSystem` on `endpoint`; `options` go to its constructor (e.g. `skip_instance_cache=True`)."""
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, **options)
