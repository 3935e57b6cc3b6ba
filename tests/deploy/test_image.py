"""deploy/Dockerfile against the repository: its base is a tag Ray publishes for the pinned Ray, and its install is
the README's (same pip spec, every pin from pyproject.toml, nothing pinned twice). Building the image is not run
here (no Docker, no network)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from tests.deploy.files import DEPLOY, ROOT, pinned, readme, readme_install

DOCKERFILE = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
# Ray's own build matrix for rayproject/ray (vendored; its source and commit are inside the file).
RAY_IMAGES = json.loads((Path(__file__).parent / "ray-images.json").read_text(encoding="utf-8"))["ray"]


def base_image() -> str:
    default = re.search(r"^ARG RAY_IMAGE=(\S+)$", DOCKERFILE, re.MULTILINE).group(1)
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", DOCKERFILE, re.MULTILINE)
    return default


def ray_published_tags(version: str) -> set[str]:
    """Every rayproject/ray tag Ray's build matrix makes for `version` on x86_64 (ci/ray_ci: cuX.Y.Z-.. -> cuXY)."""

    def platform_tag(p: str) -> str:
        return p if p in ("cpu", "tpu") else "".join(p.split("-")[0].split(".")[:2])

    return {
        f"{version}-py{py.replace('.', '')}-{platform_tag(p)}"
        for py in RAY_IMAGES["python"]
        for p in RAY_IMAGES["platforms"]
    }


def test_base_is_a_tag_ray_publishes_for_the_pinned_ray():
    repo, _, tag = base_image().partition(":")
    assert repo == "rayproject/ray"
    assert tag in ray_published_tags(pinned("ray"))
    m = re.fullmatch(r"[\d.]+-py3(\d+)-(\w+)", tag)
    lowest = re.search(r'requires-python = ">=3\.(\d+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert int(m.group(1)) >= int(lowest)
    # The package index's torch is built for CUDA 13.0 (README): the CUDA base image matches it.
    assert "CUDA 13.0" in readme() and m.group(2) == "cu130"


def pip_installs() -> list[list[str]]:
    runs = re.findall(r"^RUN (.*pip install .*)$", DOCKERFILE, re.MULTILINE)
    # The optional CUDA 12 index (`${TORCH_INDEX_URL:+--extra-index-url ...}`) is empty by default.
    return [shlex.split(re.sub(r"\$\{TORCH_INDEX_URL:\+[^}]*\}", "", r).split("pip ", 1)[1]) for r in runs]


def split_spec(spec: str) -> tuple[str, set[str]]:
    path, _, extras = spec.partition("[")
    return path, set(filter(None, extras.rstrip("]").split(",")))


def test_the_install_is_the_readmes_without_the_test_extra():
    (image,) = pip_installs()
    readme_args = readme_install()
    readme_path, readme_extras = split_spec(readme_args[-1])
    image_path, image_extras = split_spec(image[-1])
    assert (image_path, "-e" in image) == (readme_path, "-e" in readme_args)
    assert image_extras <= readme_extras - {"test"}
    # Every version comes from pyproject.toml (torch/torchvision as a pair, ray as the base image's): none here.
    assert not re.search(r"==|torch|torchvision", " ".join(image))


def test_the_image_holds_every_package_and_the_build_context_sends_them():
    include = re.search(r"^include = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    packages = {p.strip(' "*') for p in include.split(",")}
    copied = set(re.findall(r"^COPY --chown=ray:users (\w+) \./\1$", DOCKERFILE, re.MULTILINE))
    assert packages | {"configs"} <= copied
    skeleton = re.search(r"^RUN mkdir -p (.*&& touch .*)$", DOCKERFILE, re.MULTILINE).group(1)
    assert all(f"{p}/__init__.py" in skeleton for p in packages)  # pip must find the packages before the code
    ignore = [
        line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if line[:1] not in "#"
    ]
    assert ignore[0] == "*"  # nothing is sent but what is allowed back: never .venv, demo/ or .git
    assert {f"!{d}/" for d in copied} | {"!pyproject.toml", "!README.md"} <= set(ignore)
