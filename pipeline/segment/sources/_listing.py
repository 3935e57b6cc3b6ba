"""Listing folders for the sources that the driver lists (folder, glob, a single file): never a silently skipped
folder, a deterministic order, several listings in flight."""

from __future__ import annotations

import collections
import concurrent.futures
import os
import posixpath
from collections.abc import Callable, Iterable, Iterator

import fsspec

from pipeline import retry
from pipeline.segment.naming import is_image_name, is_tar_name
from pipeline.segment.sources.base import InputRef
from pipeline.segment.storage import is_local, url_for
from pipeline.segment.units import Kind

# Folder listings in flight while planning: an object store lists 1,000 keys per request, so one prefix at a time
# would hold a large archive's planning to a few thousand keys per second.
LIST_THREADS = 16


def listing_fs(url: str, storage_options: dict | None):
    """(filesystem, path) for listing `url` without fsspec's listings cache: the cache would keep every folder
    ever listed, so planning a large archive would hold all of its names in memory."""
    return fsspec.core.url_to_fs(url, use_listings_cache=False, **(storage_options or {}))


def display_uri(fs, path: str, user_url: str) -> str:
    """How a listed path is named in outputs: protocol-qualified for remote stores, local paths as the user wrote
    them (relative to the working directory when the user's URL was relative)."""
    if is_local(fs):
        return os.path.relpath(path) if not os.path.isabs(user_url) and "://" not in user_url else path
    return fs.unstrip_protocol(path)


def classify(fs, path: str, user_url: str) -> InputRef | None:
    """An image or `.tar` file → its `InputRef`; other files met while walking (README, JSON annotations, ...) are
    not inputs (None)."""
    name = posixpath.basename(path)
    if is_image_name(name):
        return InputRef(Kind.FILES, url_for(fs, path), display_uri(fs, path, user_url))
    if is_tar_name(name):
        return InputRef(Kind.TARS, url_for(fs, path), display_uri(fs, path, user_url))
    return None


def classify_all(fs, paths: list[str], user_url: str) -> list[InputRef]:
    return [ref for p in paths if (ref := classify(fs, p, user_url)) is not None]


def list_folder(fs, folder: str) -> tuple[list[str], list[str]]:
    """(files, subfolders) directly in `folder`, each sorted.

    Every listing of inputs goes through here, not through fsspec's `walk`/`find`/`glob`: those skip a folder whose
    listing fails without a word (`on_error="omit"`, and `"raise"` does not reach subfolders), so a 5xx on one
    listing would drop that folder's images from the job, which would still call itself complete. Here a transient
    listing error is retried (`pipeline.retry`) and any other is raised.
    """
    here = folder.rstrip("/")
    files, folders = [], []
    for info in retry.call(fs.ls, folder, detail=True):
        name = info["name"].rstrip("/")
        if info["type"] == "directory":
            if name != here:  # some stores list the folder itself
                folders.append(name)
        else:
            files.append(name)
    return sorted(files), sorted(folders)


def traverse(
    fs,
    roots: list[tuple[str, object]],
    visit: Callable[[str, object, list[str], list[str]], tuple[Iterable[InputRef], list[tuple[str, object]]]],
    threads: int = LIST_THREADS,
    *,
    missing_ok: bool = False,
) -> Iterator[InputRef]:
    """Breadth-first over folders with `threads` listings in flight, in a deterministic order (queue order, not the
    order listings finish). `visit(folder, tag, files, subfolders)` returns the inputs to yield and the
    `(subfolder, tag)` pairs to list next. Memory: the queue of folder names and the listings in the window."""
    queue = collections.deque(roots)
    window: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="list") as pool:
        while queue or window:
            while queue and len(window) < 2 * max(1, threads):
                folder, tag = queue.popleft()
                window.append((folder, tag, pool.submit(list_folder, fs, folder)))
            folder, tag, listing = window.popleft()
            try:
                files, folders = listing.result()
            except FileNotFoundError:
                if not missing_ok:
                    raise
                continue  # a glob's root that does not exist, or a folder gone between two listings
            found, children = visit(folder, tag, files, folders)
            yield from found
            queue.extend(children)
