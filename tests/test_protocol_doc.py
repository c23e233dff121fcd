"""docs/protocol.md names every control record a peer accepts, with every field: the reference cannot drift."""

from pathlib import Path

import pytest

from hivewire.coordination.records import COORDINATION_SCHEMAS
from hivewire.doctor import PROBE_SCHEMAS
from hivewire.mesh.control import LINK_SCHEMAS, RecordSchema
from hivewire.mesh.relay import MESH_SCHEMAS
from hivewire.session.receipts import RECEIPT_SCHEMAS
from hivewire.session.state import STATE_SCHEMAS

PROTOCOL = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
SCHEMAS = (*LINK_SCHEMAS, *MESH_SCHEMAS, *COORDINATION_SCHEMAS, *STATE_SCHEMAS, *RECEIPT_SCHEMAS, *PROBE_SCHEMAS)


def table_rows() -> list[list[str]]:
    """The cells of every Markdown table row in the protocol reference."""
    rows = []
    for line in PROTOCOL.read_text(encoding="utf-8").splitlines():
        if line.startswith("|") and line.endswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda schema: schema.type)
def test_every_record_type_has_a_row_naming_all_its_fields(schema: RecordSchema) -> None:
    rows = [row for row in table_rows() if len(row) >= 2 and f"`{schema.type}`" in row[0]]
    assert rows, f"docs/protocol.md has no table row for the {schema.type!r} record"
    documented = [row for row in rows if all(f"`{name}`" in row[1] for name in schema.fields if name != "type")]
    missing = sorted(name for name in schema.fields if name != "type" and not any(f"`{name}`" in r[1] for r in rows))
    assert documented, f"the {schema.type!r} rows of docs/protocol.md do not name the fields {missing}"
