"""A glob (`s3://bucket/2024-*/cam1/*.jpg`): the matching images and shards; a matched folder is walked whole.
Listed on the driver."""

from __future__ import annotations

import re

from fsspec.utils import glob_translate

from pipeline.segment.sources._listing import classify_all, traverse


def has_magic(path: str) -> bool:
    return any(ch in path for ch in "*?[")


class Glob:
    name = "glob"

    def claims(self, target) -> bool:
        return has_magic(target.path)

    def list_inputs(self, target, *, skipped):
        """fsspec's glob semantics (`*`, `?`, `[...]` within one path segment, `**` across segments), but listed
        with `list_folder`: never a silently skipped folder.

        Listing starts at the deepest folder without magic characters and descends only into folders that can
        still match (`s3://b/2024-*/cam1/*.jpg` never lists `b/2023-01/`); from a `**` segment on, everything is
        listed. Once a folder matches, its contents come from its walk, so an input below it (`a/**` matches `a/x`
        and `a/x/y.jpg`) comes once.
        """
        fs, pattern, user_url = target.fs, target.path, target.url
        parts = pattern.rstrip("/").split("/")
        fixed = next(i for i, part in enumerate(parts) if has_magic(part))
        root = "/".join(parts[:fixed]) or ("/" if pattern.startswith("/") else "")
        depth = len(parts) - fixed  # levels below root that the pattern spans
        # The level (1-based) of the first `**` segment; below it any folder may hold matches.
        deep = next((k for k, part in enumerate(parts[fixed:], 1) if "**" in part), None)
        # Above it, a folder at level k is worth listing only if it matches the pattern's first k segments.
        prefixes = [re.compile(glob_translate("/".join(parts[: fixed + k]))) for k in range(1, depth)]
        full = re.compile(glob_translate(pattern.rstrip("/")))

        def visit(folder, level, files, folders):
            if level == "walk":
                return classify_all(fs, files, user_url), [(d, "walk") for d in folders]
            found = classify_all(fs, [f for f in files if full.match(f)], user_url)
            children = []
            for d in folders:  # d is at level + 1
                if full.match(d):
                    children.append((d, "walk"))
                elif (deep is not None and level + 1 >= deep) or (
                    level + 1 < depth and prefixes[level].match(d)
                ):
                    children.append((d, level + 1))
            return found, children

        yield from traverse(fs, [(root, 0)], visit, missing_ok=True)


SOURCE = Glob()
