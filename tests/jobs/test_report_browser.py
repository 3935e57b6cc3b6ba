"""`jobs/query.py RESULTS report` opened in a real headless Chromium from disk (file://, no server): every picture
loads, and the screenshot shows the page (text, the SVG bar charts, the pictures), not a blank or broken one.

Needs the `chromium` binary (Debian's package; .ci/run installs it where it can); skipped without it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.pipeline.results.test_report import build_report_results

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WIDTH, HEIGHT = 1280, 2000
BAR_BLUE, BAR_RED = (31, 119, 180), (214, 39, 40)  # the template's label and error bars


def chromium(*args: str, profile: str) -> subprocess.CompletedProcess:
    # A profile of its own: no lock shared with another Chromium, nothing read from the user's.
    return subprocess.run(
        [
            shutil.which("chromium"),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    if shutil.which("chromium") is None:
        # A browser is an OS package, not a pip dependency: .ci/run installs it where apt and root are available
        # (so it runs in CI here); elsewhere the rest of the report is still tested by test_report.py.
        pytest.skip("chromium not installed: apt-get install chromium")
    root = tmp_path_factory.mktemp("browser")
    built = build_report_results(str(root))
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "jobs", "query.py"),
            built["out"],
            "report",
            "--output",
            str(root / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip().splitlines()[-1]
    assert path == str(root / "r" / "index.html")
    return root, path


def test_every_picture_loads(page):
    root, path = page
    r = chromium("--dump-dom", f"file://{path}", profile=str(root / "profile-dom"))
    assert r.returncode == 0, r.stderr[-2000:]
    body = re.search(r"<body[^>]*>", r.stdout)
    assert body, r.stdout[:500]
    # Set by the page's own script on `load`: pictures complete with a natural width.
    loaded = re.search(r'data-images-loaded="(\d+)"', body.group(0))
    total = re.search(r'data-images-total="(\d+)"', body.group(0))
    assert loaded and total, body.group(0)
    assert int(loaded.group(1)) == int(total.group(1)) == 4  # 5 in the sample, one whose file is gone
    # The markup in names and messages stayed text: no element of its own in the browser's DOM.
    assert r.stdout.count("<script") == 1 and 'src="x"' not in r.stdout and "<b>bold" not in r.stdout


def test_screenshot_shows_the_page(page):
    root, path = page
    shot = root / "shot.png"
    r = chromium(
        f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", f"file://{path}", profile=str(root / "p2")
    )
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (HEIGHT, WIDTH, 3)
    packed = (
        (pixels[..., 0].astype(np.uint32) << 16) | (pixels[..., 1].astype(np.uint32) << 8) | pixels[..., 2]
    )
    # The pictures bring ~10^5 colours; the same page whose pictures failed has ~1,500 (antialiased text), a
    # blank one a handful.
    assert len(np.unique(packed)) > 20_000
    dark = pixels.max(axis=-1) < 100
    assert dark[:300].mean() > 0.002  # the header's text
    # The SVG charts drew their bars (solid fills in the template's colours).
    assert (pixels == BAR_BLUE).all(axis=-1).sum() > 500 and (pixels == BAR_RED).all(axis=-1).sum() > 500
