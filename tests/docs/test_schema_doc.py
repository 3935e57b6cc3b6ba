"""docs/output-schema.md lists every column of the two output tables, in schema order, with its Arrow type.

A type is written as one code span holding `str(field.type)`, pyarrow's own name (`float` is 32-bit).
"""

from __future__ import annotations

import pytest

from pipeline.segment import schema
from tests.docs.markdown import ROOT, code, section, tables

DOC = ROOT / "docs" / "output-schema.md"


@pytest.mark.parametrize(
    "heading, schema_name", [("`images/`", "IMAGES_SCHEMA"), ("`detections/`", "DETECTIONS_SCHEMA")]
)
def test_doc_lists_the_schema_columns_in_order_with_their_types(heading, schema_name):
    found = tables(section(DOC.read_text(encoding="utf-8"), heading))
    assert len(found) == 1, f"one table under '## {heading}'"
    header, body = found[0]
    assert header == ["column", "type", "meaning"]
    documented = [(code(row[0]), code(row[1])) for row in body]
    expected = [(field.name, str(field.type)) for field in getattr(schema, schema_name)]
    assert documented == expected
    assert all(row[2] for row in body), "every column has a meaning"
