"""A failing job's reason is the last line it prints, even while Ray is still forwarding output from its processes.

Seen in CI: on a disk over 95% full the raylet logs a warning every 10 s, and the driver printed it after the
job's `error: ...` line, so the user (and any script reading the last line) got Ray's noise instead of the reason.
"""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A job shaped like ours (jobs/_cli.py's init_ray + run_main), whose Ray worker writes to stderr non-stop while
# the driver fails: without shutting Ray down before the failure line, forwarded lines land after it.
NOISY_JOB = textwrap.dedent(
    f"""
    import sys, time
    sys.path.insert(0, {os.path.join(ROOT, "jobs")!r})
    from _cli import init_ray, run_main
    from pipeline.errors import JobError

    def main():
        import ray
        init_ray()

        @ray.remote(num_cpus=0)
        class Chatter:
            def talk(self):
                while True:
                    print("(noise from a Ray worker)", file=sys.stderr, flush=True)
                    time.sleep(0.002)

        chatter = Chatter.remote()
        chatter.talk.remote()
        time.sleep(4)  # forwarded noise is flowing
        raise JobError("storage endpoint unreachable (the reason)")

    run_main(main)
    """
)


def test_the_failure_line_is_printed_last_after_ray_stops():
    r = subprocess.run(
        [sys.executable, "-c", NOISY_JOB], capture_output=True, text=True, timeout=180, cwd=ROOT
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr[-2000:]
    assert any("noise from a Ray worker" in line for line in lines), "the worker's output was not forwarded"
    assert lines[-1] == "error: storage endpoint unreachable (the reason)", lines[-5:]
    assert "Traceback" not in r.stderr
