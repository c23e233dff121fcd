"""Control-channel records: small msgpack maps with a ``type`` and a fixed set of typed fields per type.

Every record from a peer is hostile until :meth:`ControlCodec.decode` accepted it: bounded size, a map with
string keys, a known ``type``, exactly the fields its schema declares, each of an allowed type (exact
types, so ``True`` is not an int), then the schema's own check. Outgoing records pass the same validation,
so a bug on our side fails here instead of at the peer. The transport (link.py) only moves bytes.
"""

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from hivewire.mesh.errors import ControlRecordError

MAX_CONTROL_RECORD_BYTES = 64 * 1024
MAX_UINT63 = 2**63 - 1
# direct_hello bounds (docs/protocol.md, "Direct TLS path"): an aiortc certificate is ~400 bytes of DER.
MAX_DIRECT_CERT_BYTES = 4096
MAX_DIRECT_ADDRESSES = 8
_DIRECT_TOKEN = re.compile(r"[0-9a-f]{32}")

FieldTypes = type | tuple[type, ...]
RecordCheck = Callable[[Mapping[str, Any]], None]


def _check_uint63(*names: str) -> RecordCheck:
    """A record check that the named integer fields lie in 0..2**63-1."""

    def check(record: Mapping[str, Any]) -> None:
        for name in names:
            if not 0 <= record[name] <= MAX_UINT63:
                raise ControlRecordError(f"{record['type']}.{name}: {record[name]} is outside 0..{MAX_UINT63}")

    return check


@dataclass(frozen=True)
class RecordSchema:
    """One record type: its name, its fields (all required, no others) and an optional extra check."""

    type: str
    fields: Mapping[str, FieldTypes]
    check: RecordCheck | None = field(default=None, compare=False)


def _check_direct_hello(record: Mapping[str, Any]) -> None:
    """A direct_hello: a certificate of bounded size, a 128-bit hex token, a few ``[ip, tcp port]`` pairs."""
    if not 0 < len(record["cert"]) <= MAX_DIRECT_CERT_BYTES:
        raise ControlRecordError(f"direct_hello.cert: {len(record['cert'])} bytes, expected 1..{MAX_DIRECT_CERT_BYTES}")
    if _DIRECT_TOKEN.fullmatch(record["token"]) is None:
        raise ControlRecordError("direct_hello.token: expected 32 lowercase hex digits")
    addresses = record["addresses"]
    if len(addresses) > MAX_DIRECT_ADDRESSES:
        raise ControlRecordError(f"direct_hello.addresses: {len(addresses)} entries, at most {MAX_DIRECT_ADDRESSES}")
    for entry in addresses:
        if not (isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is str and type(entry[1]) is int):
            raise ControlRecordError(f"direct_hello.addresses: expected [ip, port] pairs, got {entry!r:.80}")
        try:
            ipaddress.ip_address(entry[0])
        except ValueError:
            raise ControlRecordError(f"direct_hello.addresses: {entry[0]!r:.60} is not an IP address") from None
        if not 1 <= entry[1] <= 65535:
            raise ControlRecordError(f"direct_hello.addresses: port {entry[1]} is outside 1..65535")


# Records the link itself exchanges; the mesh layer registers its own (gossip, RPC) next to them.
PING = RecordSchema("ping", {"nonce": int}, _check_uint63("nonce"))
PONG = RecordSchema("pong", {"nonce": int}, _check_uint63("nonce"))
BULK_RELEASE = RecordSchema("bulk_release", {"payload_id": int}, _check_uint63("payload_id"))
BULK_REFUSED = RecordSchema("bulk_refused", {"payload_id": int, "reason": str}, _check_uint63("payload_id"))
# The direct TLS path (direct.py): each side's pinned certificate, token and listening addresses, and a
# dialer's word that it could not reach the other side (which then dials back).
DIRECT_HELLO = RecordSchema("direct_hello", {"cert": bytes, "token": str, "addresses": list}, _check_direct_hello)
DIRECT_UNREACHABLE = RecordSchema("direct_unreachable", {"tried": int}, _check_uint63("tried"))
LINK_SCHEMAS = (PING, PONG, BULK_RELEASE, BULK_REFUSED, DIRECT_HELLO, DIRECT_UNREACHABLE)


class ControlCodec:
    """Encode and validate control records against registered schemas."""

    def __init__(
        self, schemas: Iterable[RecordSchema] = (), *, max_record_bytes: int = MAX_CONTROL_RECORD_BYTES
    ) -> None:
        self._schemas: dict[str, RecordSchema] = {}
        self.max_record_bytes = max_record_bytes
        for schema in (*LINK_SCHEMAS, *schemas):
            self.register(schema)

    def register(self, schema: RecordSchema) -> None:
        """Add a record type; registering a name twice is a programming error."""
        if schema.type in self._schemas:
            raise ValueError(f"control record type {schema.type!r} is already registered")
        if "type" in schema.fields:
            raise ValueError(f"control record type {schema.type!r} must not declare a 'type' field")
        self._schemas[schema.type] = schema

    def encode(self, record: Mapping[str, Any]) -> bytes:
        """Validate and pack one record; raise ControlRecordError if it would be refused by a peer."""
        self.validate(record)
        data: bytes = msgpack.packb(dict(record), use_bin_type=True)
        if len(data) > self.max_record_bytes:
            raise ControlRecordError(
                f"{record['type']} record packs to {len(data)} bytes, the limit is {self.max_record_bytes}"
            )
        return data

    def decode(self, data: bytes | str) -> dict[str, Any]:
        """Unpack and validate one record from a peer; raise ControlRecordError when it is refused."""
        if not isinstance(data, bytes):
            raise ControlRecordError(f"expected a binary msgpack record, got {type(data).__name__}")
        if len(data) > self.max_record_bytes:
            raise ControlRecordError(f"record of {len(data)} bytes exceeds the limit of {self.max_record_bytes}")
        try:
            record = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ControlRecordError(f"not a msgpack record: {exc}") from exc
        self.validate(record)
        return record

    def validate(self, record: Any) -> None:
        """Check a record against its schema (exact field set, exact types, then the schema's check)."""
        if not isinstance(record, Mapping):
            raise ControlRecordError(f"expected a map, got {type(record).__name__}")
        kind = record.get("type")
        schema = self._schemas.get(kind) if isinstance(kind, str) else None
        if schema is None:
            raise ControlRecordError(f"unknown record type {kind!r}; known: {sorted(self._schemas)}")
        fields = set(record) - {"type"}
        if fields != set(schema.fields):
            missing, extra = set(schema.fields) - fields, fields - set(schema.fields)
            raise ControlRecordError(f"{kind}: missing fields {sorted(missing)}, unexpected {sorted(map(str, extra))}")
        for name, allowed in schema.fields.items():
            allowed_types = allowed if isinstance(allowed, tuple) else (allowed,)
            if type(record[name]) not in allowed_types:
                expected = " or ".join(t.__name__ for t in allowed_types)
                raise ControlRecordError(f"{kind}.{name}: expected {expected}, got {type(record[name]).__name__}")
        if schema.check is not None:
            schema.check(record)
