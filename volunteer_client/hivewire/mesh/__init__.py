"""The mesh transport: ICE configuration, per-link control and bulk channels, payload framing."""

from hivewire.mesh.control import ControlCodec, RecordSchema
from hivewire.mesh.errors import ControlRecordError, FramingError, IceConfigError, LinkError, MeshError
from hivewire.mesh.framing import FramingLimits, PayloadDecoder, encode_payload
from hivewire.mesh.ice import build_configuration, restrict_host_addresses
from hivewire.mesh.link import Link, LinkSettings, LinkStats

__all__ = [
    "ControlCodec",
    "ControlRecordError",
    "FramingError",
    "FramingLimits",
    "IceConfigError",
    "Link",
    "LinkError",
    "LinkSettings",
    "LinkStats",
    "MeshError",
    "PayloadDecoder",
    "RecordSchema",
    "build_configuration",
    "encode_payload",
    "restrict_host_addresses",
]
