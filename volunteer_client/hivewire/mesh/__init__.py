"""The mesh: neighbour links opened through signed signaling, ICE configuration, control and bulk channels."""

from hivewire.mesh.control import ControlCodec, RecordSchema
from hivewire.mesh.direct import DirectEndpoint, DirectSettings
from hivewire.mesh.errors import ControlRecordError, FramingError, IceConfigError, LinkError, MeshError
from hivewire.mesh.framing import FramingLimits, PayloadDecoder, encode_payload
from hivewire.mesh.ice import build_configuration, restrict_host_addresses
from hivewire.mesh.link import Link, LinkSettings, LinkStats
from hivewire.mesh.manager import Mesh, MeshSettings, MeshStats
from hivewire.mesh.paths import NoSignalingPath

__all__ = [
    "ControlCodec",
    "ControlRecordError",
    "DirectEndpoint",
    "DirectSettings",
    "FramingError",
    "FramingLimits",
    "IceConfigError",
    "Link",
    "LinkError",
    "LinkSettings",
    "LinkStats",
    "Mesh",
    "MeshError",
    "MeshSettings",
    "MeshStats",
    "NoSignalingPath",
    "PayloadDecoder",
    "RecordSchema",
    "build_configuration",
    "encode_payload",
    "restrict_host_addresses",
]
