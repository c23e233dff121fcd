"""Errors of the mesh transport.

    MeshError
    ├── IceConfigError      ICE server list or host-address setting refused
    ├── FramingError        a bulk frame refused (malformed, out of order, oversize, bad checksum, ...)
    ├── ControlRecordError  a control record refused (not msgpack, too large, unknown type, bad field)
    └── LinkError           the link cannot do what was asked (not open, closed, timed out)

Each error says what was expected and what came, so a log line names the fault without a debugger.
"""


class MeshError(Exception):
    """Base of every error the mesh transport raises on purpose."""


class IceConfigError(MeshError):
    """ICE servers or host addresses are not usable; raised before any packet is sent."""


class FramingError(MeshError):
    """A bulk-channel frame was refused (see framing.py for what changes and what does not).

    ``payload_id`` names the payload the receiver gave up on because of this frame (its START was refused
    or a chunk discarded it), so the link can tell the sender; ``None`` when no payload was affected.
    """

    def __init__(self, message: str, payload_id: int | None = None) -> None:
        super().__init__(message)
        self.payload_id = payload_id


class ControlRecordError(MeshError):
    """A control-channel record was refused; it is dropped and the link goes on."""


class LinkError(MeshError):
    """The link is closed, failed or did not open in time."""
