"""The deployment path end to end on this machine: a Ray cluster started the way deploy/ starts one (a head with no
CPUs for tasks, one worker node, token authentication), the segment job submitted with `ray job submit` and
deploy/runtime_env.yaml, reading its images from and writing its results to S3 (moto's server on 127.0.0.1).

Every process is started here, in sessions of this test's own, with a private RAY_TMPDIR and HOME (so the token is
this cluster's, never the machine's ~/.ray/auth_token), on free ports; they are stopped by process id in a finally.
Never `ray stop`: it stops every Ray on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import s3fs

from tests.conftest import TINY_MODEL
from tests.deploy.files import DEPLOY, ROOT, readme_segment_command
from tests.reliability.segment_job import assert_exactly_once
from tests.support.images import jpeg_bytes
from tests.support.s3 import free_port

RAY = str(Path(sys.executable).with_name("ray"))
LIMIT = 5 * 1024 * 1024


class LocalCluster:
    """`ray start --head --num-cpus 0` plus one `ray start --address ... --num-cpus 2` node, token auth on."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(
            prefix="rd-"
        )  # short: Ray's socket paths below it must stay under ~107 chars
        home = os.path.join(self.tmp, "home")
        os.mkdir(home)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        self.env = {**env, "RAY_TMPDIR": self.tmp, "HOME": home, "RAY_AUTH_MODE": "token"}
        # The entrypoint's `python` is the one on PATH, as in the image: this interpreter's environment.
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        self.sessions: list[int] = []
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def ray(self, *args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        """A `ray` CLI command in a session of its own (the daemons it starts stay in it, to be stopped by id)."""
        proc = subprocess.Popen(
            [RAY, *args],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            **kw,
        )
        self.sessions.append(proc.pid)
        out, _ = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out)

    def start(self) -> None:
        # As on a real cluster (docs/deploy.md): one token, generated once, that every node and client uses.
        r = self.ray("get-auth-token", "--generate")
        assert r.returncode == 0, r.stdout
        common = ["--object-store-memory", str(200 << 20), "--disable-usage-stats"]
        head = self.ray(
            "start",
            "--head",
            "--num-cpus",
            "0",
            f"--port={self.gcs_port}",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            *common,
        )
        assert head.returncode == 0, head.stdout
        worker = self.ray(
            "start",
            f"--address=127.0.0.1:{self.gcs_port}",
            "--num-cpus",
            "2",
            f"--dashboard-agent-listen-port={free_port()}",
            *common,
        )
        assert worker.returncode == 0, worker.stdout

    def processes(self) -> list[psutil.Process]:
        """Live processes of the sessions started here, or naming this cluster's temp dir."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid == os.getpid():
                    continue
                if os.getsid(p.pid) in self.sessions or any(self.tmp in a for a in p.info["cmdline"] or ()):
                    found.append(p)
            except (ProcessLookupError, psutil.Error):
                continue
        return found

    def stop(self) -> None:
        """SIGTERM every process of this cluster, SIGKILL what is left after 15 s; remove its temp dir."""
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive + self.processes():
            try:
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def test_segment_job_submitted_to_a_cluster_shaped_like_deploy(s3):
    fs, bucket, endpoint = s3
    uris = []
    for i in range(4):
        fs.pipe(f"{bucket}/photos/{i:02d}.jpg", jpeg_bytes(64, 80, seed=i))
        uris.append(f"s3://{bucket}/photos/{i:02d}.jpg")
    # The README's command with the test's bucket, plus what this machine needs: the tiny model, moto's endpoint
    # (credentials come from the nodes' environment, as from an instance profile), small units.
    command = readme_segment_command()
    assert command[:2] == ["python", "jobs/segment_archive.py"]
    command = [*command[:2], "--input", f"s3://{bucket}/photos/", "--output", f"s3://{bucket}/segments/"]
    sets = [f"model.{k}={v}" for k, v in TINY_MODEL.items()] + [
        f"input.storage.endpoint_url={endpoint}",
        f"output.storage.endpoint_url={endpoint}",
        "input.unit_size=2",
        "model.batch_size=1",
    ]
    command += [a for s in sets for a in ("--set", s)]
    submission = f"deploy-test-{uuid.uuid4().hex[:8]}"

    cluster = LocalCluster()
    try:
        cluster.start()
        # The excludes must hold without .gitignore's help (a clone may have another one).
        cluster.env["RAY_RUNTIME_ENV_IGNORE_GITIGNORE"] = "1"
        args = ["--address", cluster.dashboard, "--runtime-env", str(DEPLOY / "runtime_env.yaml")]
        t0 = time.monotonic()
        job = cluster.ray("job", "submit", *args, "--submission-id", submission, "--", *command, timeout=300)
        took = time.monotonic() - t0
        assert job.returncode == 0, job.stdout[-6000:]
        status = cluster.ray("job", "status", "--address", cluster.dashboard, submission)
        assert f"Job '{submission}' succeeded" in status.stdout, status.stdout  # its status is SUCCEEDED
        assert "planned 4 inputs in 2 units" in job.stdout, job.stdout[-3000:]
        # What reached the cluster as the job's working_dir: Ray unpacks the upload on the node that runs it.
        unpacked = [
            d
            for d in Path(cluster.tmp).glob("ray/session_*/runtime_resources/working_dir_files/*")
            if d.is_dir()
        ]
        assert unpacked, "no working_dir package on the cluster"
        for d in unpacked:
            files = [f for f in d.rglob("*") if f.is_file()]
            assert sum(f.stat().st_size for f in files) < LIMIT  # unzipped: the zip is smaller still
            tops = {f.relative_to(d).parts[0] for f in files}
            assert "jobs" in tops and not tops & {".git", ".venv", "demo", "tests"}, tops
    finally:
        cluster.stop()
    print(f"ray job submit took {took:.0f} s")

    s3fs.S3FileSystem.clear_instance_cache()
    assert fs.exists(f"{bucket}/segments/_SUCCESS.json")
    rows = assert_exactly_once(f"{bucket}/segments", uris, filesystem=fs)
    assert {r["status"] for r in rows.values()} == {"ok"}
