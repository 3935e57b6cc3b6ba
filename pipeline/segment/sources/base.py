"""What every source yields (`InputRef`) and what a source read by Ray tasks hands them (`Part`)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from typing import Protocol

from pipeline.segment.units import Kind


@dataclasses.dataclass(frozen=True)
class InputRef:
    """One input as planned: a loose image file (`Kind.FILES`) or a `.tar` shard (`Kind.TARS`)."""

    kind: Kind
    read_url: (
        str  # absolute, protocol-qualified (plain absolute path for local files); `<shard>#<member>` for a
    )
    #                tar member named on its own by a manifest
    image_uri: str  # as the user addressed it (see `pipeline.segment.naming`)


class Part(Protocol):
    """One file that lists inputs, read by one Ray task (picklable)."""

    url: str

    def read(self, *, storage_options: dict | None, skipped: Counter) -> Iterator[InputRef]: ...
