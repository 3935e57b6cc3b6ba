"""Input sources: one module per form of `--input`, asked in order by the planner.

Each source is an object with a `name` and `claims(target) -> bool`, and one of two ways to yield inputs:
- `list_inputs(target, skipped=...)`: listed on the driver, streaming (folders, globs, a single file);
- `parts(target)`: the files that list the inputs (a manifest, an S3 Inventory report's data files), each a
  picklable object with `read(storage_options=..., skipped=...)`, read by one Ray task each in parallel.

To add a source (a Lance or Hugging Face dataset of URLs, a GCS inventory, a database query): write one module
here with such an object and put it in `SOURCES` before the catch-all manifest.

Every source yields `InputRef`s in a deterministic order; `pipeline.segment.plan` groups them into work units.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Iterator
from typing import Protocol

from pipeline.segment.sources import files, folder, glob, inventory, manifest
from pipeline.segment.sources._listing import listing_fs
from pipeline.segment.sources.base import InputRef, Part

__all__ = ["InputRef", "Part", "Source", "Target", "SOURCES", "find_source", "iter_inputs"]


class Target:
    """`--input` as the sources see it: the URL, its filesystem and path (no listings cache: it would keep every
    folder ever listed, so planning a large archive would hold all of its names in memory), and what is there
    (asked once, when a source first needs it)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url, self.storage_options = url, dict(storage_options or {})
        self.fs, self.path = listing_fs(url, storage_options)

    @functools.cached_property
    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    @functools.cached_property
    def is_file(self) -> bool:
        return not self.is_dir and self.fs.isfile(self.path)


class Source(Protocol):
    name: str

    def claims(self, target: Target) -> bool: ...


# In order: the first source that claims a target plans it. The manifest is the catch-all for any other file.
SOURCES: tuple[Source, ...] = (
    glob.SOURCE,
    folder.SOURCE,
    files.SOURCE,
    inventory.SOURCE,
    manifest.SOURCE,
)


@dataclasses.dataclass(frozen=True)
class Found:
    source: Source
    target: Target

    @property
    def in_tasks(self) -> bool:
        """Whether its inputs come from parts read by Ray tasks (else the driver lists them)."""
        return hasattr(self.source, "parts")


def find_source(url: str, *, storage_options: dict | None = None) -> Found:
    """The source that plans `url`; `FileNotFoundError` when nothing is there."""
    target = Target(url, storage_options)
    for source in SOURCES:
        if source.claims(target):
            return Found(source, target)
    raise FileNotFoundError(f"no such file, folder or prefix: {url}")


def iter_inputs(
    url: str, *, storage_options: dict | None = None, skipped: Counter | None = None
) -> Iterator[InputRef]:
    """The inputs behind `url`, in the order the job plans them, without Ray: a source read by Ray tasks in the job
    is read here one part after another. A file named twice by a manifest comes once (counted in `skipped`)."""
    skipped = Counter() if skipped is None else skipped
    found = find_source(url, storage_options=storage_options)
    if not found.in_tasks:
        yield from found.source.list_inputs(found.target, skipped=skipped)
        return
    for part in found.source.parts(found.target):
        yield from part.read(storage_options=storage_options, skipped=skipped)
