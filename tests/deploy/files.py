"""What the deploy tests read: the files in deploy/, the README's commands and pyproject.toml's pins."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def load_yaml(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text(encoding="utf-8"))


def pinned(name: str) -> str:
    """The version pyproject.toml pins `name` to (`"name[extras]==X"` -> X); fails if it is not pinned exactly.
    (Read as text: tomllib is Python 3.11+, and the project supports 3.10.)"""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    m = re.search(rf'^\s*"{re.escape(name)}(\[[^\]]*\])?==([\w.]+)",', text, re.MULTILINE)
    assert m, f"pyproject.toml does not pin {name} with =="
    return m.group(2)


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def readme_segment_command() -> list[str]:
    """The segment command the README submits to a cluster (the line after `ray job submit ... -- \\`), as argv."""
    lines = readme().splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith("ray job submit") and line.rstrip().endswith("-- \\"):
            return shlex.split(lines[i + 1])
    raise AssertionError("README.md has no `ray job submit ... -- \\` block")


def readme_install() -> list[str]:
    """The README's install command (`... pip install ...`), as argv after `pip`."""
    for line in readme().splitlines():
        m = re.search(r"\bpip install (.*?)(\s+#.*)?$", line)
        if m and "venv" in line:
            return ["install", *shlex.split(m.group(1))]
    raise AssertionError("README.md has no pip install line")


def all_images(obj) -> list[str]:
    """Every `image:` value anywhere in a loaded manifest."""
    if isinstance(obj, dict):
        found = [obj["image"]] if isinstance(obj.get("image"), str) else []
        return found + [i for v in obj.values() for i in all_images(v)]
    if isinstance(obj, list):
        return [i for v in obj for i in all_images(v)]
    return []
