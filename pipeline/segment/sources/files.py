"""One image file, or one `.tar` shard (each image member one input). Listed on the driver."""

from __future__ import annotations

import posixpath

from pipeline.segment.naming import is_image_name, is_tar_name
from pipeline.segment.sources._listing import classify


class SingleFile:
    name = "file"

    def claims(self, target) -> bool:
        name = posixpath.basename(target.path)
        return (is_image_name(name) or is_tar_name(name)) and target.is_file

    def list_inputs(self, target, *, skipped):
        yield classify(target.fs, target.path, target.url)


SOURCE = SingleFile()
