"""How inputs are recognised and named (`image_uri`), shared by planning, reading and the results' readers.

- An input is an image by its extension, any case (`IMAGE_EXTENSIONS`), or a `.tar` shard (WebDataset style).
- `image_uri` is the input as the user addressed it: `s3://bucket/key` for object stores, a local path stays local
  (relative to the working directory the job ran in if `--input` was relative).
- A tar member is `<shard uri>#<member name>`; the first `.tar#` splits the two (a member name may hold `#`), and
  `read_member` reads one by that name.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from typing import BinaryIO

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
TAR_EXTENSIONS = (".tar",)
TAR_MEMBER_SEP = "#"
_MEMBER = re.compile(re.escape(".tar" + TAR_MEMBER_SEP), flags=re.IGNORECASE)


def is_image_name(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_tar_name(name: str) -> bool:
    return name.lower().endswith(TAR_EXTENSIONS)


def member_uri(shard_uri: str, member: str) -> str:
    return f"{shard_uri}{TAR_MEMBER_SEP}{member}"


def split_tar_member(uri: str) -> tuple[str, str] | None:
    """`<shard>.tar#<member>` → `(shard, member)`; None for any other URI."""
    m = _MEMBER.search(uri)
    if m is None:
        return None
    return uri[: m.end() - len(TAR_MEMBER_SEP)], uri[m.end() :]


def read_member(shard: BinaryIO, member: str) -> bytes:
    """The bytes of `member` in the open `.tar` file `shard` (headers are read up to it); `FileNotFoundError` when
    the shard holds no such file."""
    with tarfile.open(fileobj=shard, mode="r:") as tf:
        try:
            extracted = tf.extractfile(member)
        except KeyError:
            raise FileNotFoundError(f"the shard holds no member {member!r}") from None
        if extracted is None:
            raise FileNotFoundError(f"{member!r} is not a file in the shard")
        return extracted.read()
