"""Reading the Markdown tables and links of the docs, for the tests that hold the docs to the code."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def section(text: str, heading: str) -> str:
    """The text under the level-2 heading `## <heading>`, up to the next level-2 heading."""
    lines = text.splitlines()
    try:
        start = lines.index(f"## {heading}") + 1
    except ValueError:
        raise AssertionError(f"no heading '## {heading}'") from None
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end])


def cells(line: str) -> list[str]:
    """The cells of one table row; a `|` inside backticks belongs to its cell."""
    out, cell, in_code = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            out.append(cell.strip())
            cell = ""
        else:
            cell += ch
    return [*out, cell.strip()]


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every table in `text`: (header cells, rows of cells), the separator row dropped."""
    found, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(cells(line))
        elif block:
            found.append((block[0], block[2:]))
            block = []
    return found


def code(cell: str) -> str:
    """The text of a cell that must be one code span, e.g. "`model.device`" -> "model.device"."""
    assert re.fullmatch(r"`[^`]+`", cell), f"expected one `code` span, got {cell!r}"
    return cell[1:-1]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.MULTILINE)}
